"""Progress bars: tqdm on stderr, shown only to a person watching a terminal.

Every bar in the package is made by :func:`tqdm` here. It is off when stderr is not a
terminal (a log file, a pipe, a notebook kernel, so no escape codes end up in saved outputs),
when the environment variable ``CI`` is set, after ``set_progress(False)`` (the commands'
``--quiet``), and where the caller passes ``disable=True``. ``set_progress(True)`` turns
bars on where they would be off (in Jupyter, say); ``set_progress(None)`` restores the
automatic choice.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm as _tqdm

__all__ = ["progress_enabled", "set_progress", "tqdm"]

_forced: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Turn every progress bar on (``enabled=True``) or off (``False``), or back to automatic (``None``:
    on only when stderr is a terminal and ``CI`` is unset)."""
    global _forced
    _forced = enabled


def progress_enabled() -> bool:
    """Whether bars are shown now (see the module docstring)."""
    if _forced is not None:
        return _forced
    if os.environ.get("CI"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """``tqdm.tqdm`` writing to stderr, disabled unless :func:`progress_enabled` (or when the
    caller passes ``disable=True``). ``args`` and ``kwargs``: tqdm's own arguments."""
    kwargs["disable"] = bool(kwargs.get("disable", False)) or not progress_enabled()
    kwargs.setdefault("file", sys.stderr)
    return _tqdm(*args, **kwargs)
