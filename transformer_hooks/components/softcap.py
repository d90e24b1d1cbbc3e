"""Soft-capping (Gemma 2): ``c * tanh(x / c)``, about x when |x| << c and never beyond ±c."""

from __future__ import annotations

import torch


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: soft-capping as Gemma 2 applies it."""
    return torch.tanh(x / cap) * cap
