"""The floating-point dtypes a model's weights may have, by torch dtype or by name."""

from __future__ import annotations

import torch

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The model's dtype: a floating-point ``torch.dtype`` or one of the names in ``DTYPE_NAMES``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(
                f"dtype={dtype} is not a floating-point type: a model's weights need one of "
                f"torch.float32, torch.float16, torch.bfloat16 or torch.float64"
            )
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
        raise ValueError(
            f"unsupported dtype {dtype!r}; use a floating-point torch.dtype or one of {sorted(DTYPE_NAMES)}"
        )
    return DTYPE_NAMES[dtype]
