"""Rotary position embeddings, in HF's rotate-half layout.

Dims ``[0, rotary_dim)`` of each head rotate; the rest pass through (NeoX/Pythia rotate
a fraction, Llama all). Pair ``i`` is ``(x[i], x[i + rotary_dim/2])`` and turns by
``position * inv_freq[i]``. cos/sin are computed once per forward for all layers (twice
when the windowed layers have their own base, ``local_rope_theta``: Gemma 3).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import nn

from ..config import ModelConfig, RopeScaling

CosSin = tuple[Float[torch.Tensor, "batch pos rotary_dim"], Float[torch.Tensor, "batch pos rotary_dim"]]


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> Float[torch.Tensor, " half"]:
    """Rotary inverse frequencies ``theta ** (-2i / rotary_dim)``, with ``scaling`` (linear, llama3, ...) applied."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: leave high frequencies alone, divide low ones by ``factor``, blend in between.
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class Rotary(nn.Module):
    """Rotary tables of one base: ``cfg``'s ``rotary_dim``, ``rope_theta`` and ``rope_scaling``;
    with ``local``, the windowed layers' base ``local_rope_theta``, unscaled (Gemma 3).
    """

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, cfg: ModelConfig, local: bool = False) -> None:
        """Build the inverse frequencies (see the class docstring for ``cfg`` and ``local``)."""
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        theta = cfg.local_rope_theta if local else cfg.rope_theta
        assert theta is not None, "a local rotary needs cfg.local_rope_theta"
        self.theta: float = theta
        self.scaling: RopeScaling | None = None if local else cfg.rope_scaling
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> Float[torch.Tensor, " half"]:
        """This layer's inverse frequencies (the local ones on local layers)."""
        return inverse_frequencies(self.rotary_dim, self.theta, self.scaling)

    def forward(self, positions: Int[torch.Tensor, "batch pos"], dtype: torch.dtype) -> CosSin:
        # float32 whatever the model dtype, as HF does, then cast.
        """The cos and sin tables [batch, pos, rotary_dim] of ``positions`` [batch, pos], computed in
        float32 as HF does, then cast to ``dtype``.
        """
        freqs = positions[..., None].float() * self.inv_freq.float()  # [batch, pos, rotary_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(
    x: Float[torch.Tensor, "batch pos head d_head"], cos_sin: CosSin
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """``x`` rotated by ``cos_sin`` on its first ``rotary_dim`` features (the rest pass through)."""
    cos, sin = (t[:, :, None, :] for t in cos_sin)  # broadcast over heads
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos + rotated_half * sin
    return x_rot if x_pass.shape[-1] == 0 else torch.cat((x_rot, x_pass), dim=-1)
