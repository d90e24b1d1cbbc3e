"""HookedTransformer: embeddings -> blocks -> final norm -> unembedding, with a hook
point on every site (see hooks.py and DESIGN.md for the names) and TransformerLens's
API for running, caching and tokenizing.

Architecture lives in the components and ModelConfig; this file only wires them up,
turns user input into tokens, positions and a mask, and exposes weights stacked over
layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import nn

from . import sites
from . import tokens as tokens_lib  # as a module: `tokens` names the token tensor in forward
from .components import AttentionMask, Embed, KVCache, PosEmbed, Rotary, Unembed, make_block, make_norm
from .config import TL_SWITCHES, ModelConfig
from .factored_matrix import FactoredMatrix
from .hooks import HookedRootModule, HookPoint
from .tl.config import HookedTransformerConfig
from .tl.config import init_weights as init_tl_weights
from .tokens import ModelInput, TextInput
from .utils import check_index, check_layer, lm_cross_entropy_loss

ReturnType = Literal["logits", "loss", "both", None]


class HookedTransformer(HookedRootModule):
    def __init__(
        self,
        cfg: ModelConfig | HookedTransformerConfig | dict,
        tokenizer: Any = None,
        move_to_device: bool = True,
        default_padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        """A model of the architecture ``cfg``. A ``ModelConfig`` builds it with uninitialised
        weights (loaders fill them); a TransformerLens ``HookedTransformerConfig`` (or its dict)
        builds it as TransformerLens does: weights initialised by ``init_weights`` (unless
        ``cfg.init_weights`` is False), in ``cfg.dtype``, moved to ``cfg.device``."""
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
        self.blocks = nn.ModuleList(make_block(cfg, layer) for layer in range(cfg.n_layers))
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
        super()._apply(fn, recurse)
        self._note_device()
        if self.cfg.device_map is not None and len({p.device for p in self.parameters()}) == 1:
            self._set_placement(None)
        return self

    # Placement over devices (see loading/placement.py) ---------------------------------
    def _set_placement(self, device_map: dict[str, str] | None) -> None:
        """Record where each group is; the forward moves the residual stream to each block's
        device before the block runs (and nowhere else). None: one device."""
        self.cfg = self.cfg.replace(device_map=dict(device_map) if device_map is not None else None)
        if device_map is None:
            self._block_devices = None
            return
        self._block_devices = [torch.device(device_map[f"blocks.{L}"]) for L in range(self.cfg.n_layers)]
        self._final_device = torch.device(device_map["final"])

    _block_devices: list[torch.device] | None = None
    # This rank's stage when the blocks are split over processes (loading/pipeline.py: a
    # PipelineStage, set by the loader), None in one process.
    _stage: Any = None

    @property
    def block_devices(self) -> list[torch.device]:
        """The device each block runs on (where its KV cache lives)."""
        if self._block_devices is not None:
            return list(self._block_devices)
        offload = getattr(self, "_offload", None)
        return [offload.device if offload is not None else self.device] * self.cfg.n_layers

    @staticmethod
    def _moved_to(
        device: torch.device,
        mask: AttentionMask,
        cos_sin: Any,
        copies: dict[tuple[torch.device, int], tuple[AttentionMask, Any]],
    ) -> tuple[AttentionMask, Any]:
        """The mask and rotary tables on ``device`` (made once per forward per device and table)."""
        if device == mask.device:
            return mask, cos_sin
        key = (device, id(cos_sin))
        if key not in copies:
            key_is_real = mask.key_is_real.to(device) if mask.key_is_real is not None else None
            copies[key] = (
                AttentionMask(mask.q_len, mask.k_len, key_is_real, device),
                tuple(t.to(device) for t in cos_sin) if cos_sin is not None else None,
            )
        return copies[key]

    # Loading (see loading.py) -----------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        device: Any = None,
        dtype: torch.dtype | str = torch.float32,
        **kwargs: Any,
    ) -> "HookedTransformer":
        """Load a preset name, HF repo id, local HF directory, converted checkpoint or .gguf
        file, with TransformerLens's default weight processing (see processing.py).

        Also takes TransformerLens's ``hf_model`` (a transformers model in memory),
        ``tokenizer``, ``default_prepend_bos``, ``default_padding_side``, ``torch_dtype`` and
        ``move_to_device``; ``device_map`` / ``max_memory`` / ``n_devices`` / ``offload`` /
        ``pipeline_ranks``; ``compile=True`` for a compiled forward (see ``loading.load_model``)."""
        from .loading import load_model

        return load_model(
            name_or_path,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            device=device,
            dtype=dtype,
            **kwargs,
        )

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path: str, **kwargs: Any) -> "HookedTransformer":
        """Load with weights exactly as the checkpoint has them (no folding or centring)."""
        flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
        return cls.from_pretrained(name_or_path, **{**flags, **kwargs})

    def tie_embeddings(self) -> None:
        """Make ``W_U`` a view of ``W_E`` (one copy in memory), as a tied checkpoint is."""
        self.unembed.W_U = nn.Parameter(self.embed.W_E.T, requires_grad=self.embed.W_E.requires_grad)

    @property
    def device(self) -> torch.device:
        stage = self._stage  # split over processes: another rank may hold the embeddings
        return stage.device if stage is not None else self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        stage = self._stage
        return stage.dtype if stage is not None else self.embed.W_E.dtype

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

        ``input``: a string, a list of strings (padded; the mask comes with them), or tokens
        [batch, pos] / [pos]. With ``start_at_layer``, ``input`` is the residual stream
        [batch, pos, d_model] entering that block (pass ``tokens`` for a loss).
        ``attention_mask``: 1 for real tokens, 0 for padding (either side); positions count
        real tokens only, so a padded row gives the logits it gives alone. Without it, token
        ids from a tokenizer that pads on the left have their leading pad tokens masked, as
        TransformerLens does (see ``tokens.left_padding_mask``).
        ``stop_at_layer``: return the residual stream entering that block (before it runs).
        ``return_type``: "logits", "loss" (mean next-token cross-entropy), "both" or None.

        Split over processes (``from_pretrained(..., pipeline_ranks=k)``, loading/pipeline.py):
        every rank calls the model with the same input; rank 0 returns the output, the other
        ranks return None.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        stage = self._stage
        if stage is not None and (start_at_layer, stop_at_layer, past_kv_cache) != (None, None, None):
            raise ValueError(
                "this model is split over processes (pipeline_ranks): start_at_layer, stop_at_layer and a KV "
                "cache (generate) are not supported; load it in one process (or with device_map) for those"
            )
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
        else:
            if not isinstance(input, torch.Tensor) or input.ndim != 3 or input.shape[-1] != self.cfg.d_model:
                shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(
                    f"with start_at_layer, input is the residual stream [batch, pos, d_model="
                    f"{self.cfg.d_model}], got {shape}"
                )
            resid = input
            if resid.dtype != self.dtype:
                raise ValueError(
                    f"the residual stream is {resid.dtype} but the model is {self.dtype}; pass resid.to({self.dtype})"
                )
            batch, q_len = resid.shape[:2]
            if attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, (batch, q_len))

        positions, mask = self._positions_and_mask(batch, q_len, attention_mask, past_kv_cache, device=self.device)
        if start_at_layer is None and (stage is None or stage.owns("embed")):
            resid = self.hook_embed(self.embed(tokens))
            if self.cfg.positional_embedding == "learned":
                resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        elif start_at_layer is None:
            resid = None  # type: ignore[assignment]  # another rank embeds: stage.enter receives the stream
        cos_sin = self.rotary(positions, self.dtype) if self.cfg.positional_embedding == "rotary" else None
        # Gemma 3: the windowed layers rotate with their own base.
        cos_sin_local = self.rotary_local(positions, self.dtype) if hasattr(self, "rotary_local") else cos_sin

        placed = self._block_devices
        copies: dict[tuple[torch.device, int], tuple[AttentionMask, Any]] = {}
        shape = (batch, q_len, self.cfg.d_model)
        for layer in range(start, stop):
            if stage is not None:  # split over processes: the stream crosses to the next rank here
                resid = stage.enter(layer, resid, shape)
                if resid is None:
                    continue  # another rank's block
            kv = past_kv_cache[layer] if past_kv_cache is not None else None
            local = self.cfg.attn_windows[layer] is not None
            layer_cos_sin = cos_sin_local if local else cos_sin
            if placed is None:
                resid = self.blocks[layer](resid, mask, layer_cos_sin, kv)
            else:  # the residual stream moves between blocks, only here
                resid = resid.to(placed[layer])
                resid = self.blocks[layer](resid, *self._moved_to(placed[layer], mask, layer_cos_sin, copies), kv)
        if past_kv_cache is not None:
            past_kv_cache.advance(q_len, attention_mask)
        if stop < n:
            return resid
        if stage is not None:
            resid = stage.enter(n, resid, shape)
            out = None if resid is None else self._head(resid, return_type, tokens, attention_mask, loss_per_token)
            return stage.deliver(out)
        return self._head(resid, return_type, tokens, attention_mask, loss_per_token)

    def _head(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        return_type: ReturnType,
        tokens: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        loss_per_token: bool,
    ) -> Any:
        """The final norm, the unembedding and the loss, as ``return_type`` asks."""
        placed = self._block_devices
        if placed is not None:
            resid = resid.to(self._final_device)
        resid = self.ln_final(resid)
        if return_type is None:  # e.g. a prefill, or a run for its hooks: skip the unembedding
            return None
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("a loss needs the tokens: pass tokens=... together with start_at_layer")
        if placed is not None:
            tokens = tokens.to(logits.device)
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

    # Tokens (see tokens.py) --------------------------------------------------------------
    def tokens_and_mask(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [batch, pos] on the model's device, checked, and the padding mask (or None)."""
        return tokens_lib.tokens_and_mask(
            self.tokenizer, self.cfg, input, prepend_bos, padding_side, attention_mask, self.device
        )

    def _check_mask(self, attention_mask: Any, shape: tuple[int, int]) -> torch.Tensor:
        return tokens_lib.check_mask(attention_mask, shape, self.device)

    def to_tokens(
        self,
        input: TextInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids [batch, pos]; a list of strings is padded (see ``to_tokens_and_mask``)."""
        return tokens_lib.to_tokens(
            self.tokenizer,
            self.cfg,
            input,
            prepend_bos,
            padding_side,
            self.device if move_to_device else "cpu",
            truncate,
        )

    def to_tokens_and_mask(
        self, input: TextInput, prepend_bos: bool | None = None, padding_side: Literal["left", "right"] | None = None
    ):
        """(tokens, attention_mask) for a padded batch; the mask is all ones without padding."""
        tokens, mask = tokens_lib.tokenize(self.tokenizer, self.cfg, input, prepend_bos, padding_side, self.device)
        return tokens, torch.ones_like(tokens) if mask is None else mask

    def to_string(self, tokens: Int[torch.Tensor, "... pos"] | int | Sequence[int]) -> str | list[str]:
        return tokens_lib.to_string(self.tokenizer, tokens)

    def to_str_tokens(
        self,
        input: str | torch.Tensor | Sequence[int],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        return tokens_lib.to_str_tokens(self.tokenizer, self.cfg, input, prepend_bos, padding_side)

    def to_single_token(self, string: str) -> int:
        return tokens_lib.to_single_token(self.tokenizer, self.cfg, string)

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        return tokens_lib.get_token_position(
            self.tokenizer, self.cfg, single_token, input, mode, prepend_bos, padding_side
        )

    # Weights stacked over layers -------------------------------------------------------
    def _stack(self, path: str) -> torch.Tensor:
        def get(block: nn.Module) -> torch.Tensor:
            obj: Any = block
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj

        return torch.stack([get(block) for block in self.blocks])

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[torch.Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> Float[torch.Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` concatenated (learned positions only, as ``W_pos``)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]:
        return self.unembed.b_U

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

        A string (one token) or an int gives [d_model]; a tensor (or list) of ids of shape
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
        for block in blocks[:layer]:
            bias = bias + block.attn.b_O
            if include_mlp_biases and not self.cfg.attn_only:
                bias = bias + block.mlp.b_out
        if mlp_input and not self.cfg.parallel_residual:
            bias = bias + blocks[layer].attn.b_O
        return bias

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``: one label per attention head, in the order of
        ``cache.stack_head_results``."""
        return [f"L{L}H{h}" for L in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def loss_fn(
        self,
        logits: Float[torch.Tensor, "batch pos d_vocab"],
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` on ``tokens`` (as ``return_type="loss"``)."""
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
        """``HookedRootModule.run_with_cache`` (same arguments), with the activations in an
        ``ActivationCache`` (DLA, stacking, TransformerLens's indexing) as TransformerLens does.

        Split over processes (``pipeline_ranks``): each rank caches the sites of its blocks and
        sends them to rank 0, which returns the output and the whole cache; the other ranks
        return (None, None). Rank 0 holds only its own blocks' weights, so cache methods that
        read other blocks' weights (per-head results from ``W_O``) need those sites cached."""
        if self._stage is not None and kwargs.get("incl_bwd"):
            raise ValueError("incl_bwd: gradients do not cross the ranks of a model split over processes")
        out, store = super().run_with_cache(
            *model_args, return_cache_object=False, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if self._stage is not None:
            store = self._stage.gather_cache(store, kwargs.get("device"))
            if store is None:
                return None, None
        if not return_cache_object:
            return out, store
        from .cache import ActivationCache  # the cache builds on the model: imported when used

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
        """TransformerLens's ``input_to_embed``: (the residual stream entering block 0, the
        tokens, None (no shortformer positions here), the attention mask), through
        ``hook_embed`` / ``hook_pos_embed`` as the forward computes them; pass the residual to
        ``model(resid, start_at_layer=0, attention_mask=mask)``."""
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
        """Select ``attn.hook_result`` (each head's output, [batch, pos, head, d_model]) by default."""
        self._switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Select ``hook_q_input``, ``hook_k_input`` and ``hook_v_input`` (per head) by default."""
        self._switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Select ``hook_attn_in`` (the attention input, per head) by default."""
        self._switch("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Select ``hook_mlp_in`` (a copy of the residual the MLP reads) by default."""
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
        """Run calls of the model through ``torch.compile`` (its keyword arguments, e.g.
        ``backend``, ``mode``), and return the model. Call it last (after loading, processing
        and moving).

        Hooks still fire, with the numbers of the eager path: each site's hook functions run
        eagerly (``torch.compiler.disable``), so the compiled graph never traces user code and
        a hook sees and replaces the real activation. Which sites are observed is part of the
        compiled function's guards (a site's hook lists are read to choose the path): a new
        set of observed sites compiles its graphs (an observed site is a graph break), a set
        seen before reuses them (the code resuming after a break may compile once more when
        first reached from another set), and past torch's recompile limit (8 per frame) a
        frame runs eagerly: slower, never wrong. Decoding
        steps with a KV cache (``generate``) run eagerly: every step has a new length.
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
        replaceable (``site.value = ...``) or a ``break`` away from stopping; see trace.py."""
        from .trace import Trace

        return Trace(self, *args, names_filter=names_filter, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Sample a continuation with a preallocated KV cache; see generate.generate."""
        from .generate import generate

        return generate(self, *args, **kwargs)
