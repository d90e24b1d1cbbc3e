"""Multi-head attention with grouped key/value heads (MHA when n_kv_heads == n_heads).

Shapes (axis names as in config.py)::

    q_in  [batch, pos, d_model]   or per head [batch, pos, head, d_model]
    q     [batch, pos, head, d_head]        = q_in · W_Q + b_Q
    k, v  [batch, pos, kv_head, d_head]     (GQA: query head h reads kv head h // group_size)
    scores, pattern [batch, head, pos, key_pos]
    z     [batch, pos, head, d_head]        = pattern · v
    result [batch, pos, head, d_model]      = z · W_O   (per head, only when observed)
    out   [batch, pos, d_model]             = sum_head result + b_O

       query heads   0 1 2 3 4 5
                     | | | | | |
       kv heads      0 0 1 1 2 2      group_size = 2

Variants, from ModelConfig: ``qk_norm`` puts an RMSNorm (``q_norm``, ``k_norm``, with
TransformerLens's hook names) on q and k after ``hook_q`` / ``hook_k`` and before rotary,
over each head's d_head ("head") or the whole projection ("all"); ``attn_logit_softcap``
caps the scaled scores, ``c * tanh(scores / c)``, before the mask.

The explicit path computes the pattern in TransformerLens's order (q·k / attn_scale, then
soft-cap, mask, softmax), so TransformerLens's own check of a pattern recomputed from the
cached q and k holds bit for bit. The fused kernel (``scaled_dot_product_attention``) runs unless this layer's
``hook_attn_scores`` or ``hook_pattern`` is observed (or the scores are soft-capped,
which the kernel cannot do); then the explicit softmax path runs for this layer alone.
The two agree to float rounding (tested).

Weights are stored in the [out, in] layout that ``F.linear`` reads without a copy
(HF's ``nn.Linear`` layout); ``W_Q`` etc. are views of them in TransformerLens's
shapes, so the canonical tensors and the fast matmuls are the same memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Float
from torch import nn

from ..config import ModelConfig
from ..hooks import HookPoint
from .kv_cache import LayerKVCache
from .linear import linear
from .masks import AttentionMask
from .norms import RMSNorm
from .rotary import CosSin, rotate
from .softcap import softcap

Input = Float[torch.Tensor, "batch pos d_model"] | Float[torch.Tensor, "batch pos head d_model"]
KVInput = Float[torch.Tensor, "batch pos d_model"] | Float[torch.Tensor, "batch pos kv_head d_model"]  # per kv head


def head_weight(n_heads: int, d_model: int, d_head: int) -> torch.Tensor:
    """An empty [n_heads, d_model, d_head] tensor laid out as an
    [n_heads*d_head, d_model] matrix (F.linear's layout).
    """
    return torch.empty(n_heads, d_head, d_model).transpose(1, 2)


def project(x: Input, W: Float[torch.Tensor, "head d_model d_head"], b: Float[torch.Tensor, "head d_head"]):
    """x · W + b for every head: -> [batch, pos, head, d_head]."""
    n, _, d_head = W.shape
    if x.ndim == 3:  # one input shared by all heads: a single matmul
        return linear(x, W.transpose(1, 2).reshape(n * d_head, -1), b.reshape(-1)).unflatten(-1, (n, d_head))
    return einsum(x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head") + b


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (see the module docstring).

    Args:
        cfg: the heads, widths, rotary, soft-cap and QK-norm settings.
        layer: the block index (its attention window and, for GPT-2-style models, its score scale).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.n_kv_heads, self.d_head = h, kv, dh
        self.W_Q = nn.Parameter(head_weight(h, d, dh))
        self.W_K = nn.Parameter(head_weight(kv, d, dh))
        self.W_V = nn.Parameter(head_weight(kv, d, dh))
        self.W_O = nn.Parameter(torch.empty(d, h * dh).T.unflatten(0, (h, dh)))  # [head, d_head, d_model]
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(kv, dh))
        self.b_V = nn.Parameter(torch.zeros(kv, dh))
        self.b_O = nn.Parameter(torch.zeros(d))

        self.layer = layer
        self.window = cfg.attn_windows[layer]
        self.scale = cfg.scores_scale / (layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        # The explicit path divides by this, as TransformerLens does (q·k / attn_scale), so a
        # pattern recomputed from cached q and k the TransformerLens way matches bit for bit.
        self.attn_scale = (math.sqrt(dh) if cfg.attn_scale is None else cfg.attn_scale) * (
            layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1
        )
        self.rotary = cfg.positional_embedding == "rotary"
        self.softcap = cfg.attn_logit_softcap
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:  # never folded: an RMSNorm with its own weight, whatever the model's norms
            self.q_norm = RMSNorm(cfg.replace(d_model=dh if cfg.qk_norm == "head" else h * dh))
            self.k_norm = RMSNorm(cfg.replace(d_model=dh if cfg.qk_norm == "head" else kv * dh))

        # TransformerLens's ungroup_grouped_query_attention (set by the model from its config):
        # k and v are projected per query head (W_K, W_V repeated over each group), so hook_k,
        # hook_v and the keys and values attention reads have n_heads heads.
        self.ungroup = False
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if self.rotary:
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, pos, key_pos], masked with -inf, pre-softmax
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]

    # TransformerLens's state dicts: GQA key/value weights as _W_K, _b_K, _W_V, _b_V, and the
    # buffers its attention keeps (a mask, IGNORE, rotary tables) that are not weights here.
    _TL_GQA = ("_W_K", "_b_K", "_W_V", "_b_V")
    _TL_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """``load_state_dict`` (strict too) takes TransformerLens's names: ``_W_K`` ... for
        ``W_K`` ..., and its attention buffers are dropped."""
        for name in self._TL_GQA:
            if prefix + name in state_dict and prefix + name[1:] not in state_dict:
                state_dict[prefix + name[1:]] = state_dict.pop(prefix + name)
        for name in self._TL_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def explicit(self) -> bool:
        """Whether the pattern must be materialised for an observer."""
        return self.hook_attn_scores.observed or self.hook_pattern.observed or self.softcap is not None

    def forward(
        self,
        q_in: Input,
        k_in: KVInput,
        v_in: KVInput,
        mask: AttentionMask,
        cos_sin: CosSin | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Attention of the queries of ``q_in`` over the keys and values of ``k_in`` and ``v_in``.

        Args:
            q_in: the normalised residual [batch, pos, d_model], or one per head [batch, pos, head, d_model].
            k_in: the same for the keys (per kv head when per head).
            v_in: the same for the values.
            mask: which keys each query may attend to (causal, window, padding).
            cos_sin: the rotary tables of a rotary model (None otherwise).
            kv_cache: this layer's cache of earlier keys/values (generation), extended in place.

        Returns:
            The attention output [batch, pos, d_model] (the sum over heads, plus ``b_O``).
        """
        q = self.hook_q(project(q_in, self.W_Q, self.b_Q))  # [batch, pos, head, d_head]
        kv_weights: tuple[torch.Tensor, ...] = (self.W_K, self.b_K, self.W_V, self.b_V)
        if self.ungroup and self.n_kv_heads != self.n_heads:
            if self.qk_norm == "all":
                raise ValueError(
                    "ungroup_grouped_query_attention with a k norm over the whole projection (OLMo 2's) is "
                    "not implemented: the norm reads the grouped keys; leave it False for this model"
                )
            group = self.n_heads // self.n_kv_heads
            kv_weights = tuple(t.repeat_interleave(group, dim=0) for t in kv_weights)
        W_K, b_K, W_V, b_V = kv_weights
        k = self.hook_k(project(k_in, W_K, b_K))  # [batch, pos, kv_head, d_head] (head if ungrouped)
        v = self.hook_v(project(v_in, W_V, b_V))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "all":  # over [head * d_head]
            q = self.q_norm(q.flatten(-2)).unflatten(-1, q.shape[-2:])
            k = self.k_norm(k.flatten(-2)).unflatten(-1, k.shape[-2:])
        if self.rotary:
            assert cos_sin is not None, "a rotary attention layer needs the rotary cos/sin"
            q = self.hook_rot_q(rotate(q, cos_sin))
            k = self.hook_rot_k(rotate(k, cos_sin))

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head|kv_head, pos, d_head]
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)  # now over all key positions so far

        if not self.explicit:
            z = self._fused(q, k, v, mask)
        elif self.softcap is None and self.hook_attn_scores.only_read and self.hook_pattern.only_read:
            # Only read (the cache): the output as unobserved (fused), the pattern shown to the
            # readers computed explicitly, so model(x) and run_with_cache(x) agree to the bit.
            self._pattern(q, k, mask)
            z = self._fused(q, k, v, mask)
        else:
            z = self._explicit(q, k, v, mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]

        if self.hook_result.observed:
            result = self.hook_result(
                einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            )
            return result.sum(-2) + self.b_O
        return linear(z.flatten(-2), self.W_O.flatten(0, 1).T, self.b_O)

    def _fused(self, q, k, v, mask: AttentionMask) -> Float[torch.Tensor, "batch head pos d_head"]:
        attn_mask = mask.sdpa_mask(self.window)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and mask.is_causal_for_sdpa,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def _pattern(self, q, k, mask: AttentionMask) -> Float[torch.Tensor, "batch head pos key_pos"]:
        """The attention pattern, through ``hook_attn_scores`` and ``hook_pattern``."""
        batch, n_heads, pos, d_head = q.shape
        # Query heads grouped by the kv head they read, so one matmul per kv head serves the
        # whole group without copying keys/values: [batch, kv_head, group * pos, d_head].
        # TransformerLens's order: scores = q·k / attn_scale, then soft-cap, mask, softmax.
        q = q.reshape(batch, k.shape[1], -1, d_head)
        scores = (q @ k.transpose(-1, -2)).view(batch, n_heads, pos, -1)  # [batch, head, pos, key_pos]
        scores.div_(self.attn_scale)  # in place: a fresh tensor
        if self.softcap is not None:
            scores = softcap(scores, self.softcap)
        scores.masked_fill_(mask.disallowed(self.window), float("-inf"))  # in place: a fresh tensor
        scores = self.hook_attn_scores(scores)
        return self.hook_pattern(scores.softmax(-1, dtype=torch.float32).to(q.dtype))

    def _explicit(self, q, k, v, mask: AttentionMask) -> Float[torch.Tensor, "batch head pos d_head"]:
        batch, n_heads, pos, d_head = q.shape
        pattern = self._pattern(q, k, mask)
        z = pattern.reshape(batch, v.shape[1], -1, pattern.shape[-1]) @ v  # [batch, kv_head, group * pos, d_head]
        return z.view(batch, n_heads, pos, d_head)
