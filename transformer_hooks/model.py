"""HookedTransformer: embeddings -> blocks -> final norm -> unembedding, with a hook
point on every site (see hooks.py and DESIGN.md for the names) and TransformerLens's
API for running, caching and tokenizing.

Architecture lives in the components and ModelConfig; this file only wires them up and
turns user input into tokens, positions and a mask. The weights stacked over layers, the
QK/OV circuits and residual directions are weight_views.py's mixin.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import nn

from . import generate as generate_lib  # as a module: `generate` is the method
from . import sites
from . import tokens as tokens_lib  # as a module: `tokens` names the token tensor in forward
from .cache import ActivationCache
from .components import AttentionMask, Block, Embed, KVCache, PosEmbed, Rotary, Unembed, make_block, make_norm
from .components.stack import BlockStack, Placement
from .config import TL_SWITCHES, ModelConfig
from .hooks import HookedRootModule, HookPoint
from .protocol import HookedModel
from .tl.config import HookedTransformerConfig
from .tl.config import init_weights as init_tl_weights
from .tokens import ModelInput, TokenMethods
from .trace import Trace
from .utils import check_layer, lm_cross_entropy_loss
from .weight_views import WeightViews

ReturnType = Literal["logits", "loss", "both", None]


class HookedTransformer(HookedRootModule, TokenMethods, WeightViews):
    """A decoder-only transformer with a hook point on every site of the site table.

    Usually made by ``HookedTransformer.from_pretrained(name)``; built directly from a config
    it has the architecture ``cfg`` describes.

    Args:
        cfg: a ``ModelConfig`` (weights uninitialised: a loader fills them), or a TransformerLens
            ``HookedTransformerConfig`` or its dict (weights initialised as TransformerLens does,
            unless ``cfg.init_weights`` is False, in ``cfg.dtype``, on ``cfg.device``).
        tokenizer: a Hugging Face tokenizer for string inputs (default: none, tokens only).
        move_to_device: with a TransformerLens config, move the weights to ``cfg.device``.
        default_padding_side: ``"left"`` or ``"right"`` for batches of strings (default: the
            tokenizer's, else right).
    """

    blocks: BlockStack  # how the blocks run: one device, or the mode loading/ installed (components/stack.py)

    def __init__(
        self,
        cfg: ModelConfig | HookedTransformerConfig | dict,
        tokenizer: Any = None,
        move_to_device: bool = True,
        default_padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        """Build the model: ``cfg``, ``tokenizer``, ``move_to_device`` and ``default_padding_side`` as in the class
        docstring.
        """
        super().__init__()
        tl_cfg = None
        if not isinstance(cfg, ModelConfig):
            tl_cfg = HookedTransformerConfig.unwrap(cfg)
            cfg = tl_cfg.to_model_config()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding == "learned":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        else:
            self.rotary = Rotary(cfg)
            if cfg.local_rope_theta is not None:
                self.rotary_local = Rotary(cfg, local=True)
        self.blocks = BlockStack(make_block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = Unembed(cfg)
        self.setup_hooks()
        self._note_device()
        self._tl_cfg = tl_cfg
        if tl_cfg is not None:
            if tl_cfg.init_weights:
                init_tl_weights(self, tl_cfg)
            if tl_cfg.dtype is not None:
                self.to(tl_cfg.dtype)
            if move_to_device and tl_cfg.device is not None:
                self.to(tl_cfg.device)
        if default_padding_side is not None and tokenizer is not None:
            self.set_tokenizer(tokenizer, default_padding_side)

    def _note_device(self) -> None:
        if self.cfg.device != str(self.device):
            self.cfg = self.cfg.replace(device=str(self.device))

    def _apply(self, fn: Any, recurse: bool = True) -> "HookedTransformer":
        """nn.Module's ``to``, ``cuda``, ``half``, ... all end here: keep ``cfg.device`` current
        (and drop a placement over devices once everything is on one)."""
        try:
            super()._apply(fn, recurse)
        except NotImplementedError as e:  # "Cannot copy out of meta tensor"
            if not any(p.is_meta for p in self.parameters()):
                raise
            raise ValueError(
                "this model holds other ranks' weights as meta tensors (split over processes: pipeline_ranks), so it "
                "cannot be moved: load it on each rank's device instead (from_pretrained(..., device=...); torchrun's "
                "local GPU under NCCL by default)"
            ) from e
        if self.placement.kind == "devices" and len({p.device for p in self.parameters()}) == 1:
            self.blocks = BlockStack(self.blocks)
        self._note_device()
        return self

    # Execution modes (installed by loading/: see components/stack.py) -----------------------
    @property
    def placement(self) -> Placement:
        """Where the weights are and how the blocks run (one device, devices, offload, pipeline)."""
        return self.blocks.placement

    @property
    def block_devices(self) -> list[torch.device]:
        """The device each block runs on (where its KV cache lives)."""
        return self.blocks.block_devices(self.device)

    def hold_weights(self, *names: str) -> "HookedTransformer":
        """Split over processes (``pipeline_ranks``): every rank calls it, and rank 0 then holds
        a copy of the parameters ``names`` of every block (``"attn.W_O"``, ``"mlp.W_out"``,
        ``"unembed.W_U"``: a name, its end after ``blocks.L.``, or a glob; none: every
        parameter), each sent by the rank that holds it. The weight views (``W_Q``, ``QK``,
        ``W_U``, ...) and the cache's methods that read weights (``stack_head_results``,
        ``logit_attrs``, ...) then work on rank 0 as in one process; the copies are frozen
        (gradients do not reach them). On one process there is nothing to copy. Returns the model."""
        named = {
            n: p
            for n, p in self.named_parameters()
            if not names or any(n == k or n.endswith("." + k) or fnmatch.fnmatchcase(n, k) for k in names)
        }
        if names and not named:
            raise ValueError(f"hold_weights{names}: no parameter has such a name (e.g. 'attn.W_O', 'unembed.W_U')")
        for name, t in self.blocks.hold_weights(named).items():
            module, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(module), leaf, nn.Parameter(t, requires_grad=False))
        return self

    # Loading (see loading.py) -----------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, options: Any = None, **kwargs: Any) -> "HookedTransformer":
        """Load a preset name, HF repo id, local HF directory, converted checkpoint or .gguf
        file, with TransformerLens's default weight processing (see processing.py).

        The default model, ``"smollm2-135m-instruct"``, is the embedded 4-bit (Q4_1) GGUF of
        SmolLM2-135M-Instruct (quantized weights, dequantized to ``dtype``).

        Args:
            name_or_path: preset name, ``org/name`` repo id, checkpoint directory or ``.gguf`` file.
            options: a ``loading.LoadOptions`` holding every option below at once; keyword
                arguments are its fields and replace its values.
            **kwargs: ``LoadOptions`` fields:
                ``fold_ln`` (default True: fold each norm's weight, and bias, into the layer that reads it),
                ``center_writing_weights`` (default True: centre the weights that write to the residual stream),
                ``center_unembed`` (default True: centre the unembedding; skipped, with a warning,
                for soft-capped logits),
                ``fold_value_biases`` (default True: fold the value biases into the output bias),
                ``device`` (the torch device of the weights; default cpu),
                ``dtype`` (``torch.float32`` by default; a name such as ``"bfloat16"`` works),
                ``tokenizer`` (a tokenizer to use instead of the checkpoint's),
                ``hf_model`` (a transformers model already in memory; ``name_or_path`` then only names it),
                ``default_prepend_bos`` (bool: whether string prompts start with BOS; default: the
                checkpoint's rule, ``tokens.default_prepend_bos``),
                ``default_padding_side`` (``"left"`` / ``"right"``),
                ``torch_dtype`` (TransformerLens's name for ``dtype``),
                ``move_to_device`` (False keeps the weights on the CPU),
                ``refactor_factored_attn_matrices`` (TransformerLens's QK/OV refactoring),
                ``device_map`` (``"auto"``, ``"balanced"`` or ``{group: device}``: whole blocks over devices),
                ``max_memory`` (``{device: bytes or "20GiB"}``), ``n_devices`` (how many devices to use),
                ``offload`` (``"cpu"`` or ``"disk"``: block weights kept off ``device``),
                ``offload_dir`` (where ``offload="disk"`` writes),
                ``pipeline_ranks`` (under torchrun: this many ranks each hold a range of blocks),
                ``pipeline_timeout`` (seconds a rank waits for another),
                ``quantize`` (``"int8"`` or ``"int4"`` with torchao, ``"bnb-int8"`` or
                ``"bnb-nf4"`` with bitsandbytes on CUDA: the attention and MLP matrices
                stored quantized; see ``loading/quantize.py``), and
                ``compile`` (True or ``torch.compile`` keyword arguments: a compiled forward).
        """
        from .loading import load_model

        return load_model(name_or_path, options, **kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path: str, **kwargs: Any) -> "HookedTransformer":
        """Load with weights exactly as the checkpoint has them (no folding or centring).

        Args:
            name_or_path: as in ``from_pretrained``.
            **kwargs: every other ``from_pretrained`` argument (``device``, ``dtype``, ``device_map``, ...).
        """
        flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
        return cls.from_pretrained(name_or_path, **{**flags, **kwargs})

    def tie_embeddings(self) -> None:
        """Make ``W_U`` a view of ``W_E`` (one copy in memory), as a tied checkpoint is."""
        self.unembed.W_U = nn.Parameter(self.embed.W_E.T, requires_grad=self.embed.W_E.requires_grad)

    @property
    def device(self) -> torch.device:
        """The device of the embeddings (where inputs go); split over processes, the placement's device."""
        where = self.placement.device  # split over processes: another rank may hold the embeddings
        return torch.device(where) if where is not None else self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (the embedding's)."""
        return self.embed.W_E.dtype

    # Forward --------------------------------------------------------------------------
    def forward(
        self,
        input: ModelInput | Float[torch.Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[torch.Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
    ) -> Any:
        """Run the model.

        Split over processes (``from_pretrained(..., pipeline_ranks=k)``, loading/pipeline.py):
        every rank calls the model with the same input; rank 0 returns the output, the other
        ranks return None. With ``stop_at_layer=L`` the residual stream stays on the rank that
        runs block L (a meta tensor of its shape elsewhere), where ``start_at_layer=L`` reads it.

        Args:
            input: a string, a list of strings (padded; the mask comes with them), or tokens
                [batch, pos] / [pos]. With ``start_at_layer``, the residual stream [batch, pos, d_model]
                entering that block.
            return_type: ``"logits"`` [batch, pos, d_vocab], ``"loss"`` (mean next-token
                cross-entropy), ``"both"`` (logits, loss) or None (the final norm runs, nothing is returned).
            loss_per_token: the loss per prediction, [batch, pos - 1], instead of its mean.
            prepend_bos: for string input, start each string with BOS (None: ``cfg.default_prepend_bos``).
            padding_side: for a list of strings, ``"left"`` or ``"right"`` (None: the tokenizer's).
            attention_mask: [batch, pos], 1 for real tokens, 0 for padding (either side); positions
                count real tokens only, so a padded row gives the logits it gives alone. Without it,
                token ids from a tokenizer that pads on the left have their leading pad tokens masked,
                as TransformerLens does (see ``tokens.left_padding_mask``).
            start_at_layer: run from this block on (``input`` is then the residual stream).
            stop_at_layer: return the residual stream entering this block (before it runs).
            tokens: with ``start_at_layer``, the token ids a loss is computed on.
            past_kv_cache: a ``KVCache`` that holds the earlier positions' keys and values; the new
                ones are written into it (``generate`` uses this).

        Raises:
            ValueError: an unknown ``return_type``, ``start_at_layer`` after ``stop_at_layer``, or a
                loss without tokens.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        self.blocks.check_call(start_at_layer, stop_at_layer, past_kv_cache)
        if self.cfg.n_kv_heads != self.cfg.n_heads:  # the switch lives on the (assignable) config
            for block in self.blocks:
                if isinstance(block, Block):
                    block.ungroup = block.attn.ungroup = self.cfg.ungroup_grouped_query_attention
        n = self.cfg.n_layers
        start = self._layer_index(start_at_layer, "start_at_layer") if start_at_layer is not None else 0
        stop = self._layer_index(stop_at_layer, "stop_at_layer", allow_end=True) if stop_at_layer is not None else n
        if start > stop:
            raise ValueError(
                f"start_at_layer={start_at_layer} comes after stop_at_layer={stop_at_layer}: nothing would run"
            )

        if start_at_layer is None:
            # Token ids from a left-padding tokenizer get TransformerLens's inferred padding mask
            # (tokens.left_padding_mask), except in a decoding step after a prefill.
            decoding = past_kv_cache is not None and past_kv_cache.length > 0
            tokens, attention_mask = tokens_lib.tokens_and_mask(
                self.tokenizer, self.cfg, input, prepend_bos, padding_side, attention_mask, self.device, not decoding
            )
            batch, q_len = tokens.shape
            self.blocks.check_same_input(tokens, attention_mask)
        else:
            resid = self._check_resid(input)
            batch, q_len = resid.shape[:2]
            if attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, (batch, q_len))
            if tokens is not None:  # the tokens a loss is computed on
                self.blocks.check_same_input(tokens, attention_mask)

        positions, mask = self._positions_and_mask(batch, q_len, attention_mask, past_kv_cache, device=self.device)
        if start_at_layer is None:
            resid = self.blocks.run_embed(lambda: self._embed(tokens, positions), (batch, q_len, self.cfg.d_model))
        cos_sin = self.rotary(positions, self.dtype) if self.cfg.positional_embedding == "rotary" else None
        # Gemma 3: the windowed layers rotate with their own base.
        cos_sin_local = self.rotary_local(positions, self.dtype) if hasattr(self, "rotary_local") else cos_sin
        rope = [cos_sin if window is None else cos_sin_local for window in self.cfg.attn_windows]
        resid = self.blocks(resid, mask, rope, start, stop, past_kv_cache)
        if past_kv_cache is not None:
            past_kv_cache.advance(q_len, attention_mask)
        if stop < n:
            return resid
        return self.blocks.run_head(
            lambda resid: self._head(resid, return_type, tokens, attention_mask, loss_per_token), resid
        )

    def _embed(self, tokens: torch.Tensor | None, positions: torch.Tensor) -> Float[torch.Tensor, "batch pos d_model"]:
        assert tokens is not None  # the forward embeds only when it has tokens
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding == "learned":
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        return resid

    def _check_resid(self, input: Any) -> Float[torch.Tensor, "batch pos d_model"]:
        """The residual stream given with ``start_at_layer``, checked."""
        if not isinstance(input, torch.Tensor) or input.ndim != 3 or input.shape[-1] != self.cfg.d_model:
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"with start_at_layer, input is the residual stream [batch, pos, d_model="
                f"{self.cfg.d_model}], got {shape}"
            )
        if input.dtype != self.dtype:
            raise ValueError(
                f"the residual stream is {input.dtype} but the model is {self.dtype}; pass resid.to({self.dtype})"
            )
        return input

    def _head(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        return_type: ReturnType,
        tokens: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        loss_per_token: bool,
    ) -> Any:
        """The final norm, the unembedding and the loss, as ``return_type`` asks."""
        resid = self.ln_final(resid)
        if return_type is None:  # e.g. a prefill, or a run for its hooks: skip the unembedding
            return None
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("a loss needs the tokens: pass tokens=... together with start_at_layer")
        tokens = tokens.to(logits.device)  # placed over devices: the unembedding's device
        attention_mask = attention_mask.to(logits.device) if attention_mask is not None else None
        loss = lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _layer_index(self, layer: int, what: str, allow_end: bool = False) -> int:
        return check_layer(layer, self.cfg.n_layers, what, allow_end=allow_end)

    def _positions_and_mask(
        self, batch: int, q_len: int, attention_mask: torch.Tensor | None, cache: KVCache | None, device: torch.device
    ) -> tuple[torch.Tensor, AttentionMask]:
        if attention_mask is None:
            positions = torch.arange(q_len, device=device).expand(batch, q_len)
        else:
            # Count real tokens only: a left-padded row starts at position 0 like an unpadded one.
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if cache is not None:
            positions = cache.continue_positions(positions)
        if self.cfg.positional_embedding == "learned" and int(positions.max()) >= self.cfg.n_ctx:
            raise ValueError(
                f"sequence of {int(positions.max()) + 1} positions is longer than this model's context "
                f"(n_ctx={self.cfg.n_ctx}, learned positions); truncate the input to "
                f"{self.cfg.n_ctx} tokens"
            )

        if cache is not None:
            return positions, AttentionMask(q_len, cache.length + q_len, cache.key_mask(q_len, attention_mask), device)
        key_is_real = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        return positions, AttentionMask(q_len, q_len, key_is_real, device)

    def loss_fn(
        self,
        logits: Float[torch.Tensor, "batch pos d_vocab"],
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` on ``tokens`` (as ``return_type="loss"``; see
        ``utils.lm_cross_entropy_loss``): only the predictions ``attention_mask`` keeps count;
        ``per_token`` returns [batch, pos - 1] instead of the mean.
        """
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=per_token)

    def set_tokenizer(self, tokenizer: Any, default_padding_side: Literal["left", "right"] = "right") -> None:
        """Use ``tokenizer`` (a HF tokenizer) for strings; ``default_padding_side`` pads batches."""
        if default_padding_side not in ("left", "right"):
            raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
        tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer

    # Caching ------------------------------------------------------------------------------
    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Run the model and return (output, cache) with the activations of the sites it selects.

        As ``hooks.HookedRootModule.run_with_cache``, with the activations in an ``ActivationCache``
        (DLA, stacking, TransformerLens's indexing) as TransformerLens does.

        Split over processes (``pipeline_ranks``): each rank caches the sites of its blocks and
        sends them to rank 0, which returns the output and the whole cache; the other ranks
        return (None, None). Rank 0 holds only its own blocks' weights: cache methods that read
        other blocks' weights (per-head results from ``W_O``, ``logit_attrs``) need
        ``model.hold_weights(...)`` called on every rank first (or those sites cached).

        Args:
            *model_args: the forward's positional arguments (``input``, ...).
            return_cache_object: an ``ActivationCache`` (True) or a plain dict of tensors.
            remove_batch_dim: drop the batch dimension (a batch of one).
            **kwargs: the forward's keyword arguments and ``HookedRootModule.run_with_cache``'s:
                ``names_filter``, ``device``, ``incl_bwd``, ``reset_hooks_end``, ``clear_contexts``,
                ``detach``, ``pos_slice`` (see there).
        """
        if self.placement.kind == "pipeline" and kwargs.get("incl_bwd"):
            raise ValueError(
                "incl_bwd calls backward() on rank 0's output, which other ranks cannot join on a model split over "
                "processes: for gradients at sites use the attribution functions (attribution_products, "
                "get_attr_patch_*), whose gradients cross the ranks, or model.blocks.grad(value, activations)"
            )
        out, store = super().run_with_cache(
            *model_args, return_cache_object=False, remove_batch_dim=remove_batch_dim, **kwargs
        )
        store = self.blocks.gather_cache(store, kwargs.get("device"))
        if store is None:  # split over processes: rank 0 has the cache
            return None, None
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)

    def _why_no_hook(self, name: str) -> str:
        return sites.why_absent(name, self.cfg)

    def init_weights(self) -> None:
        """TransformerLens's ``init_weights``: every weight initialised anew as its
        ``init_mode="gpt2"`` does (see ``tl.config.init_weights``), with the
        ``HookedTransformerConfig`` the model was built from (its seed and initializer_range),
        or TransformerLens's defaults for a model built from a ``ModelConfig``."""
        tl_cfg = self._tl_cfg
        if tl_cfg is None:
            c = self.cfg
            tl_cfg = HookedTransformerConfig(
                n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads
            )
        init_tl_weights(self, tl_cfg)

    @property
    def n_params_total(self) -> int:
        """Every parameter's element count (embeddings, biases and norms included), as
        TransformerLens's ``n_params_total``; ``cfg.n_params`` (TransformerLens configs) counts
        the attention and MLP weight matrices only."""
        return sum(p.numel() for p in self.parameters())

    def input_to_embed(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
    ) -> tuple[Float[torch.Tensor, "batch pos d_model"], torch.Tensor, None, torch.Tensor | None]:
        """TransformerLens's ``input_to_embed``: the residual stream entering block 0.

        Pass the residual to ``model(resid, start_at_layer=0, attention_mask=mask)``.

        Args:
            input: as in ``forward``; ``prepend_bos``, ``padding_side`` and ``attention_mask`` as there.
            past_kv_cache: a ``KVCache`` whose length offsets the positions (a decoding step).

        Returns:
            (residual [batch, pos, d_model] through ``hook_embed`` / ``hook_pos_embed`` as the forward
            computes it, the tokens, None (no shortformer positions here), the attention mask or None).
        """
        decoding = past_kv_cache is not None and past_kv_cache.length > 0
        tokens, attention_mask = tokens_lib.tokens_and_mask(
            self.tokenizer, self.cfg, input, prepend_bos, padding_side, attention_mask, self.device, not decoding
        )
        batch, q_len = tokens.shape
        positions, _ = self._positions_and_mask(batch, q_len, attention_mask, past_kv_cache, device=self.device)
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding == "learned":
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        return resid, tokens, None, attention_mask

    # TransformerLens switches ------------------------------------------------------------
    # In TransformerLens these sites run their hooks only once switched on. Here every site
    # always exists and costs nothing until observed; a switch decides whether run_with_cache()
    # with no names_filter, and a callable filter, select it (sites.py's tl_flag column), so
    # ported code gets TransformerLens's sites and shapes. A name (or a list) always selects it.
    @property
    def tl_flags(self) -> frozenset[str]:  # type: ignore[override]
        """The switches that are on: set here or on the config (``model.cfg.use_attn_result = True``)."""
        return frozenset(flag for flag in TL_SWITCHES if getattr(self.cfg, flag))

    def _switch(self, flag: str, on: bool) -> None:
        setattr(self.cfg, flag, on)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Whether ``attn.hook_result`` (each head's output, [batch, pos, head, d_model]) is selected by
        default (``use_attn_result``); a name always selects it.
        """
        self._switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Whether ``hook_q_input``, ``hook_k_input`` and ``hook_v_input`` (per head) are selected by
        default (``use_split_qkv_input``).
        """
        self._switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Whether ``hook_attn_in`` (the attention input, per head) is selected by default (``use_attn_in``)."""
        self._switch("use_attn_in", use_attn_in)

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        """GQA: repeat each key/value head for its query heads before ``hook_k`` / ``hook_v``
        (and ``hook_k_input`` / ``hook_v_input``), so those sites have ``n_heads`` heads and a
        hook can edit one query head's keys; the output is unchanged
        (``ungroup_grouped_query_attention``: on or off)."""
        self._switch("ungroup_grouped_query_attention", ungroup_grouped_query_attention)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Whether ``hook_mlp_in`` (a copy of the residual the MLP reads) is
        selected by default (``use_hook_mlp_in``).
        """
        self._switch("use_hook_mlp_in", use_hook_mlp_in)

    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> "HookedTransformer":
        """Apply TransformerLens's weight processing to this model, in place (see processing.py).

        Steps already applied are skipped, so a model loaded with ``from_pretrained`` is left as
        it is. The result equals loading with the same flags. Hooks are not carried over: remove
        them first. Processing holds a second copy of the weights while it runs.

        Args:
            fold_ln: fold each norm's weight (and bias) into the layer that reads it.
            center_writing_weights: centre the weights that write to the residual stream.
            center_unembed: centre the unembedding (skipped, with a warning, for soft-capped logits).
            fold_value_biases: fold the value biases into the output bias.
            refactor_factored_attn_matrices: TransformerLens's QK/OV refactoring.

        Returns:
            The model.
        """
        from .loading import ProcessingOptions, processed_copy  # lazy: loading builds on the model

        options = ProcessingOptions(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        hooked = sorted(n for n, hp in self.hook_dict.items() if hp.observed)
        if hooked:
            raise ValueError(
                f"process_weights_ rebuilds the model's modules, and hooks are attached to "
                f"{', '.join(hooked[:5])}{' ...' if len(hooked) > 5 else ''}: call "
                f"model.reset_hooks(including_permanent=True) first, then add them again"
            )
        processed = processed_copy(self, options)
        if processed is not self:
            self.cfg = processed.cfg
            for name, module in processed.named_children():
                setattr(self, name, module)
            self.setup_hooks()
        return self

    # Compiling (opt in) ---------------------------------------------------------------------
    # Unlike nn.Module.compile: keyword arguments only, and it returns the model.
    def compile(self, **compile_kwargs: Any) -> "HookedTransformer":  # type: ignore[override]
        """Run calls of the model through ``torch.compile`` and return the model.

        Call it last (after loading, processing and moving).

        Hooks still fire, with the numbers of the eager path: each site's hook functions run
        eagerly (``torch.compiler.disable``), so the compiled graph never traces user code and
        a hook sees and replaces the real activation. Which sites are observed is part of the
        compiled function's guards (a site's hook lists are read to choose the path): a new
        set of observed sites compiles its graphs (an observed site is a graph break), a set
        seen before reuses them (the code resuming after a break may compile once more when
        first reached from another set), and past torch's recompile limit (8 per frame) a
        frame runs eagerly: slower, never wrong. Decoding
        steps with a KV cache (``generate``) run eagerly: every step has a new length.

        Args:
            **compile_kwargs: ``torch.compile``'s keyword arguments (``backend``, ``mode``, ``fullgraph``, ...).
        """
        for hook_point in self.hook_dict.values():
            # this hook point's own forward (an instance attribute), run eagerly
            hook_point.forward = torch.compiler.disable(type(hook_point).forward.__get__(hook_point))  # type: ignore[method-assign]
        compiled = torch.compile(self._call_impl, **compile_kwargs)
        eager = self._call_impl

        def call(*args: Any, **kwargs: Any) -> Any:
            return eager(*args, **kwargs) if kwargs.get("past_kv_cache") is not None else compiled(*args, **kwargs)

        # nn.Module.__call__ runs this when set, as nn.Module.compile sets it.
        self._compiled_call_impl = call
        return self

    def trace(self, *args: Any, names_filter: Any = None, **kwargs: Any) -> Any:
        """``for site in model.trace(tokens): ...``: each activation of one forward, in order,
        replaceable (``site.value = ...``) or a ``break`` away from stopping; see trace.py.

        Args:
            *args: the forward's positional arguments (``input``, ...).
            names_filter: the sites to visit (a name, names, or a predicate; None: as ``run_with_cache``).
            **kwargs: the forward's keyword arguments (``return_type``, ``attention_mask``, ...).

        Not on a model split over processes (``pipeline_ranks``): a loop that breaks, or fails,
        on one rank would stop that rank's part of the forward while the others wait for it.
        """
        if self.placement.kind == "pipeline":
            raise ValueError(
                "model.trace steps through one process's forward, and this model is split over processes "
                "(pipeline_ranks): a break or an error on one rank would leave the others waiting. Use "
                "model.run_with_hooks(..., fwd_hooks=[(name, hook)]) to read or replace activations (every rank "
                "alike; each hook fires on the rank that runs its site) or model.run_with_cache(...) to read them"
            )
        return Trace(self, *args, names_filter=names_filter, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Continue the input by up to ``max_new_tokens`` tokens, with a preallocated KV cache.

        Hooks attached to the model fire on the prompt and on every step (a steering hook steers
        the whole continuation). The arguments are ``generate.generate``'s.

        Args:
            *args: ``input``, then any of the keyword arguments below in their order.
            **kwargs: ``generate.generate``'s arguments:
                ``input`` (a string, a list of strings, padded on the left, or tokens [batch, pos];
                default ``""``),
                ``max_new_tokens`` (default 10),
                ``stop_at_eos`` (default True: a row that emits an end token keeps emitting it;
                generation stops when every row has),
                ``eos_token_id`` (an id or a list of ids; default the tokenizer's),
                ``do_sample`` (default True; False is greedy),
                ``top_k`` (sample among the k most likely tokens; default None),
                ``top_p`` (nucleus sampling's probability mass; default None),
                ``temperature`` (default 1.0; 0 is greedy),
                ``freq_penalty`` (each token's logit minus ``freq_penalty`` times its count so far; default 0.0),
                ``use_past_kv_cache`` (default True; False reruns the whole sequence every step),
                ``prepend_bos`` (for strings; default the model's rule),
                ``padding_side`` (default ``"left"``),
                ``return_type`` (``"input"``, the default: strings for strings, tokens for tokens;
                ``"str"``; ``"tokens"``, [batch, pos + new], prompt included),
                ``verbose`` (default True: a progress bar), and
                ``attention_mask`` (for padded token rows).
        """
        return generate_lib.generate(self, *args, **kwargs)


if TYPE_CHECKING:  # mypy checks that the model has every member the runtime and workflows read
    _conforms: type[HookedModel] = HookedTransformer
