"""Command line: ``python -m helpers harvest|train|book ...``.

Each command's flags are generated from its config dataclass (``HarvestConfig``,
``TrainConfig``), so a run is fully described by the config written next to its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from .harvest import HarvestConfig, harvest
from .train import TrainConfig, train

COMMANDS = {
    "harvest": (HarvestConfig, harvest, "harvest activation vectors from InceptionV1 into a sharded store"),
    "train": (TrainConfig, train, "train a TopK SAE on a harvested layer or an .npy of vectors"),
}


def _arg_type(annotation):
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _arg_type(f.type)
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_, choices=f.metadata.get("choices"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["book"]:
        from .book import main as book_main

        return book_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("book", help="execute the notebooks in a profile and build the Jupyter Book")
    for name, (cls, _, help_) in COMMANDS.items():
        add_dataclass_arguments(sub.add_parser(name, help=help_, description=help_), cls)
    ns = parser.parse_args(argv)
    cls, run, _ = COMMANDS[ns.command]
    cfg = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "train" and cfg.layer and "," in cfg.layer:  # several layers at once
            from .train import train_layers

            devices = [d for d in cfg.device.split(",") if d]
            out = train_layers(cfg, [l for l in cfg.layer.split(",") if l], devices)
        else:
            out = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
