"""The one table of dtypes: torch's, the names a user may type, the safetensors header codes and
the numpy dtype a memory map reads each as. Every other dtype mapping is a view of it.

It imports only torch and numpy, so ``weights_conversion`` (which imports nothing of the package
above the config part) reads its safetensors codes from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    """One row: ``torch``, its safetensors code, the names a model's dtype may be given by (the
    first canonical; floating-point types only) and the numpy dtype a memory map of its bytes
    has (bfloat16 as its bits, uint16; None where numpy has none)."""

    torch: torch.dtype
    safetensors: str
    names: tuple[str, ...] = ()
    numpy: Any = None


TABLE: tuple[DType, ...] = (
    DType(torch.float64, "F64", (), np.float64),
    DType(torch.float32, "F32", ("float32", "fp32"), np.float32),
    DType(torch.float16, "F16", ("float16", "fp16", "half"), np.float16),
    DType(torch.bfloat16, "BF16", ("bfloat16", "bf16"), np.uint16),
    DType(torch.int64, "I64", (), np.int64),
    DType(torch.int32, "I32", (), np.int32),
    DType(torch.int16, "I16", (), np.int16),
    DType(torch.int8, "I8", (), np.int8),
    DType(torch.uint8, "U8", (), np.uint8),
    DType(torch.bool, "BOOL", (), np.bool_),
    DType(torch.float8_e4m3fn, "F8_E4M3"),
    DType(torch.float8_e5m2, "F8_E5M2"),
)

# Views of the table.
DTYPE_NAMES: dict[str, torch.dtype] = {name: d.torch for d in TABLE for name in d.names}
CANONICAL_NAMES: dict[str, torch.dtype] = {d.names[0]: d.torch for d in TABLE if d.names}  # float32, float16, bfloat16
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {d.safetensors: d.torch for d in TABLE}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {d.torch: d.safetensors for d in TABLE}
SAFETENSORS_NUMPY: dict[str, Any] = {d.safetensors: d.numpy for d in TABLE if d.numpy is not None}


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
