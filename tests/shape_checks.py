"""The type checker the test suite runs jaxtyping's shape checks with (see conftest.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from beartype import beartype


def typechecker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """beartype, except while ``torch.compile`` traces a forward: it runs the function on fake
    tensors, which the checks cannot inspect (the eager calls of the same code are checked)."""
    checked = beartype(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return checked(*args, **kwargs)

    return wrapper
