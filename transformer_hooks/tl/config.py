"""TransformerLens's ``HookedTransformerConfig``, so a tutorial's ``HookedTransformer(cfg)`` runs here.

It is only a spelling: ``to_model_config()`` maps its fields onto ``ModelConfig`` (the one
config the model reads), and settings this library does not implement are refused by name
rather than ignored. ``init_weights`` initialises a new model as TransformerLens does.

Field mapping (TransformerLens -> ModelConfig): ``positional_embedding_type`` "standard" ->
``positional_embedding="learned"``; ``n_key_value_heads`` -> ``n_kv_heads``; ``rotary_base``
-> ``rope_theta``; ``parallel_attn_mlp`` -> ``parallel_residual``; ``use_attn_scale=False`` ->
``attn_scale=1``; ``attn_scale`` (TransformerLens divides scores by it) -> ``attn_scale``;
``use_local_attn`` with ``attn_types`` / ``window_size`` -> ``attn_windows``. The
``use_attn_result`` / ``use_split_qkv_input`` / ``use_attn_in`` / ``use_hook_mlp_in`` switches
are accepted: here a site's hooks work without them (see the README).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..config import ModelConfig, NormType, PositionalEmbedding


@dataclass
class HookedTransformerConfig:
    """TransformerLens's model config (the fields its tutorials set; see ``to_model_config``)."""

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    model_name: str = "custom"
    n_heads: int = -1
    d_mlp: int | None = None
    act_fn: str | None = "relu"
    d_vocab: int = -1
    eps: float = 1e-5
    use_attn_result: bool = False
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_local_attn: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list | None = None
    init_mode: str = "gpt2"
    normalization_type: str | None = "LN"
    device: str | None = None
    n_devices: int = 1
    attention_dir: str = "causal"
    attn_only: bool = False
    seed: int | None = None
    initializer_range: float = -1.0
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    positional_embedding_type: str = "standard"
    final_rms: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    gated_mlp: bool = False
    default_prepend_bos: bool = True
    dtype: Any = None  # a torch.dtype; None: float32
    tokenizer_prepends_bos: bool | None = None
    n_key_value_heads: int | None = None
    ungroup_grouped_query_attention: bool = False
    post_embedding_ln: bool = False
    rotary_base: float = 10000
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    use_qk_norm: bool = False
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n_heads == -1:
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None and not self.attn_only:
            self.d_mlp = 4 * self.d_model
        if self.initializer_range < 0:  # TransformerLens: GPT-2's 0.02 scaled as sqrt(1/d_model); else a gain of 1
            self.initializer_range = 0.8 / math.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        # TransformerLens's count: attention and MLP weight matrices, no biases or norms.
        self.n_params = self.n_layers * self.d_model * self.d_head * self.n_heads * 4
        if not self.attn_only:
            assert self.d_mlp is not None  # set above when None
            self.n_params += self.n_layers * self.d_model * self.d_mlp * (2 + self.gated_mlp)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "HookedTransformerConfig":
        """A config from TransformerLens's dict form (its ``to_dict`` or a checkpoint's
        config.json); keys this class does not know are kept in ``extra`` and refused by
        ``to_model_config`` unless they are TransformerLens's defaults."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        config = dict(config)
        if isinstance(config.get("dtype"), str):  # "torch.float32" in a saved config
            import torch

            config["dtype"] = getattr(torch, config["dtype"].removeprefix("torch."))
        if "normalization" in config and "normalization_type" not in config:  # older toy-model configs
            config["normalization_type"] = config.pop("normalization")
        if "shortformer_pos" in config:
            config["positional_embedding_type"] = "shortformer" if config.pop("shortformer_pos") else "standard"
        extra = {k: config.pop(k) for k in list(config) if k not in known}
        missing = [k for k in ("n_layers", "d_model", "n_ctx", "d_head") if k not in config]
        if missing:
            raise ValueError(f"a TransformerLens config needs {missing}; it has {sorted(config)}")
        return cls(**config, extra=extra)

    def is_layer_norm_activation(self) -> bool:
        """Whether ``act_fn`` has its own LayerNorm (TransformerLens's "solu_ln", "gelu_ln"...)."""
        return self.act_fn is not None and self.act_fn.endswith("_ln")

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict, the fields this library does not read (``extra``) merged back in."""
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def unwrap(cls, config: "dict | HookedTransformerConfig") -> "HookedTransformerConfig":
        """``config`` as a ``HookedTransformerConfig`` (a dict is read with ``from_dict``)."""
        return cls.from_dict(config) if isinstance(config, dict) else config

    def to_model_config(self) -> ModelConfig:
        """The ``ModelConfig`` of this architecture; a setting this library does not implement
        is a ValueError that names it."""
        _refuse_unsupported(self)
        if self.d_vocab <= 0:
            raise ValueError(
                f"d_vocab={self.d_vocab}: give the vocabulary size (TransformerLens infers it from "
                f"tokenizer_name, which needs the hub; here set d_vocab)"
            )
        if self.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            raise ValueError(
                f"normalization_type={self.normalization_type!r} is not supported: transformer_hooks "
                f"implements 'LN', 'LNPre', 'RMS' and 'RMSPre' (a model without norms is not implemented)"
            )
        tl_positions: dict[str, PositionalEmbedding] = {"standard": "learned", "rotary": "rotary"}
        positions = tl_positions.get(self.positional_embedding_type)
        if positions is None:
            raise ValueError(
                f"positional_embedding_type={self.positional_embedding_type!r} is not supported: "
                f"transformer_hooks implements 'standard' (learned) and 'rotary'"
            )
        windows = None
        if self.use_local_attn:
            if self.attn_types is None or self.window_size is None:
                raise ValueError("use_local_attn=True needs attn_types (per layer 'global'/'local') and window_size")
            windows = tuple(self.window_size if kind == "local" else None for kind in self.attn_types)
        self._check_local_attn()
        post_norm = self.original_architecture in POST_NORM
        attn_scale = None if not self.use_attn_scale else float(self.attn_scale)
        if attn_scale is not None and math.isclose(attn_scale, math.sqrt(self.d_head), rel_tol=1e-12):
            attn_scale = None
        return ModelConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp if self.d_mlp is not None else 0,
            d_vocab=self.d_vocab,
            d_vocab_out=self.d_vocab_out if self.d_vocab_out > 0 else self.d_vocab,
            n_ctx=self.n_ctx,
            act_fn=self.act_fn or "relu",
            normalization_type=cast(NormType, self.normalization_type),  # checked above
            eps=self.eps,
            positional_embedding=positions,
            # None (n_kv_heads, rotary_dim, attn_windows): ModelConfig's default, filled in by its __post_init__
            n_kv_heads=self.n_key_value_heads,  # type: ignore[arg-type]
            rotary_dim=self.rotary_dim if positions == "rotary" else None,  # type: ignore[arg-type]
            rope_theta=float(self.rotary_base),
            attn_scale=attn_scale if self.use_attn_scale else 1.0,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            attn_windows=windows,  # type: ignore[arg-type]
            parallel_residual=self.parallel_attn_mlp,
            gated_mlp=self.gated_mlp,
            gated_bias_after_product=self.gated_mlp,
            attn_only=self.attn_only,
            tie_word_embeddings=self.tie_word_embeddings,
            original_architecture=self.original_architecture or "",
            # OLMo 2/3 in TransformerLens: post-norm blocks (the norm on each branch's output, before
            # the residual add) and q/k RMSNorms over the whole projection, as HF's OLMo 2.
            norm_placement="post" if post_norm else "pre",
            qk_norm="all" if post_norm else None,
            default_prepend_bos=self.default_prepend_bos,
            model_name=self.model_name,
            use_attn_result=self.use_attn_result,
            use_split_qkv_input=self.use_split_qkv_input,
            use_attn_in=self.use_attn_in,
            use_hook_mlp_in=self.use_hook_mlp_in,
            ungroup_grouped_query_attention=self.ungroup_grouped_query_attention,
        )

    def _check_local_attn(self) -> None:
        """``attn_types`` and ``window_size``, named when wrong (TransformerLens takes any string
        but "global" as local, and a window of 0 as a mask that hides every key)."""
        if self.attn_types is not None:
            if not isinstance(self.attn_types, (list, tuple)) or len(self.attn_types) != self.n_layers:
                raise ValueError(
                    f"attn_types={self.attn_types!r}: give one entry per layer ({self.n_layers}), each "
                    f"'global' or 'local'"
                )
            bad = [(i, kind) for i, kind in enumerate(self.attn_types) if kind not in ("global", "local")]
            if bad:
                raise ValueError(
                    f"attn_types[{bad[0][0]}]={bad[0][1]!r}: each layer's attention type must be 'global' or 'local'"
                )
        if self.window_size is not None and (
            not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 1
        ):
            raise ValueError(
                f"window_size={self.window_size!r}: the local attention window must be a positive integer "
                f"(keys within window_size - 1 positions of the query)"
            )


# TransformerLens's POST_NORM_ARCHITECTURES: blocks x + norm(attn(x)), x + norm(mlp(x)).
POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")

# Settings TransformerLens has and this library does not implement: (field, its default, why).
_UNSUPPORTED = (
    ("attention_dir", "causal", "only causal attention is implemented"),
    ("final_rms", False, "a final RMSNorm on a LayerNorm model is not implemented"),
    ("post_embedding_ln", False, "a norm after the embedding is not implemented"),
    ("rotary_adjacent_pairs", False, "rotary here pairs halves (rotate-half), not adjacent dims"),
    ("use_qk_norm", False, "q/k norms are read from HF checkpoints (ModelConfig.qk_norm), not set here"),
    ("num_experts", None, "mixture-of-experts MLPs are not implemented"),
    ("n_devices", 1, "use model.to(device); splitting over devices is not implemented"),
    ("use_hook_tokens", False, "there is no hook_tokens site"),
)


def _refuse_unsupported(cfg: HookedTransformerConfig) -> None:
    for name, default, why in _UNSUPPORTED:
        if getattr(cfg, name) != default:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not supported ({why}); leave it at {default!r}")
    if cfg.act_fn is not None and cfg.act_fn.startswith("solu"):
        raise ValueError(f"act_fn={cfg.act_fn!r} (SoLU, with its extra LayerNorm) is not implemented")
    if cfg.extra:
        raise ValueError(
            f"unknown TransformerLens config fields {sorted(cfg.extra)}; transformer_hooks reads "
            f"{sorted(f.name for f in dataclasses.fields(HookedTransformerConfig) if f.name != 'extra')}"
        )


def init_weights(model: nn.Module, cfg: HookedTransformerConfig) -> None:
    """TransformerLens's ``init_weights``: with ``init_mode="gpt2"`` every weight matrix
    (a parameter named ``W_*``) ~ N(0, initializer_range^2), where ``initializer_range``
    defaults to 0.8 / sqrt(d_model); biases 0 and norm weights 1. ``seed`` seeds torch first.
    Other init modes (xavier/kaiming/muP) are refused by name. Initialises ``model`` in place by ``cfg``."""
    if cfg.init_mode != "gpt2":
        raise ValueError(f"init_mode={cfg.init_mode!r} is not implemented; use 'gpt2' (TransformerLens's default)")
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                nn.init.normal_(param, std=cfg.initializer_range)
            elif leaf.startswith("b_"):
                param.zero_()
            else:  # norm weights
                param.fill_(1.0)
