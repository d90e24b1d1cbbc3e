"""The MLP: GELU-family (GPT-2, GPT-Neo, NeoX) or gated SwiGLU (Llama).

    MLP:       post = act(x · W_in + b_in)                          [batch, pos, d_mlp]
    GatedMLP:  post = act(x · W_gate + b_gate) * (x · W_in + b_in)
               (built from a HookedTransformerConfig: act(x · W_gate) * (x · W_in) + b_in, as
               TransformerLens computes it; ``ModelConfig.gated_bias_after_product``)
    out = post · W_out + b_out                                      [batch, pos, d_model]

Hooks: ``hook_pre`` (the activation's input), ``hook_pre_linear`` (gated: the linear
branch), ``hook_post`` (the neuron activations that ``W_out`` reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ..config import ModelConfig
from ..hooks import HookPoint
from .linear import linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` (``gelu``, ``gelu_new``, ``silu``, ``relu``, ...)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def in_weight(cfg: ModelConfig) -> torch.Tensor:
    """An empty [d_model, d_mlp] tensor (sizes from ``cfg``) laid out as F.linear's [d_mlp, d_model] weight."""
    return torch.empty(cfg.d_mlp, cfg.d_model).T


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, sizes and ``act_fn`` from ``cfg``; ``hook_pre`` and
    ``hook_post`` see [batch, pos, d_mlp].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_in = nn.Parameter(in_weight(cfg))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp).T)  # [d_mlp, d_model]
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = activation(cfg.act_fn)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The MLP output [batch, pos, d_model] of ``x`` [batch, pos, d_model] (the normalised residual)."""
        pre = self.hook_pre(linear(x, self.W_in.T, self.b_in))
        return linear(self.hook_post(self.act(pre)), self.W_out.T, self.b_out)


class GatedMLP(MLP):
    """A gated MLP (Llama, Gemma): ``(act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``
    (with ``gated_bias_after_product``: ``b_in`` after the product, as TransformerLens); sizes from ``cfg``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.W_gate = nn.Parameter(in_weight(cfg))
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.hook_pre_linear = HookPoint()
        self.bias_after_product = cfg.gated_bias_after_product

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The MLP output [batch, pos, d_model] of ``x`` [batch, pos, d_model]; ``hook_pre`` sees the
        gate's pre-activation, ``hook_pre_linear`` the linear path, ``hook_post`` their product.
        """
        pre = self.hook_pre(linear(x, self.W_gate.T, self.b_gate))
        if self.bias_after_product:  # TransformerLens: act(x W_gate) * (x W_in) + b_in
            pre_linear = self.hook_pre_linear(linear(x, self.W_in.T, None))
            return linear(self.hook_post(self.act(pre) * pre_linear + self.b_in), self.W_out.T, self.b_out)
        pre_linear = self.hook_pre_linear(linear(x, self.W_in.T, self.b_in))
        return linear(self.hook_post(self.act(pre) * pre_linear), self.W_out.T, self.b_out)


def make_mlp(cfg: ModelConfig) -> MLP:
    """The MLP the config ``cfg`` describes (gated or not)."""
    return GatedMLP(cfg) if cfg.gated_mlp else MLP(cfg)
