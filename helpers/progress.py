"""Progress bars for the long jobs: ``tqdm.auto`` (a widget in Jupyter, text elsewhere), off where
``TQDM_DISABLE=1``, which ``tqdm.notebook`` would otherwise ignore (the book build sets it, so no
progress bar lands in a rendered page)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(*args, **kw) -> tqdm:
    """``tqdm(*args, **kw)``, disabled when ``kw["disable"]`` or the environment says so."""
    kw["disable"] = bool(kw.get("disable")) or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(*args, **kw)
