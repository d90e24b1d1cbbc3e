"""The weights of a ``HookedTransformer`` as TransformerLens exposes them: stacked over layers
(``W_Q`` [n_layers, head, d_model, d_head], ..., ``W_U``), each head's QK and OV circuit as a
``FactoredMatrix``, the residual direction a token's logit reads, and the output biases the
residual stream holds entering a block.

A mixin: ``HookedTransformer`` inherits it, and model.py keeps the wiring and the forward.
Every view is computed from the modules when read (nothing is stored twice). On a model
split over processes a view reads weights this rank holds: ``model.hold_weights(...)``
(every rank) gives rank 0 a copy of every block's; without it, a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import nn

from .components.stack import held
from .factored_matrix import FactoredMatrix
from .utils import check_index

if TYPE_CHECKING:
    from .components import Embed, PosEmbed, Unembed
    from .config import ModelConfig


class WeightViews:
    """Weight views of a model with ``cfg``, ``blocks``, ``embed``, ``pos_embed`` (learned
    positions) and ``unembed`` (``HookedTransformer``)."""

    if TYPE_CHECKING:  # what the views read; HookedTransformer sets or defines each
        cfg: ModelConfig
        blocks: nn.ModuleList
        embed: Embed
        pos_embed: PosEmbed
        unembed: Unembed

        @property
        def device(self) -> torch.device: ...
        @property
        def dtype(self) -> torch.dtype: ...
        def to_single_token(self, string: str) -> int: ...

    # Weights stacked over layers -------------------------------------------------------
    def _stack(self, path: str) -> torch.Tensor:
        def get(block: nn.Module) -> torch.Tensor:
            obj: Any = block
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj

        return torch.stack([held(get(block), f"blocks.{L}.{path}") for L, block in enumerate(self.blocks)])

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        """The token embedding [d_vocab, d_model]."""
        return held(self.embed.W_E, "embed.W_E")

    @property
    def W_pos(self) -> Float[torch.Tensor, "n_ctx d_model"]:
        """The learned position embedding [n_ctx, d_model] (learned-position models only)."""
        return held(self.pos_embed.W_pos, "pos_embed.W_pos")

    @property
    def W_E_pos(self) -> Float[torch.Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` concatenated (learned positions only, as ``W_pos``)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        """The unembedding [d_model, d_vocab]."""
        return held(self.unembed.W_U, "unembed.W_U")

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]:
        """The unembedding bias [d_vocab]."""
        return held(self.unembed.b_U, "unembed.b_U")

    W_Q = property(lambda self: self._stack("attn.W_Q"), doc="[n_layers, head, d_model, d_head]")
    W_K = property(lambda self: self._stack("attn.W_K"), doc="[n_layers, kv_head, d_model, d_head]")
    W_V = property(lambda self: self._stack("attn.W_V"), doc="[n_layers, kv_head, d_model, d_head]")
    W_O = property(lambda self: self._stack("attn.W_O"), doc="[n_layers, head, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn.b_Q"), doc="[n_layers, head, d_head]")
    b_K = property(lambda self: self._stack("attn.b_K"), doc="[n_layers, kv_head, d_head]")
    b_V = property(lambda self: self._stack("attn.b_V"), doc="[n_layers, kv_head, d_head]")
    b_O = property(lambda self: self._stack("attn.b_O"), doc="[n_layers, d_model]")
    W_in = property(lambda self: self._stack("mlp.W_in"), doc="[n_layers, d_model, d_mlp]")
    W_gate = property(lambda self: self._stack("mlp.W_gate"), doc="[n_layers, d_model, d_mlp] (gated MLPs)")
    W_out = property(lambda self: self._stack("mlp.W_out"), doc="[n_layers, d_mlp, d_model]")
    b_in = property(lambda self: self._stack("mlp.b_in"), doc="[n_layers, d_mlp]")
    b_out = property(lambda self: self._stack("mlp.b_out"), doc="[n_layers, d_model]")

    # Grouped key/value heads per query head, and residual-stream helpers (for DLA) ---------
    # W_K / W_V keep n_kv_heads (GQA is never repeated in storage). Query head h reads key/
    # value head h // group_size; these properties repeat each kv head for its query heads,
    # as a new tensor [n_layers, head, ...], so per-head circuits (W_Q[l, h] @ W_K[l, h].T,
    # W_V[l, h] @ W_O[l, h]) index one axis. For MHA they equal W_K / W_V.
    W_K_per_query_head = property(
        lambda self: self.W_K.repeat_interleave(self.cfg.group_size, dim=1),
        doc="[n_layers, head, d_model, d_head]: W_K repeated per query head",
    )
    W_V_per_query_head = property(
        lambda self: self.W_V.repeat_interleave(self.cfg.group_size, dim=1),
        doc="[n_layers, head, d_model, d_head]: W_V repeated per query head",
    )
    b_K_per_query_head = property(
        lambda self: self.b_K.repeat_interleave(self.cfg.group_size, dim=1),
        doc="[n_layers, head, d_head]: b_K repeated per query head",
    )
    b_V_per_query_head = property(
        lambda self: self.b_V.repeat_interleave(self.cfg.group_size, dim=1),
        doc="[n_layers, head, d_head]: b_V repeated per query head",
    )

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's QK circuit ``W_Q @ W_K.T`` [n_layers, head, d_model, d_model], factored:
        ``x_dest @ QK[l, h] @ x_src`` is that head's attention score before scaling and biases."""
        return FactoredMatrix(self.W_Q, self.W_K_per_query_head.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's OV circuit ``W_V @ W_O`` [n_layers, head, d_model, d_model], factored:
        ``x_src @ OV[l, h]`` is what that head writes for a source it attends to fully."""
        return FactoredMatrix(self.W_V_per_query_head, self.W_O)

    def tokens_to_residual_directions(
        self, tokens: str | int | Sequence[int] | Sequence[str] | torch.Tensor
    ) -> Float[torch.Tensor, "... d_model"]:
        """The residual direction each token's logit reads: ``W_U[:, token]``.

        ``tokens``: a string (one token) or an int gives [d_model]; a tensor (or list) of ids of shape
        [...] gives [..., d_model]. A string that is not one token raises and says how it
        tokenizes. The logit-difference direction is
        ``tokens_to_residual_directions(" Paris") - tokens_to_residual_directions(" London")``.
        """
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
            tokens = [self.to_single_token(t) for t in tokens]
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.W_U.device)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids or strings, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.d_vocab):
            raise ValueError(f"token ids must be in [0, {self.cfg.d_vocab}), got {ids.tolist()}")
        return self.W_U[:, ids].movedim(0, -1)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[torch.Tensor, " d_model"]:
        """The sum of the output biases (``b_O``, and ``b_out`` with ``include_mlp_biases``)
        written into the residual stream that enters block ``layer`` (0..n_layers; n_layers
        is the input to the unembedding). ``mlp_input``: the stream that block's MLP reads,
        which in a sequential block also holds its own ``b_O`` (a parallel block's MLP reads
        ``resid_pre``, so nothing is added there).

        With post-norms (Gemma 2/3, OLMo 2) a bias reaches the residual stream scaled by its
        post-norm, differently at each position: that needs a forward pass, and
        ``cache.get_full_resid_decomposition`` gives it (its ``"bias"`` row).
        """
        n = self.cfg.n_layers
        if self.cfg.norm_placement != "pre":
            raise ValueError(
                f"accumulated_bias: this model's biases pass through post-norms (norm_placement="
                f"{self.cfg.norm_placement!r}), so what they add depends on the input; use the "
                f"'bias' row of cache.get_full_resid_decomposition(...) instead"
            )
        check_index(
            layer,
            n,
            "layer",
            f"accumulated_bias of a model with {n} layers",
            allow_end=True,
            allow_negative=False,
            note=f"{n}: the unembedding",
        )
        if mlp_input and layer == n:
            raise ValueError(f"mlp_input=True needs a block below {n}; layer={n} is the unembedding")
        bias = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.dtype)
        blocks: list[Any] = list(self.blocks)  # nn.ModuleList types its items as plain Modules
        for L, block in enumerate(blocks[:layer]):
            bias = bias + held(block.attn.b_O, f"blocks.{L}.attn.b_O")
            if include_mlp_biases and not self.cfg.attn_only:
                bias = bias + held(block.mlp.b_out, f"blocks.{L}.mlp.b_out")
        if mlp_input and not self.cfg.parallel_residual:
            bias = bias + held(blocks[layer].attn.b_O, f"blocks.{layer}.attn.b_O")
        return bias

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``: one label per attention head, in the order of
        ``cache.stack_head_results``."""
        return [f"L{L}H{h}" for L in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]
