"""Quantized weights: ``from_pretrained(..., quantize="int8")`` stores the big linear
weights (attention W_Q, W_K, W_V, W_O; MLP W_in, W_gate, W_out) as integers, quantized one
group (block) at a time as the load streams them in, so a load never holds more than the
quantized model plus one block in full precision.

    scheme     library          devices                      stored per weight (+ scales)
    int8       torchao          CPU, CUDA                    1 byte; a scale per output row
    int4       torchao          CPU; CUDA with bfloat16      1/2 byte; a scale and zero per 128 inputs
    bnb-int8   bitsandbytes     CUDA                         1 byte; a scale per output row
    bnb-nf4    bitsandbytes     CUDA                         1/2 byte; a scale per 64 weights

The embeddings and unembedding stay in the load's dtype: ``W_E`` is read by row (a lookup,
not a matmul), a tied ``W_U`` is the same tensor, and the unembedding is what logit lens
and direct logit attribution read, so its exact values matter most; on Llama-3.1-70B they
are 3% of the weights. Norms and biases are tiny and stay too.

A quantized weight is a ``QuantizedWeight``: a tensor with the parameter's shape, strides
and dtype whose ``F.linear`` runs the library's quantized kernel and whose every other use
(``W_Q`` in a weight view, the per-head ``hook_result`` einsum, ``model.W_O``) sees the
dequantized tensor. The components are unchanged, every hook site works, and the
activations are those of the model with the dequantized weights, up to float rounding
(the kernels sum in another order). Against the full-precision model, each linear output
moves by at most ``sum_k |x_k| * step_k / 2``, ``step`` being the quantization step of the
weights it reads (``max|w| / 127.5`` per row for int8; ``(max - min) / 15`` per group for
int4): tests/test_quantize.py checks both. Quantized weights get no gradients; gradients
flow through them to activations (attribution patching).

Speed on CPU (benchmarks/quantize.py, SmolLM2-135M): quantization buys memory, not time.
torchao's int8 weight-only linear converts the int8 matrix to floats on every call (on GPU,
``torch.compile`` fuses that): as fast as float32 there, 1.3-1.6x bfloat16's time. torch's CPU
int4 kernel is built for generation: with bfloat16 activations it beats the dense matmul on a
few rows (0.84x) and loses on a prompt (3x); with float32 activations it takes a slow
reference path (about 100x), so int4 on CPU warns unless ``dtype="bfloat16"``.

The torchao paths are tested on CPU; the CUDA paths (torchao's int4 tinygemm kernel,
bitsandbytes) are written to the libraries' documented APIs and run only on a GPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

QUANTIZE_CHOICES = ("int8", "int4", "bnb-int8", "bnb-nf4")
TORCHAO_PIP = "pip install 'transformer_hooks[quant]' (or: pip install torchao)"
BNB_PIP = "pip install bitsandbytes"
CHOICES_TEXT = (
    "quantize takes None, 'int8' (torchao: CPU and CUDA), 'int4' (torchao: CPU, and CUDA with dtype=bfloat16), "
    "'bnb-int8' or 'bnb-nf4' (bitsandbytes: CUDA only)"
)

# The [out, in] matrix F.linear reads, taken from each quantized parameter as the components take it
# (attention.project, Attention.forward, MLP.forward). The keys are the parameters that are quantized.
MATRIX: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "W_Q": lambda W: W.transpose(1, 2).reshape(-1, W.shape[1]),
    "W_K": lambda W: W.transpose(1, 2).reshape(-1, W.shape[1]),
    "W_V": lambda W: W.transpose(1, 2).reshape(-1, W.shape[1]),
    "W_O": lambda W: W.flatten(0, 1).T,
    "W_in": lambda W: W.T,
    "W_gate": lambda W: W.T,
    "W_out": lambda W: W.T,
}
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides a matrix's inputs
NF4_BLOCK = 64


def is_quantized_parameter(name: str) -> bool:
    """Whether ``name`` (``blocks.3.attn.W_Q``) is one of the weights a quantized load quantizes."""
    return name.startswith("blocks.") and name.rpartition(".")[2] in MATRIX


class QuantizeError(ValueError):
    """A ``quantize=`` choice that is unknown or that this device or installation cannot run."""


@dataclass(frozen=True)
class Scheme:
    """One quantization choice on one device."""

    name: str
    device_type: str

    @property
    def library(self) -> str:
        """The library that quantizes: ``"bitsandbytes"`` or ``"torchao"``."""
        return "bitsandbytes" if self.name.startswith("bnb-") else "torchao"


def check_quantize(value: str | None, device: Any, dtype: torch.dtype, *, warn: bool = True) -> Scheme | None:
    """The scheme ``quantize=value`` names for weights of ``dtype`` on ``device``, checked before
    anything is read: unknown names, devices the library lacks and a missing library raise
    ``QuantizeError`` naming the choices or the pip command. ``warn``: warn about a slow choice
    (int4 on CPU without bfloat16)."""
    if value is None:
        return None
    if value not in QUANTIZE_CHOICES:
        raise QuantizeError(f"quantize={value!r} is not a choice: {CHOICES_TEXT}")
    device_type = torch.device(device or "cpu").type
    scheme = Scheme(value, device_type)
    if not dtype.is_floating_point:
        raise QuantizeError(f"quantize={value!r} quantizes floating-point weights; dtype={dtype} is not one")
    if scheme.library == "bitsandbytes":
        if device_type != "cuda":
            raise QuantizeError(
                f"quantize={value!r}: bitsandbytes' kernels run on CUDA only, and this load is on {device_type}; "
                f"on {device_type} use quantize='int8' or 'int4' (torchao). {CHOICES_TEXT}"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizeError(f"quantize={value!r} needs bitsandbytes, which is not installed: {BNB_PIP}")
        return scheme
    if importlib.util.find_spec("torchao") is None:
        raise QuantizeError(f"quantize={value!r} needs torchao, which is not installed: {TORCHAO_PIP}")
    if value == "int4" and device_type not in ("cpu", "cuda"):
        raise QuantizeError(
            f"quantize='int4': torchao's 4-bit kernels run on CPU and CUDA, not {device_type}; use quantize='int8'"
        )
    if warn and value == "int4" and device_type == "cpu" and dtype != torch.bfloat16:
        warnings.warn(
            f"quantize='int4' on CPU with {dtype} activations runs torch's slow reference int4 kernel (about 100x "
            "a float32 matmul); load with dtype='bfloat16' for its fast kernel",
            stacklevel=4,
        )
    if value == "int4" and device_type == "cuda" and dtype != torch.bfloat16:
        raise QuantizeError(
            f"quantize='int4' on CUDA runs torchao's tinygemm kernel, which takes bfloat16 weights, not {dtype}: "
            "load with dtype='bfloat16', or use quantize='bnb-nf4' (bitsandbytes) or 'int8'"
        )
    return scheme


# Packing -------------------------------------------------------------------------------------
def int4_group_size(n_in: int) -> int:
    """The int4 group size for a matrix with ``n_in`` inputs (a ``QuantizeError`` if none divides)."""
    for size in INT4_GROUP_SIZES:
        if n_in % size == 0:
            return size
    raise QuantizeError(f"int4 quantizes groups of {INT4_GROUP_SIZES} inputs; a matrix has {n_in}, which none divides")


def _pack(matrix: torch.Tensor, scheme: Scheme) -> Packed:
    """The [out, in] ``matrix`` (full precision, on its device) quantized."""
    if scheme.name == "int8":
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        return TorchaoPacked(Int8Tensor.from_hp(matrix, PerRow()))
    if scheme.name == "int4":
        n_out, n_in = matrix.shape
        group = int4_group_size(n_in)
        if scheme.device_type == "cpu":
            if n_out % 16:
                raise QuantizeError(f"int4 on CPU packs output rows by 16; a matrix has {n_out}; use quantize='int8'")
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor

            return TorchaoPacked(Int4OpaqueTensor.from_hp(matrix, [1, group]))
        # CUDA: untested here (no GPU in CI); torchao's tinygemm layout
        from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (  # pragma: no cover
            Int4TilePackedTo4dTensor,
        )

        return TorchaoPacked(Int4TilePackedTo4dTensor.from_hp(matrix, [1, group]))  # pragma: no cover
    return BnbPacked(matrix, scheme.name)  # pragma: no cover  (CUDA only)


class Packed:
    """A quantized [out, in] matrix: its kernel, its dequantized tensor and its bytes."""

    dtype: torch.dtype

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` with the quantized kernel (``x`` [..., in], ``bias`` [out] or None)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The matrix [out, in] in full precision (a fresh tensor)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that store it (their bytes are ``nbytes``)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> Packed:
        """The same packed matrix on ``device``."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """The bytes it occupies."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class TorchaoPacked(Packed):
    """torchao's int8 or int4 ``weight`` (a tensor subclass whose ``F.linear`` is the kernel);
    its methods are ``Packed``'s."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # a torchao tensor subclass: its F.linear is the quantized kernel
        self.dtype = weight.dtype
        self.shape = tuple(weight.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``Packed.linear``: ``x`` through the kernel, plus ``bias``."""
        return F.linear(x, self.weight, bias)

    def dequantize(self) -> torch.Tensor:
        """``Packed.dequantize``."""
        try:
            return self.weight.dequantize()
        except NotImplementedError:  # int4 on CPU has no dequantize: the kernel applied to the identity
            n_in = self.shape[1]
            eye = torch.eye(n_in, dtype=self.dtype, device=self.weight.device)
            return F.linear(eye, self.weight).T.contiguous()

    def tensors(self) -> list[torch.Tensor]:
        """``Packed.tensors``."""
        names, _ = self.weight.__tensor_flatten__()  # type: ignore[attr-defined]
        return [getattr(self.weight, n) for n in names]

    def to(self, device: torch.device) -> Packed:
        """``Packed.to``: on ``device``."""
        return TorchaoPacked(self.weight.to(device))


class BnbPacked(Packed):  # pragma: no cover  (bitsandbytes runs on CUDA only; no GPU in CI)
    """bitsandbytes' int8 (vector-wise, no outlier decomposition) or NF4 weights: ``matrix``
    [out, in] quantized as ``name`` (``"bnb-int8"`` or ``"bnb-nf4"``) says."""

    def __init__(self, matrix: torch.Tensor, name: str) -> None:
        import bitsandbytes as bnb

        self.name, self.dtype, self.shape = name, matrix.dtype, tuple(matrix.shape)
        if name == "bnb-nf4":
            self.data, self.state = bnb.functional.quantize_4bit(matrix, blocksize=NF4_BLOCK, quant_type="nf4")
        else:
            self.data, self.scales, _ = bnb.functional.int8_vectorwise_quant(matrix.half())
            self.state = bnb.MatmulLtState()
            self.state.CB, self.state.SCB = self.data, self.scales
            self.state.has_fp16_weights, self.state.is_training = False, False

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``Packed.linear``: ``x`` through the kernel, plus ``bias``."""
        import bitsandbytes as bnb

        if self.name == "bnb-nf4":
            return bnb.matmul_4bit(x, self.data.t(), quant_state=self.state, bias=bias)
        return bnb.matmul(x, self.data, bias=bias, state=self.state).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """``Packed.dequantize``."""
        import bitsandbytes as bnb

        if self.name == "bnb-nf4":
            return bnb.functional.dequantize_4bit(self.data, self.state).to(self.dtype)
        return (self.data.float() * self.scales.float()[:, None] / 127).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """``Packed.tensors``."""
        if self.name == "bnb-nf4":
            return [self.data, self.state.absmax]
        return [self.data, self.scales]

    def to(self, device: torch.device) -> Packed:
        """``Packed.to``: on ``device``."""
        raise QuantizeError("bitsandbytes weights stay on the device they were quantized on; load them there")


# The weight tensor ---------------------------------------------------------------------------
def _getters(*names: str) -> set[Any]:
    return {getattr(torch.Tensor, n).__get__ for n in names}


# Read from the wrapper itself: no dequantization needed.
_METADATA = _getters(
    "shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "grad", "grad_fn", "layout", "is_cuda", "is_meta"
) | {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.stride,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.element_size,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.storage_offset,
    torch.Tensor.is_contiguous,
    torch.Tensor.requires_grad_,
    torch.Tensor.__len__,
    torch.Tensor.__hash__,
    torch.Tensor.__setstate__,
}
_VIEWS = {
    torch.Tensor.transpose,
    torch.transpose,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.view,
    torch.Tensor.flatten,
    torch.flatten,
    torch.Tensor.unflatten,
    torch.Tensor.permute,
    torch.permute,
    torch.Tensor.t,
    torch.t,
    torch.Tensor.T.__get__,  # type: ignore[attr-defined]
    torch.Tensor.mT.__get__,  # type: ignore[attr-defined]
}


class QuantizedWeight(torch.Tensor):
    """A quantized weight with the shape, strides and dtype of the parameter it replaces.

    ``F.linear`` on the [out, in] view the component takes runs the quantized kernel; any
    other operation sees the dequantized tensor (a fresh full-precision copy each time);
    in-place operations (``zero_``, ``copy_``, item assignment) are refused.
    Views (transpose, reshape, ``.T``, ...) stay quantized: a meta tensor tracks where the
    view sits in the [out, in] matrix. ``.to(device)`` moves the packed data; a change of
    dtype is refused (load with the dtype you want).

    Args:
        packed: the quantized [out, in] matrix.
        layout: a meta tensor with this view's shape and strides over ``root``.
        root: a meta tensor of the [out, in] matrix.
    """

    packed: Packed
    view_meta: torch.Tensor  # meta: this view's shape and strides over ``matrix_meta``
    matrix_meta: torch.Tensor  # meta: the [out, in] matrix

    @staticmethod
    def __new__(cls, packed: Packed, layout: torch.Tensor, root: torch.Tensor) -> QuantizedWeight:
        device = packed.tensors()[0].device
        return torch.Tensor._make_wrapper_subclass(
            cls,
            layout.shape,
            strides=layout.stride(),
            storage_offset=layout.storage_offset(),
            dtype=packed.dtype,
            device=device,
            requires_grad=False,
        )

    def __init__(self, packed: Packed, layout: torch.Tensor, root: torch.Tensor) -> None:
        self.packed, self.view_meta, self.matrix_meta = packed, layout, root

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, packed={type(self.packed).__name__})"

    @property
    def is_matrix(self) -> bool:
        """Whether this view is the [out, in] matrix itself (F.linear's weight)."""
        layout, root = self.view_meta, self.matrix_meta
        return layout.shape == root.shape and layout.stride() == root.stride() and layout.storage_offset() == 0

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """The bytes the quantized data occupies (not the dequantized tensor's)."""
        return self.packed.nbytes

    def dequantize(self) -> torch.Tensor:
        """This view of the dequantized matrix, a plain tensor in the weight's dtype."""
        dense = self.packed.dequantize().to(self.dtype)
        return dense.as_strided(self.view_meta.shape, self.view_meta.stride(), self.view_meta.storage_offset())

    def _view(self, layout: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(self.packed, layout, self.matrix_meta)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        first = args[0] if args else None
        if func is F.linear:
            x, weight, bias = _linear_args(args, kwargs)
            if isinstance(weight, QuantizedWeight) and weight.is_matrix and not isinstance(x, QuantizedWeight):
                return _quantized_linear(x, weight, bias)
        elif isinstance(first, QuantizedWeight):
            if func in _VIEWS:
                with torch._C.DisableTorchFunctionSubclass():
                    layout = func(first.view_meta, *args[1:], **kwargs)
                if layout._base is first.matrix_meta or layout is first.matrix_meta:
                    return first._view(layout)
            elif func is torch.Tensor.detach:
                return first._view(first.view_meta)
            elif func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
                return first._moved(func, args[1:], kwargs)
            elif _in_place(func):
                raise QuantizeError(
                    f"{getattr(func, '__name__', func)} would change a quantized weight, which is read-only here "
                    "(an edit would land on a dequantized copy and be lost): load without quantize= to edit weights"
                )
        args, kwargs = tree_map(_dense, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        # what reaches the dispatcher without passing __torch_function__: on the dequantized tensor
        args, kwargs = tree_map(_dense, (args, kwargs or {}))
        return func(*args, **kwargs)

    def _moved(self, func: Any, args: tuple, kwargs: dict) -> QuantizedWeight:
        if func is torch.Tensor.cpu:
            device, dtype = torch.device("cpu"), None
        elif func is torch.Tensor.cuda:
            device, dtype = torch.device("cuda", *(args[:1] if args and args[0] is not None else ())), None
        else:
            device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise QuantizeError(
                f"a quantized weight keeps its dtype ({self.dtype}); load the model with the dtype you want: "
                f"from_pretrained(..., dtype={str(dtype).removeprefix('torch.')!r}, quantize=...)"
            )
        if device is None or torch.device(device) == self.device:
            return self
        return QuantizedWeight(self.packed.to(torch.device(device)), self.view_meta, self.matrix_meta)


def _in_place(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")


def _dense(value: Any) -> Any:
    return value.dequantize() if isinstance(value, QuantizedWeight) else value


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    names = ("input", "weight", "bias")
    values = list(args) + [kwargs.get(n) for n in names[len(args) :]]
    return values[0], values[1], values[2] if len(values) > 2 else None


class _Holder:
    """Keeps a weight out of autograd's sight (the quantized weight gets no gradient)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        self.weight = weight


class _QuantizedLinear(torch.autograd.Function):
    """The quantized kernel forward; backward to the input through the dequantized matrix."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, holder: _Holder) -> torch.Tensor:
        ctx.holder = holder
        return holder.weight.packed.linear(x, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_x = grad @ ctx.holder.weight.packed.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None


def _quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantizedLinear.apply(x, bias, _Holder(weight))
    return weight.packed.linear(x, bias)


# Quantizing a model ---------------------------------------------------------------------------
def quantize_weight(param: torch.Tensor, leaf: str, scheme: Scheme) -> QuantizedWeight:
    """The parameter ``param`` (whose name ends in ``leaf``: ``W_Q``, ``W_in``, ...) quantized as
    ``scheme`` says."""
    matrix = MATRIX[leaf](param.detach())
    if not matrix.is_contiguous() or matrix.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        raise QuantizeError(f"{leaf} is not laid out as the [out, in] matrix F.linear reads; cannot quantize it")
    root = torch.empty(matrix.shape, device="meta")
    offset = param.storage_offset() - matrix.storage_offset()
    layout = root.as_strided(param.shape, param.stride(), offset)
    return QuantizedWeight(_pack(matrix, scheme), layout, root)


def quantize_parameters(model: nn.Module, names: list[str], scheme: Scheme | None) -> None:
    """Replace the quantizable parameters of ``model`` among ``names`` (full names) by ones
    quantized as ``scheme`` says (None: nothing to do)."""
    if scheme is None:
        return
    for name in names:
        if not is_quantized_parameter(name):
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters[leaf]
        assert param is not None
        module._parameters[leaf] = nn.Parameter(quantize_weight(param, leaf, scheme), requires_grad=False)


def quantized_scheme(model: nn.Module) -> str | None:
    """The scheme a model's weights were quantized with, or None."""
    for p in model.parameters():
        if isinstance(p, QuantizedWeight):
            return type(p.packed).__name__
    return None


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes ``t`` occupies: its quantized data for a ``QuantizedWeight``."""
    return t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Parameter and buffer bytes of ``model``, each storage once (a tied W_U is W_E)."""
    seen: set[tuple[int, Any]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, QuantizedWeight):
            total += t.nbytes
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


# Sizes without loading (plan) ---------------------------------------------------------------------
def quantized_matrix_bytes(n_out: int, n_in: int, scheme: str, dtype: torch.dtype) -> int:
    """The bytes one [n_out, n_in] matrix of ``dtype`` weights occupies under ``scheme``
    (what ``QuantizedWeight.nbytes`` reports once loaded; tests/test_quantize.py and
    tests/test_plan.py compare the two)."""
    if scheme in ("int8", "bnb-int8"):
        # int8 data; a float32 scale per row (torchao also keeps an int8 zero point per row)
        return n_out * n_in + n_out * 4 + (n_out if scheme == "int8" else 0)
    if scheme == "int4":
        # two weights a byte; a scale and a zero per group of each row, in the weights' dtype
        return n_out * n_in // 2 + (n_in // int4_group_size(n_in)) * n_out * 2 * dtype.itemsize
    if scheme == "bnb-nf4":
        return n_out * n_in // 2 + -(-n_out * n_in // NF4_BLOCK) * 4  # a float32 absmax per block
    raise QuantizeError(f"quantize={scheme!r} is not a choice: {CHOICES_TEXT}")
