"""Token embedding, learned position embedding, unembedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from ..config import ModelConfig
from ..hooks import HookPoint
from .linear import linear
from .softcap import softcap


class Embed(nn.Module):
    """tokens -> residual: ``W_E[tokens] * embed_scale``. ``W_E``: [d_vocab, d_model].

    Gemma scales by sqrt(d_model), rounded to the model's dtype first as HF does. ``W_E``
    stays unscaled (it is also the tied unembedding), so ``hook_embed`` is after the scale.

    Args:
        cfg: ``d_vocab``, ``d_model`` and ``embed_scale``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.scale = cfg.embed_scale

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The embeddings [batch, pos, d_model] of ``tokens`` [batch, pos]."""
        embedded = F.embedding(tokens, self.W_E)
        if self.scale == 1.0:
            return embedded
        return embedded * torch.tensor(self.scale, dtype=embedded.dtype)


class PosEmbed(nn.Module):
    """Learned absolute positions (GPT-2, GPT-Neo). ``W_pos``: [n_ctx, d_model]; ``cfg`` gives the sizes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, positions: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The position embeddings [batch, pos, d_model] of ``positions`` [batch, pos] (position ids, padding
        excluded).
        """
        return F.embedding(positions, self.W_pos)


class Unembed(nn.Module):
    """residual -> logits. ``W_U``: [d_model, d_vocab_out], ``b_U``: [d_vocab_out] (``d_vocab_out``
    is ``d_vocab`` unless a TransformerLens config sets it).

    With ``final_logit_softcap`` c, logits are ``c * tanh((resid · W_U + b_U) / c)``: direct
    logit attributions (linear in the residual) are of the logits before the cap.

    ``W_U`` is stored as the transpose of a [d_vocab, d_model] matrix (the layout of
    ``W_E`` and of HF's ``lm_head``), so a tied checkpoint can share one copy with
    ``W_E`` and ``F.linear`` reads it without a copy.

    Args:
        cfg: ``d_model``, ``d_vocab`` and ``final_logit_softcap``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_vocab_out, cfg.d_model).T)
        self.b_U = nn.Parameter(torch.empty(cfg.d_vocab_out))
        self.softcap = cfg.final_logit_softcap
        self.hook_in = HookPoint()  # [batch, pos, d_model]: the normalised residual read
        self.hook_out = HookPoint()  # [batch, pos, d_vocab]: the logits (after the cap)

    def forward(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """The logits [..., d_vocab_out] of ``resid`` [..., d_model] (the final norm already applied),
        through ``hook_in`` (the stream) and ``hook_out`` (the logits)."""
        logits = linear(self.hook_in(resid), self.W_U.T, self.b_U)
        return self.hook_out(logits if self.softcap is None else softcap(logits, self.softcap))
