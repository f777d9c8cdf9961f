"""The smoke book: every notebook executed in the smoke profile, and the book built from them, into a folder.

    python tests/smoke_book.py FOLDER

The conftest starts this in the background as soon as collection shows a test that needs the book, and runs those
tests last, so the notebooks' kernels run while the rest of the suite does (make test on 2 cores: issue 25)."""

import os
import sys
from pathlib import Path

# what `make book` says offline (helpers.data.inception's message): the built book shows it in its banner
FALLBACK = ("- could not download the pretrained InceptionV1 weights (offline). Download that file on a machine with "
            "internet and put it at ~/.cache/torch/hub/checkpoints/inception5h.pth, or pass --weights PATH.pth")
DONE = "built"  # written last into the folder, when the book is whole


def environment(root: Path) -> dict[str, str]:
    """What the notebooks run with (the smoke profile, as an offline ``make book`` falls back to it)."""
    return {"SAE_PROFILE": "smoke", "SAE_BOOK_BUILD": "1", "SAE_FALLBACK_REASON": FALLBACK, "TQDM_DISABLE": "1",
            "SAE_RUN_DIR": str(root / "run")}


def reader_environment(root: Path) -> dict[str, str]:
    """What a process that reads the built book runs with: the notebooks' environment, not building the book."""
    return {k: v for k, v in environment(root).items() if k != "SAE_BOOK_BUILD"}


def build(root: Path) -> None:
    from helpers.run import book
    from helpers.run.artifacts import open_run

    env = environment(root)
    with book.saving_figures(root / "run" / "figures"):
        executed = book.execute_notebooks(root / "executed", env, timeout=900)
    os.environ.update(reader_environment(root))
    book.build_html(book.stage(executed, open_run("smoke").banner(), root / "src", root / "run" / "atlas"), root / "out")
    (root / DONE).write_text("\n".join(str(p) for p in executed))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
