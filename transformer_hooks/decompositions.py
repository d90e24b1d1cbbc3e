"""The residual stream taken apart: ``ActivationCache``'s stacking and decomposition methods.

A mixin of ``cache.ActivationCache`` (which holds the activations and looks them up); the
methods are TransformerLens's, with its names, signatures and labels, so DLA and logit
lens code ported from it runs unchanged. The residual stream entering layer ``L`` is a
sum of parts, and every method here returns a stack of such parts, ``[component,
*batch_and_pos, d_model]``::

    resid_pre[L] = embed (+ pos_embed) + sum_{l<L} (attn_out[l] + mlp_out[l])        decompose_resid
    attn_out[l]  = sum_head result[l, head] + b_O[l],  result = z · W_O              stack_head_results
    mlp_out[l]   = sum_neuron post[l, neuron] * W_out[l, neuron] + b_out[l]          stack_neuron_results
    resid_pre[L] = heads + neurons + embed (+ pos_embed) + bias                      get_full_resid_decomposition

Labels (as TL's): ``"embed"``, ``"pos_embed"``, ``"3_attn_out"``, ``"3_mlp_out"``,
``"L3H7"`` (head 7 of layer 3), ``"L3N7"`` (neuron), ``"bias"``, ``"3_pre"``, ``"3_mid"``,
``"final_post"``, ``"remainder"``.

A ``layer`` argument of a stacking method counts the blocks whose outputs are included:
``0..n_layers``, where ``n_layers`` (or ``-1`` or ``None``) means everything, the input
to the unembedding; other negative values count back from there (``-2``: the input to
the last block). Architecture notes: parallel-residual blocks (Pythia) have no
``resid_mid`` (attention and MLP both read ``resid_pre``), and rotary models have no
``pos_embed``; the stacks simply leave those parts out.

Arguments the methods share: ``pos_slice`` keeps only those positions (an int, a (start,
stop) tuple, a slice or indices, as ``utils.Slice``; an int drops the position dim);
``return_labels`` also returns the rows' labels, ``(stack, labels)``; ``apply_ln`` puts
the stack through the norm that reads ``layer``'s input with its cached scale
(``apply_ln_to_stack``); ``mlp_input`` means the input to ``layer``'s MLP instead of its
attention; ``incl_remainder`` adds a ``"remainder"`` row, the rest of the residual stream,
so the rows sum to it.

Per-head results are computed from the cached ``z`` and ``W_O`` when
``attn.hook_result`` was not cached (run_with_cache leaves it out by default).

Post-norms (Gemma 2/3, OLMo 2: ``ln1_post`` / ``ln2_post`` on each output before it is
added): ``attn_out`` and ``mlp_out`` are after them, and a head's, a neuron's or a bias's
*direct* contribution is what it adds to the residual stream through the post-norm with the
scale ``s`` cached in the forward pass, ``result · w / s`` (RMSNorm), the way
``apply_ln_to_stack(..., apply_weight=True)`` treats the final norm. With ``s`` fixed the post-norm is linear, so
every decomposition above still sums exactly; the ``bias`` row then varies with position.
With ``final_logit_softcap`` the logits are ``c * tanh(x / c)`` of the unembedded
residual ``x``: the attributions here (``logit_attrs``) are of ``x``, before the cap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int

from . import sites
from .components.stack import held
from .protocol import HookedModel
from .utils import Slice, SliceInput, check_index, check_layer

Stack = Float[torch.Tensor, "component *batch_and_pos d_model"]
Tokens = str | int | Sequence[int] | Sequence[str] | Int[torch.Tensor, "..."]

logger = logging.getLogger("transformer_hooks.cache")  # ActivationCache's methods: the cache's logger
# Where the position axis is, counted from the end (so with or without the batch axis).
_RESID_POS = sites.BY_NAME["hook_resid_pre"].position_dim
_SCALE_POS = sites.BY_NAME["ln1.hook_scale"].position_dim


class ResidualDecompositions:
    """The stacking and decomposition methods of ``ActivationCache``, on the activations it
    holds (``cache_dict``) and the model they came from (``model``)."""

    model: HookedModel
    cache_dict: dict[str, torch.Tensor]
    has_batch_dim: bool
    has_pos_embed: bool

    @property
    def cfg(self) -> Any:
        """The model's config; ValueError for a cache made with ``model=None``."""
        if self.model is None:
            raise ValueError(
                "this ActivationCache was made with model=None: pass the model to use what reads the "
                "architecture (short keys like ('resid_pre', 0), decompositions, apply_ln_to_stack)"
            )
        return self.model.cfg

    def _get(self, key: Any, needed_by: str | None = None) -> torch.Tensor:
        """The activation ``key`` names; ``needed_by`` names the method for the error message."""
        raise NotImplementedError  # ActivationCache looks activations up

    # Layer arguments --------------------------------------------------------------------
    def _stack_layer(self, layer: int | None, what: str = "layer") -> int:
        """A ``layer`` as stacking methods take it: the number of blocks included, 0..n_layers."""
        n = self.cfg.n_layers
        if layer is None:
            return n
        return check_index(
            layer,
            n + 1,
            what,
            f"a model with {n} layers",
            note=f"here it counts the blocks whose outputs are included, 0..{n}; {n}, -1 or None: "
            f"all of them, the input to the unembedding; negative values count back from there",
        )

    def _check_mlp_input(self, layer: int, mlp_input: bool) -> None:
        if mlp_input and layer == self.cfg.n_layers:
            raise ValueError(
                f"mlp_input=True means the input to layer {layer}'s MLP, but layer={layer} is the "
                f"unembedding (there are {self.cfg.n_layers} layers); pass a layer below {layer}"
            )

    def _attn_before_mlp(self, layer: int, mlp_input: bool) -> bool:
        """Whether layer's attention output is in the residual stream its MLP reads."""
        return mlp_input and sites.SEQUENTIAL.holds(self.cfg)

    def _resid_entering(self, layer: int, mlp_input: bool = False) -> torch.Tensor:
        """The residual stream that ``layer``'s attention (or, with mlp_input, MLP) reads."""
        if layer == self.cfg.n_layers:
            return self._get(("resid_post", layer - 1))
        if self._attn_before_mlp(layer, mlp_input):
            return self._get(("resid_mid", layer))
        return self._get(("resid_pre", layer))

    # Residual stream stacks ---------------------------------------------------------------
    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Stack | tuple[Stack, list[str]]:
        """The residual stream at each point up to the input of ``layer``: ``[component, ..., d_model]``.

        Rows are ``resid_pre`` of each block (``"3_pre"``), with ``incl_mid`` also
        ``resid_mid`` (``"3_mid"``), and for the full model the final ``resid_post``
        (``"final_post"``), which is what the final norm reads. ``mlp_input`` adds
        ``resid_mid`` of ``layer`` itself. Parallel-residual blocks have no ``resid_mid``,
        so ``incl_mid`` adds nothing there. ``pos_slice`` and ``return_labels`` as in the module docstring.

        ``apply_ln``: as TransformerLens 3.9 does. At the final layer (the default), each row
        goes through the final norm with its own statistics (``apply_ln_to_stack(...,
        recompute_ln=True)``: a logit lens). At an earlier layer, every row is divided by the
        cached scale of the norm that reads ``layer``'s input: the last row is then exactly
        what that norm computes; earlier rows share its scale. (``decompose_resid`` and
        ``stack_head_results`` keep the cached scale at every layer: it is what makes
        contributions add up to the logits.)
        """
        layer = self._stack_layer(layer)
        self._check_mlp_input(layer, mlp_input)
        pos_slice = Slice.unwrap(pos_slice)
        n = self.cfg.n_layers
        has_mid = sites.BY_NAME["hook_resid_mid"].when.holds(self.cfg)
        parts, labels = [], []
        for L in range(layer + 1):
            if L == n:
                parts.append(self._get(("resid_post", n - 1), "accumulated_resid"))
                labels.append("final_post")
                continue
            parts.append(self._get(("resid_pre", L), "accumulated_resid"))
            labels.append(f"{L}_pre")
            if has_mid and ((incl_mid and L < layer) or (mlp_input and L == layer)):
                parts.append(self._get(("resid_mid", L), "accumulated_resid"))
                labels.append(f"{L}_mid")
        stack = torch.stack(_one_device([pos_slice.apply(p, dim=_RESID_POS) for p in parts]))
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, recompute_ln=layer == n
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Stack | tuple[Stack, list[str]]:
        """The residual stream entering ``layer`` as the outputs that wrote it.

        ``embed``, ``pos_embed`` (learned positions), then ``attn_out`` and ``mlp_out`` of
        each block before ``layer`` (``mode`` keeps only one kind); ``mlp_input`` adds
        ``layer``'s own ``attn_out`` (sequential blocks; a parallel block's MLP reads
        ``resid_pre``). With ``mode="all"`` and ``incl_embeds`` the rows sum to that
        residual stream exactly. ``apply_ln``, ``pos_slice`` and ``return_labels`` as in the
        module docstring.
        """
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        layer = self._stack_layer(layer)
        self._check_mlp_input(layer, mlp_input)
        pos_slice = Slice.unwrap(pos_slice)
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and sites.BY_NAME["hook_mlp_out"].when.holds(self.cfg)  # not attention-only
        parts, labels = [], []
        if incl_embeds:
            parts.append(self._get("hook_embed", "decompose_resid"))
            labels.append("embed")
            if self.has_pos_embed:
                parts.append(self._get("hook_pos_embed", "decompose_resid"))
                labels.append("pos_embed")
        for L in range(layer):
            if incl_attn:
                parts.append(self._get(("attn_out", L), "decompose_resid"))
                labels.append(f"{L}_attn_out")
            if incl_mlp:
                parts.append(self._get(("mlp_out", L), "decompose_resid"))
                labels.append(f"{L}_mlp_out")
        if incl_attn and self._attn_before_mlp(layer, mlp_input):
            parts.append(self._get(("attn_out", layer), "decompose_resid"))
            labels.append(f"{layer}_attn_out")
        stack = self._stack_parts(parts, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _stack_parts(self, parts: list[torch.Tensor], pos_slice: Slice) -> Stack:
        if parts:
            return torch.stack(_one_device([pos_slice.apply(p, dim=_RESID_POS) for p in parts]))
        return self._empty_stack(pos_slice)

    def _empty_stack(self, pos_slice: Slice) -> Stack:
        """A stack with no components, shaped like the others (for layer=0)."""
        like = pos_slice.apply(self._get("hook_embed"), dim=_RESID_POS)
        return like.new_zeros((0, *like.shape))

    # Attention heads ------------------------------------------------------------------------
    def _head_results(
        self, layer: int, pos_slice: Slice, needed_by: str
    ) -> Float[torch.Tensor, "*batch_and_pos head d_model"]:
        """result = z · W_O per head, from the cache if hook_result was cached."""
        name = sites.BY_NAME["attn.hook_result"].full_name(layer)
        if name in self.cache_dict:
            return pos_slice.apply(self.cache_dict[name], dim=sites.BY_NAME["attn.hook_result"].position_dim)
        z = pos_slice.apply(self._get(("z", layer), needed_by), dim=sites.BY_NAME["attn.hook_z"].position_dim)
        block: Any = self.model.blocks[layer]  # nn.ModuleList types its items as plain Modules
        W_O = _like(held(block.attn.W_O, f"blocks.{layer}.attn.W_O"), z)
        return einsum(z, W_O, "... head d_head, head d_head d_model -> ... head d_model")

    def compute_head_results(self) -> None:
        """Store every layer's per-head results (``attn.hook_result``) in the cache, from z and W_O."""
        missing = [L for L in range(self.cfg.n_layers) if f"blocks.{L}.attn.hook_result" not in self.cache_dict]
        if not missing:
            logger.warning("compute_head_results: the head results are already cached")
        for L in missing:
            self.cache_dict[f"blocks.{L}.attn.hook_result"] = self._head_results(L, Slice(None), "compute_head_results")

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput | Slice = None,
        apply_ln: bool = False,
    ) -> Stack | tuple[Stack, list[str]]:
        """Each head's output (``z · W_O``, without ``b_O``) for the blocks before ``layer``:
        ``[layer * n_heads, ..., d_model]``, ordered layer-major (``"L0H0", "L0H1", ...``).

        ``incl_remainder`` adds the rest of the residual stream entering ``layer``
        (``"remainder"``), so the rows sum to it. ``return_labels``, ``pos_slice`` and
        ``apply_ln`` as in the module docstring.
        """
        layer = self._stack_layer(layer)
        pos_slice = Slice.unwrap(pos_slice)
        labels = [f"L{L}H{h}" for L in range(layer) for h in range(self.cfg.n_heads)]
        per_layer = [
            self._through_post_norm(
                self._head_results(L, pos_slice, "stack_head_results"), L, "ln1_post", pos_slice, "stack_head_results"
            )
            for L in range(layer)
        ]
        return self._components_stack(per_layer, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def _components_stack(
        self,
        per_layer: list[torch.Tensor],
        labels: list[str],
        layer: int,
        pos_slice: Slice,
        incl_remainder: bool,
        apply_ln: bool,
        return_labels: bool,
    ) -> Stack | tuple[Stack, list[str]]:
        """Per-layer [..., component, d_model] results -> [component, ..., d_model], with the
        optional remainder row and final norm."""
        if per_layer:
            stack = rearrange(
                torch.cat(_one_device(per_layer), dim=-2), "... component d_model -> component ... d_model"
            )
        else:
            stack = self._empty_stack(pos_slice)
        if incl_remainder:
            stack, labels = self._with_remainder(stack, labels, layer, False, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _with_remainder(
        self, stack: Stack, labels: list[str], layer: int, mlp_input: bool, pos_slice: Slice
    ) -> tuple[Stack, list[str]]:
        total = pos_slice.apply(self._resid_entering(layer, mlp_input), dim=_RESID_POS)
        total = total.to(stack.device)
        return torch.cat([stack, (total - stack.sum(0))[None]]), labels + ["remainder"]

    # MLP neurons ----------------------------------------------------------------------------
    def get_neuron_results(
        self, layer: int, neuron_slice: SliceInput | Slice = None, pos_slice: SliceInput | Slice = None
    ) -> Float[torch.Tensor, "*batch_and_pos neuron d_model"]:
        """Each neuron's write to the residual stream, ``post[..., n] * W_out[n]`` (through ``ln2_post``
        with its cached scale, if the block has one), for block ``layer``: [*batch_and_pos,
        neuron, d_model], for the neurons ``neuron_slice`` keeps (a ``utils.Slice``) at the
        positions ``pos_slice`` keeps."""
        layer = check_layer(layer, self.cfg.n_layers)
        neuron_slice, pos_slice = _keep_dim(Slice.unwrap(neuron_slice)), Slice.unwrap(pos_slice)
        post = self._get(("post", layer), "get_neuron_results")
        post = pos_slice.apply(post, dim=sites.BY_NAME["mlp.hook_post"].position_dim)
        post = neuron_slice.apply(post, dim=-1)
        block: Any = self.model.blocks[layer]  # nn.ModuleList types its items as plain Modules
        W_out = neuron_slice.apply(_like(held(block.mlp.W_out, f"blocks.{layer}.mlp.W_out"), post), dim=0)
        return self._through_post_norm(post[..., None] * W_out, layer, "ln2_post", pos_slice, "get_neuron_results")

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: SliceInput | Slice = None,
        neuron_slice: SliceInput | Slice = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ) -> Stack | tuple[Stack, list[str]]:
        """Each neuron's output (without ``b_out``) for the blocks before ``layer``:
        ``[layer * neurons, ..., d_model]``, labels ``"L3N7"``. Memory grows as
        d_mlp x d_model per position: slice positions or neurons for large models.
        ``neuron_slice`` keeps those neurons of each layer (a ``utils.Slice``); ``pos_slice``,
        ``return_labels``, ``incl_remainder`` and ``apply_ln`` as in the module docstring.
        """
        layer = self._stack_layer(layer)
        neuron_slice, pos_slice = _keep_dim(Slice.unwrap(neuron_slice)), Slice.unwrap(pos_slice)
        neurons = neuron_slice.indices(self.cfg.d_mlp).tolist()
        labels = [f"L{L}N{n}" for L in range(layer) for n in neurons]
        per_layer = [self.get_neuron_results(L, neuron_slice, pos_slice) for L in range(layer)]
        return self._components_stack(per_layer, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    # The whole residual stream --------------------------------------------------------------
    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        return_labels: bool = False,
    ) -> Stack | tuple[Stack, list[str]]:
        """The residual stream entering ``layer`` as every head, every neuron (or, without
        ``expand_neurons``, every MLP), the embeddings and one ``"bias"`` row, in that order.

        ``bias`` is ``model.accumulated_bias``: every ``b_O`` (and ``b_out`` when neurons are
        expanded; otherwise each ``mlp_out`` row carries its own). The rows sum to the
        residual stream exactly; with ``apply_ln`` they sum to the norm's ``hook_normalized``
        exactly (``apply_ln_to_stack``: before the norm's weight and bias, as TransformerLens).
        So, for the full model of a folded model, ``stack.sum(0) @ W_U + b_U`` are the logits.
        ``mlp_input``, ``pos_slice`` and ``return_labels`` as in the module docstring.
        """
        layer = self._stack_layer(layer)
        self._check_mlp_input(layer, mlp_input)
        pos_slice = Slice.unwrap(pos_slice)
        head_layers = layer + 1 if self._attn_before_mlp(layer, mlp_input) else layer
        heads, labels = self.stack_head_results(head_layers, pos_slice=pos_slice, return_labels=True)
        parts = [heads]
        if layer:
            if expand_neurons:
                mlps, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                mlps, mlp_labels = self.decompose_resid(
                    layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
                )
            parts.append(mlps)
            labels += mlp_labels
        embeds, embed_labels = self.decompose_resid(0, pos_slice=pos_slice, return_labels=True)
        parts.append(embeds)
        labels += embed_labels
        parts.append(self._bias_row(layer, mlp_input, expand_neurons, pos_slice, embeds)[None])
        labels.append("bias")
        stack = torch.cat(_one_device(parts))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _bias_row(
        self, layer: int, mlp_input: bool, include_mlp_biases: bool, pos_slice: Slice, like: torch.Tensor
    ) -> Float[torch.Tensor, "*batch_and_pos d_model"]:
        """The output biases in the residual stream entering ``layer`` (``model.accumulated_bias``);
        with post-norms, each through its post-norm with the cached scale, so it depends on the position."""
        shape = like.shape[1:]
        if self.cfg.norm_placement == "pre":
            return _like(self.model.accumulated_bias(layer, mlp_input, include_mlp_biases), like).expand(shape)
        biases = [(L, "ln1_post", "attn.b_O") for L in range(layer)]
        biases += [(L, "ln2_post", "mlp.b_out") for L in range(layer) if include_mlp_biases]
        if self._attn_before_mlp(layer, mlp_input):
            biases.append((layer, "ln1_post", "attn.b_O"))
        row = like.new_zeros(shape)
        for L, norm_name, bias_name in biases:
            bias = _like(held(self.model.blocks[L].get_parameter(bias_name), f"blocks.{L}.{bias_name}"), like)
            bias = bias.expand(shape)
            row = row + self._through_post_norm(bias, L, norm_name, pos_slice, "get_full_resid_decomposition")
        return row

    def _through_post_norm(
        self,
        x: Float[torch.Tensor, "*batch_and_pos ... d_model"],
        layer: int,
        norm_name: str,
        pos_slice: Slice,
        needed_by: str,
    ) -> Float[torch.Tensor, "*batch_and_pos ... d_model"]:
        """``x`` (a part of what block ``layer``'s attention or MLP outputs) through that output's
        post-norm (RMSNorm) with its cached scale: ``w * x / s``. Unchanged without a post-norm."""
        norm = getattr(self.model.blocks[layer], norm_name)
        if not hasattr(norm, "hook_scale"):
            return x
        if getattr(norm, "centre", False):
            raise NotImplementedError(
                f"blocks.{layer}.{norm_name} is a LayerNorm post-norm; the decomposition "
                f"through post-norms is implemented for RMSNorm (Gemma 2/3, OLMo 2)"
            )
        scale = pos_slice.apply(self._get(f"blocks.{layer}.{norm_name}.hook_scale", needed_by), dim=-2)
        scale = scale.reshape(*scale.shape[:-1], *[1] * (x.ndim - scale.ndim + 1))  # over x's component dims
        out = x / scale  # the cached scale is float32
        w = getattr(norm, "w", None)
        return (out if w is None else out * _like(w, out)).to(x.dtype)

    # Norms ------------------------------------------------------------------------------------
    def _norm(self, layer: int, mlp_input: bool) -> Any:
        if layer == self.cfg.n_layers:
            return self.model.ln_final
        block = self.model.blocks[layer]
        return block.ln2 if mlp_input else block.ln1

    def apply_ln_to_stack(
        self,
        residual_stack: Float[torch.Tensor, "... d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
        apply_weight: bool = False,
    ) -> Float[torch.Tensor, "... d_model"]:
        """What each component of a residual stack contributes to the normalised residual
        ``hook_normalized`` of the norm that reads ``layer``'s input (``ln_final`` for the full
        model; ``ln1``, or ``ln2`` with ``mlp_input``), using the scale ``s`` cached in the
        forward pass, as TransformerLens computes it::

            LayerNorm: c -> (c - mean(c)) / s         RMSNorm: c -> c / s

        (the identity where no norm reads the stream, as in OLMo 2's blocks). The norm's weight
        ``w`` and bias ``b`` are left out, as in TransformerLens: on a folded model they are in
        the next weights already, so the result is the same folded or not only after
        ``process_weights_``. ``apply_weight=True`` (not in TransformerLens) also multiplies by
        ``w``: what the next matmul reads on an unfolded model (``logit_attrs`` uses it). The
        norm is linear in its input once ``s`` is fixed, so for a stack that sums to the
        residual stream the rows sum *exactly* to ``hook_normalized`` (times ``w`` with
        ``apply_weight``). Rows that are not parts of this residual stream (e.g. earlier
        layers' ``accumulated_resid``) are divided by this scale too, as in TransformerLens.

        The stack is ``[..., *batch_and_pos, d_model]`` with any number of leading
        component dims; its batch/pos dims must be those of the cached scale after
        ``pos_slice`` (pass the ``pos_slice`` the stack was built with) and ``batch_slice``
        (the examples the stack has, a ``utils.Slice``). ``residual_stack``: the stack;
        ``has_batch_dim=False``: it has no batch dim (one example, picked by ``batch_slice``)
        though the cache has one.

        ``recompute_ln`` (TransformerLens's argument and default): at the final layer, put each
        component through the final norm with statistics recomputed from that component
        (weight and bias included, as the norm computes them) instead of the cached scale:
        a logit lens of each row. The rows then no longer add up to the norm's output.
        """
        d_model = self.cfg.d_model
        if residual_stack.shape[-1] != d_model:
            raise ValueError(
                f"apply_ln_to_stack takes a stack of residual-stream vectors [..., d_model={d_model}], "
                f"got shape {tuple(residual_stack.shape)}. Apply the norm before projecting onto a "
                f"direction, and keep d_model as the last dimension"
            )
        layer = self._stack_layer(layer)
        self._check_mlp_input(layer, mlp_input)
        pos_slice, batch_slice = Slice.unwrap(pos_slice), Slice.unwrap(batch_slice)
        norm = self._norm(layer, mlp_input)
        if recompute_ln and layer == self.cfg.n_layers:
            from .components.norms import normalize

            if self.has_batch_dim and has_batch_dim and batch_slice.mode != "empty":
                residual_stack = batch_slice.apply(residual_stack, dim=1)
            w, b = getattr(norm, "w", None), getattr(norm, "b", None)
            out = normalize(
                residual_stack,
                self.cfg.norm_centres,
                norm.eps,
                _like(w, residual_stack.float()) if w is not None else None,
                _like(b, residual_stack.float()) if b is not None else None,
            )
            return out.to(residual_stack.dtype)
        scale_name = (
            "ln_final.hook_scale"
            if layer == self.cfg.n_layers
            else f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}.hook_scale"
        )
        if hasattr(norm, "hook_scale"):
            scale = pos_slice.apply(self._get(scale_name, "apply_ln_to_stack"), dim=_SCALE_POS)  # [*batch_and_pos, 1]
        else:  # no norm reads this stream (OLMo 2's blocks normalise only their outputs): the identity
            scale = torch.ones_like(pos_slice.apply(self._resid_entering(layer, mlp_input)[..., :1], dim=_SCALE_POS))
        if self.has_batch_dim and batch_slice.mode != "empty":
            if has_batch_dim:
                residual_stack = batch_slice.apply(residual_stack, dim=residual_stack.ndim - scale.ndim)
            scale = batch_slice.apply(scale, dim=0)
        k = scale.ndim - 1
        if residual_stack.ndim < k + 1 or residual_stack.shape[residual_stack.ndim - 1 - k : -1] != scale.shape[:-1]:
            raise ValueError(
                f"the stack's batch/pos dims end in {tuple(residual_stack.shape[:-1])}, but the "
                f"cached {scale_name} has batch/pos dims {tuple(scale.shape[:-1])} after "
                f"pos_slice={pos_slice!r}, batch_slice={batch_slice!r}: pass the pos_slice (and "
                f"batch_slice) the stack was built with"
            )
        from .components.norms import normalize

        out = normalize(residual_stack, self.cfg.norm_centres, scale=scale)  # float32, as the cached scale is
        w = getattr(norm, "w", None)
        if apply_weight and w is not None:
            out = out * _like(w, out)
        return out.to(residual_stack.dtype)

    # Logits -----------------------------------------------------------------------------------
    def logit_attrs(
        self,
        residual_stack: Float[torch.Tensor, "... d_model"],
        tokens: Tokens,
        incorrect_tokens: Tokens | None = None,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
    ) -> Float[torch.Tensor, "..."]:
        """Each component's direct effect on the logit of ``tokens`` (minus that of
        ``incorrect_tokens``): ``apply_ln_to_stack(stack) · (W_U[:, tokens] - W_U[:, incorrect])``.

        ``b_U`` is not included (it belongs to no component). Tokens may be strings (each
        one token), ids, or a tensor of ids ``[batch]`` (one per example) or ``[batch, pos]``.
        ``residual_stack``, ``pos_slice``, ``batch_slice`` and ``has_batch_dim`` as in
        ``apply_ln_to_stack``.
        """
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got directions of shape "
                    f"{tuple(directions.shape)} and {tuple(wrong.shape)}"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(
            residual_stack,
            -1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
            apply_weight=True,  # the unembedding reads w * x̂ on an unfolded model
        )
        if has_batch_dim and scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None]  # one direction per example, the same at every position
        return (scaled * _like(directions, scaled)).sum(-1)


def _one_device(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Activations of a model placed over several devices, all on the first one's device
    (a no-op on one device), so they stack."""
    return [p.to(parts[0].device) for p in parts] if parts else parts


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A weight on ``like``'s device and dtype; detached unless ``like`` carries a graph,
    so stacks built from a detached cache carry none either."""
    t = held(t, "a weight of this decomposition")
    t = t.to(like.device, like.dtype)
    return t if like.requires_grad else t.detach()


def _keep_dim(s: Slice) -> Slice:
    """An int neuron slice keeps its dim (layers are concatenated along it)."""
    return Slice([s.slice]) if s.mode == "int" else s
