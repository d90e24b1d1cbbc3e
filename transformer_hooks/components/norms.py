"""LayerNorm and RMSNorm, and their "Pre" forms left after ``fold_ln``.

Each norm exposes ``hook_scale`` (the divisor, [..., 1]) and ``hook_normalized``.
Unobserved, a norm is one fused kernel (``F.layer_norm`` / ``F.rms_norm``, as HF runs
it); observed, it computes the scale explicitly so the hooks see and can edit it. Observed by
readers only (``run_with_cache``), the output is still the fused kernel's and the readers
are shown the explicit values, so caching changes no output bit.
Both paths agree to float rounding (tested).

As in TransformerLens 3.x, ``hook_normalized`` is before the weight (and LayerNorm's bias):
``x_c / s`` for every norm, folded or not, so ``fold_ln`` does not change it. (TransformerLens
2.x cached LayerNorm's after the weight and bias.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ..config import ModelConfig
from ..hooks import HookPoint

Resid = Float[torch.Tensor, "... d_model"]
Scale = Float[torch.Tensor, "... 1"]


def normalize(
    x: Resid,
    centre: bool,
    eps: float = 0.0,
    w: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: Scale | None = None,
    hook_scale: Callable[[Scale], Scale] | None = None,
) -> Resid:
    """The norm's formula, in float32 (the one implementation: the norms, the cache's
    ``apply_ln_to_stack`` and the logit lens use it)::

        x_c = x - mean(x)   (LayerNorm, ``centre``; RMSNorm: x_c = x)
        s   = sqrt(mean(x_c^2) + eps)
        out = x_c / s * w + b        (w, b when given)

    ``scale`` gives ``s`` instead (a cached one); ``hook_scale`` sees, and may replace, the
    computed ``s``.
    """
    x = x.float()
    if scale is None:
        if centre:
            mean_square, mean = torch.var_mean(x, -1, correction=0, keepdim=True)  # of the centred x; one pass
            x = x - mean
        else:
            mean_square = x.pow(2).mean(-1, keepdim=True)
        scale = (mean_square + eps).sqrt()
        if hook_scale is not None:
            scale = hook_scale(scale)
    elif centre:
        x = x - x.mean(-1, keepdim=True)
    out = x / scale
    if w is None:
        return out if b is None else out + b
    return out * w if b is None else torch.addcmul(b, out, w)  # b + x̂ w


class _Norm(nn.Module):
    centre: bool = True  # LayerNorm subtracts the mean; RMSNorm does not

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.d_model = cfg.d_model
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def fused(self, x: Resid) -> bool:
        """Whether the output is the fused kernel's: unobserved, or observed by readers only (the
        cache), who are shown the explicitly computed scale and normalised residual here, so
        ``model(x)`` and ``run_with_cache(x)`` agree to the bit. False: a hook may edit."""
        if not (self.hook_scale.observed or self.hook_normalized.observed):
            return True
        if self.hook_scale.only_read and self.hook_normalized.only_read:
            self.hook_normalized(self._scaled(x).to(x.dtype))
            return True
        return False

    def _scaled(self, x: Resid, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> Resid:
        """``normalize``, with ``hook_scale`` seeing the scale, in float32."""
        return normalize(x, self.centre, self.eps, w, b, hook_scale=self.hook_scale)


class LayerNorm(_Norm):
    """LayerNorm with weight ``w`` and bias ``b`` [d_model]; ``eps`` and ``d_model`` from ``cfg``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: Resid) -> Resid:
        """``(x - mean) / sqrt(var + eps) * w + b`` over the last axis of ``x`` [batch, pos, d_model];
        ``hook_scale`` sees the scale [batch, pos, 1], ``hook_normalized`` the normalised residual.
        """
        if self.fused(x):
            return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)
        return torch.addcmul(self.b, self.hook_normalized(self._scaled(x).to(x.dtype)), self.w)


class LayerNormPre(_Norm):
    """LayerNorm whose weight and bias were folded into the next layer's weights."""

    def forward(self, x: Resid) -> Resid:
        """``(x - mean) / sqrt(var + eps)`` over the last axis of ``x`` [batch, pos, d_model] (no weight or bias)."""
        if self.fused(x):
            return F.layer_norm(x, (self.d_model,), None, None, self.eps)
        return self.hook_normalized(self._scaled(x).to(x.dtype))


class RMSNorm(_Norm):
    """RMSNorm with weight ``w`` [d_model]; ``eps`` and ``d_model`` from ``cfg``."""

    centre = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.w = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x: Resid) -> Resid:
        """``x / sqrt(mean(x**2) + eps) * w`` over the last axis of ``x`` [batch, pos, d_model],
        normalised in float32 and cast back before the weight, as HF does.
        """
        if self.fused(x):
            # HF: normalise in float32, cast back, then multiply by the weight.
            return F.rms_norm(x.float(), (self.d_model,), None, self.eps).to(x.dtype) * self.w
        return self.hook_normalized(self._scaled(x).to(x.dtype)) * self.w


class RMSNormPre(_Norm):
    """RMSNorm whose weight was folded into the next layer's weights."""

    centre = False

    def forward(self, x: Resid) -> Resid:
        """``x / sqrt(mean(x**2) + eps)`` over the last axis of ``x`` [batch, pos, d_model] (no weight)."""
        if self.fused(x):
            return F.rms_norm(x.float(), (self.d_model,), None, self.eps).to(x.dtype)
        return self.hook_normalized(self._scaled(x).to(x.dtype))


NORMS: dict[str, type[_Norm]] = {"LN": LayerNorm, "LNPre": LayerNormPre, "RMS": RMSNorm, "RMSPre": RMSNormPre}


def make_norm(cfg: ModelConfig) -> _Norm:
    """The norm the config ``cfg`` describes (LayerNorm or RMSNorm, folded or not)."""
    return NORMS[cfg.normalization_type](cfg)
