"""Command line: ``python -m helpers harvest|train|book|export ...``.

Each command's flags are generated from its config dataclass (``HarvestConfig``,
``TrainConfig``; a nested config's fields are flags of their own: ``--k``, ``--screen``), so a
run is fully described by the config written next to its output.
Only ``config`` is imported to parse the command line: the command's own module (and torch)
is imported when it runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import typing

from helpers.config import HarvestConfig, TrainConfig, check_layers, choices, option

# name: (config class, "module:function" that runs it, help)
COMMANDS = {
    "harvest": (HarvestConfig, "data.harvest:harvest", "harvest activation vectors from InceptionV1 into a sharded store"),
    "train": (TrainConfig, "sae.train:train", "train a TopK SAE on a harvested layer or an .npy of vectors"),
}
# commands with their own parser: name -> ("module", help)
DELEGATED = {
    "book": ("run.book", "execute the notebooks in a profile and build the Jupyter Book"),
    "export": ("run.export", "write helpers/ modules from the chapters' #| export cells (--check: only compare)"),
    "verify": ("data.store", "check a harvest's store: every shard against its record, the manifest and its checksums"),
    "sweep": ("run.sweep", "train one layer's SAE for every family at several L0s and seeds, and evaluate each"),
    "publish": ("run.publish", "upload an SAE directory to the Hugging Face hub with a model card (--dry-run: only write it)"),
}


def _arg_type(cls, name: str):
    """The type argparse converts a field's value to (``X | None`` -> X; tuples of layers stay a string)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Literal, tuple):  # choices are checked by argparse; layers split later
        return str
    optional = [a for a in typing.get_args(hint) if a is not type(None)]  # X | None
    return optional[0] if optional else hint


def _nested_class(cls, name: str):
    """The config class of a nested field (``TrainConfig.sae`` -> ``SaeConfig``), else None."""
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        nested = _nested_class(cls, f.name)
        if nested is not None:
            add_dataclass_arguments(parser.add_argument_group(f.metadata.get("help", f.name)), nested)
            continue
        kind = _arg_type(cls, f.name)
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            parser.add_argument(option(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(option(f.name), type=kind, default=default, help=help_, choices=choices(cls, f.name))


def from_arguments(cls, ns: argparse.Namespace):
    """The config ``cls`` from parsed flags (nested configs from their own flags)."""
    return cls(**{f.name: from_arguments(nested, ns) if (nested := _nested_class(cls, f.name)) else getattr(ns, f.name)
                  for f in dataclasses.fields(cls)})


def _run(target: str, cfg):
    module, function = target.split(":")
    return getattr(importlib.import_module(f"helpers.{module}"), function)(cfg)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DELEGATED:
        return importlib.import_module(f"helpers.{DELEGATED[argv[0]][0]}").main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_)
    for name, (cls, _, help_) in COMMANDS.items():
        add_dataclass_arguments(sub.add_parser(name, help=help_, description=help_), cls)
    ns = parser.parse_args(argv)
    cls, target, _ = COMMANDS[ns.command]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = from_arguments(cls, ns)
        if ns.command == "train" and cfg.layer and "," in cfg.layer:  # several layers at once
            from helpers.sae.per_layer import train_layers

            devices = [d for d in cfg.device.split(",") if d]
            layers = [layer.strip() for layer in cfg.layer.split(",") if layer.strip()]
            out = train_layers(cfg, list(check_layers(layers)) if layers else [], devices)
        else:
            out = _run(target, cfg)
    except Exception as e:  # every failure as one line (SAE_DEBUG=1 shows the traceback)
        if os.environ.get("SAE_DEBUG"):
            raise
        known = isinstance(e, (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, MemoryError))
        print(f"error: {e}" if known else f"error: {type(e).__name__}: {e} (rerun with SAE_DEBUG=1 for the traceback, "
              "and report it)", file=sys.stderr)
        return 2
    print(out)
    return 0
