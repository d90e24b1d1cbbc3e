"""Transformer blocks: sequential residual (GPT-2, GPT-Neo, Llama, NeoX without parallel
residual) and parallel residual (Pythia / NeoX).

    Sequential                              Parallel
    resid_pre ─┬──────────────┐             resid_pre ─┬─────────────────────┐
               ln1 → attn     │                        ├ ln1 → attn ──┐      │
               └─── + ◄───────┘                        └ ln2 → mlp ───┤      │
    resid_mid ─┬──────────────┐                                       + ◄────┘
               ln2 → mlp      │             resid_post
               └─── + ◄───────┘
    resid_post

Norm placement (``cfg.norm_placement``): "pre" as drawn; "both" (Gemma 2/3) also normalises
each output before it is added, ``resid + ln1_post(attn(ln1(resid)))`` and likewise
``ln2_post`` for the MLP; "post" (OLMo 2) has only those, ``resid + ln1_post(attn(resid))``
(``ln1`` / ``ln2`` are then identities without hooks). ``hook_attn_out`` / ``hook_mlp_out``
are after the post-norms: what the block adds to the residual stream, as in TransformerLens.

Per-head inputs: when ``hook_attn_in`` / ``hook_q_input`` / ``hook_k_input`` /
``hook_v_input`` is observed, the block gives every head its own copy of the residual
([batch, pos, head, d_model]) so a hook can patch one head's input; otherwise all
heads share one tensor and attention runs one matmul per projection. With GQA, a
key/value head's input is the ``attn_in`` of the first query head in its group (with
``ungroup``, TransformerLens's ``ungroup_grouped_query_attention``, each query head has its own).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from ..config import ModelConfig
from ..hooks import HookPoint
from .attention import Attention
from .kv_cache import LayerKVCache
from .masks import AttentionMask
from .mlp import make_mlp
from .norms import NORMS, make_norm
from .rotary import CosSin

Resid = Float[torch.Tensor, "batch pos d_model"]


class Block(nn.Module):
    """What every block has: norms, attention, MLP and their hook points (see the module docstring).

    Args:
        cfg: the architecture (norm placement, attention-only, MLP kind).
        layer: the block index.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.group_size = cfg.n_heads, cfg.group_size
        self.ungroup = False  # set by the model from cfg.ungroup_grouped_query_attention
        pre, post = cfg.norm_placement in ("pre", "both"), cfg.norm_placement in ("both", "post")
        self.ln1 = make_norm(cfg) if pre else nn.Identity()
        self.attn = Attention(cfg, layer)
        has_mlp = not cfg.attn_only
        self.ln2 = make_norm(cfg) if pre and has_mlp else nn.Identity()
        self.mlp = make_mlp(cfg) if has_mlp else nn.Identity()
        if post:  # fold_ln cannot fold a norm that sits after its writer: these keep their weight
            self.ln1_post, self.ln2_post = post_norm(cfg), post_norm(cfg)
        else:
            self.ln1_post, self.ln2_post = nn.Identity(), nn.Identity()
        # copy_input: the site's input is read elsewhere too (the previous site, the skip
        # connection, attn_in beside the per-head inputs), so an in-place edit in a hook
        # must not reach those readers: it has exactly the effect of returning the edit.
        self.hook_resid_pre = HookPoint(copy_input=True)
        self.hook_attn_in = HookPoint()
        self.hook_q_input = HookPoint(copy_input=True)
        self.hook_k_input, self.hook_v_input = HookPoint(), HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_in = HookPoint(copy_input=True)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def attention(
        self, resid: Resid, mask: AttentionMask, cos_sin: CosSin | None, kv_cache: LayerKVCache | None
    ) -> Resid:
        """``hook_attn_out(ln1_post(attn(ln1(resid))))``, with per-head inputs only when observed.

        Args:
            resid: the residual stream [batch, pos, d_model].
            mask: which keys each query may attend to.
            cos_sin: the rotary tables (None without rotary).
            kv_cache: this layer's KV cache (generation), or None.
        """
        if not (
            self.hook_attn_in.observed
            or self.hook_q_input.observed
            or self.hook_k_input.observed
            or self.hook_v_input.observed
        ):
            x = self.ln1(resid)
            return self.hook_attn_out(self.ln1_post(self.attn(x, x, x, mask, cos_sin, kv_cache)))
        b, p, d = resid.shape
        attn_in = self.hook_attn_in(resid[:, :, None, :].expand(b, p, self.n_heads, d).clone())
        kv_in = attn_in if self.ungroup else attn_in[:, :, :: self.group_size]
        q_in = self.hook_q_input(attn_in)  # editing hooks get a copy: k_in / v_in are taken from attn_in
        k_in = self.hook_k_input(kv_in.clone())
        v_in = self.hook_v_input(kv_in.clone())
        out = self.attn(self.ln1(q_in), self.ln1(k_in), self.ln1(v_in), mask, cos_sin, kv_cache)
        return self.hook_attn_out(self.ln1_post(out))


class SequentialBlock(Block):
    """A block whose MLP reads the residual after attention (GPT-2, Llama,
    ...); ``cfg`` and ``layer`` as in ``Block``.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.hook_resid_mid = HookPoint()

    def forward(
        self, resid_pre: Resid, mask: AttentionMask, cos_sin: CosSin | None = None, kv_cache: LayerKVCache | None = None
    ) -> Resid:
        """``resid_pre`` [batch, pos, d_model] -> resid_post: attention then MLP, each added to the
        residual; ``mask``, ``cos_sin`` and ``kv_cache`` as in ``Block.attention``.
        """
        resid_pre = self.hook_resid_pre(resid_pre)
        resid_mid = self.hook_resid_mid(resid_pre + self.attention(resid_pre, mask, cos_sin, kv_cache))
        mlp_out = self.hook_mlp_out(self.ln2_post(self.mlp(self.ln2(self.hook_mlp_in(resid_mid)))))
        return self.hook_resid_post(resid_mid + mlp_out)


class ParallelBlock(Block):
    """A block whose attention and MLP both read ``resid_pre`` (Pythia / NeoX)."""

    def forward(
        self, resid_pre: Resid, mask: AttentionMask, cos_sin: CosSin | None = None, kv_cache: LayerKVCache | None = None
    ) -> Resid:
        """``resid_pre`` [batch, pos, d_model] -> ``resid_pre + attn_out + mlp_out``; ``mask``,
        ``cos_sin`` and ``kv_cache`` as in ``Block.attention``.
        """
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attention(resid_pre, mask, cos_sin, kv_cache)
        mlp_out = self.hook_mlp_out(self.ln2_post(self.mlp(self.ln2(self.hook_mlp_in(resid_pre)))))
        return self.hook_resid_post(resid_pre + attn_out + mlp_out)


class AttnOnlyBlock(Block):
    """An attention-only block (TransformerLens's toy models): ``resid_post = resid_pre + attn_out``;
    no MLP, no ln2, and its MLP sites and resid_mid never fire."""

    def forward(
        self, resid_pre: Resid, mask: AttentionMask, cos_sin: CosSin | None = None, kv_cache: LayerKVCache | None = None
    ) -> Resid:
        """``resid_pre`` [batch, pos, d_model] -> ``resid_pre + attn_out``; ``mask``, ``cos_sin`` and
        ``kv_cache`` as in ``Block.attention``.
        """
        resid_pre = self.hook_resid_pre(resid_pre)
        return self.hook_resid_post(resid_pre + self.attention(resid_pre, mask, cos_sin, kv_cache))


def post_norm(cfg: ModelConfig) -> nn.Module:
    """The norm of ``cfg``'s kind with its weight, also after ``fold_ln`` (which leaves post-norms alone)."""
    return NORMS[cfg.normalization_type.removesuffix("Pre")](cfg)


def make_block(cfg: ModelConfig, layer: int) -> Block:
    """Block ``layer`` of the architecture ``cfg`` (the residual layout and norms it says)."""
    if cfg.attn_only:
        return AttnOnlyBlock(cfg, layer)
    return ParallelBlock(cfg, layer) if cfg.parallel_residual else SequentialBlock(cfg, layer)
