"""The TransformerLens-only helpers of its 3.x ``transformer_lens.utilities`` module (its weight
initialisers and fans). ``transformer_hooks.utilities`` is that module path: ``utils`` and these."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


# TransformerLens-only helpers ----------------------------------------------------------------
def calc_fan_in_and_fan_out(tensor: torch.Tensor) -> tuple[int, int]:
    """TransformerLens's fan-in and fan-out of ``tensor``, for its weight layouts: [d_in, d_out] matrices and
    [head, d_model, d_head] attention weights (fan_in d_model, fan_out head * d_head); a vector
    has fan_in 1."""
    shape = tensor.shape
    if len(shape) == 0:
        raise ValueError("Fan in and fan out can not be computed for scalars.")
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(f"Fan in and fan out can not be computed for shape {shape} tensors.")


def init_xavier_uniform_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill ``param`` with U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)), in place (TransformerLens's fans)."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(param, -bound, bound)


def init_xavier_normal_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill ``param`` with N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)), in place."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    return nn.init.normal_(param, mean=0.0, std=gain * math.sqrt(2.0 / (fan_in + fan_out)))


def init_kaiming_uniform_(
    param: torch.Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0, mode: str = "fan_in"
) -> torch.Tensor:
    """Fill ``param`` with U(-b, b), b = gain * calculate_gain(nonlinearity, a) * sqrt(3 / fan), in
    place; ``mode``: ``"fan_in"`` or ``"fan_out"`` picks the fan."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    fan = fan_in if mode == "fan_in" else fan_out
    gain *= nn.init.calculate_gain(nonlinearity, a)  # type: ignore[arg-type]
    bound = gain * math.sqrt(3.0 / fan)
    return nn.init.uniform_(param, -bound, bound)


def init_kaiming_normal_(
    param: torch.Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0, mode: str = "fan_in"
) -> torch.Tensor:
    """Fill ``param`` with N(0, std^2), std = gain * calculate_gain(nonlinearity, a) / sqrt(fan), in
    place; ``mode``: ``"fan_in"`` or ``"fan_out"`` picks the fan."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    fan = fan_in if mode == "fan_in" else fan_out
    gain *= nn.init.calculate_gain(nonlinearity, a)  # type: ignore[arg-type]
    return nn.init.normal_(param, mean=0.0, std=gain * math.sqrt(1.0 / fan))


def override_or_use_default_value(default_flag: Any, override: Any = None) -> Any:
    """``override`` unless it is None, else ``default_flag``."""
    return override if override is not None else default_flag
