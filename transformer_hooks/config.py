"""ModelConfig: the architecture facts a forward pass needs, and nothing else.

Every quirk of the four supported families is one field here, filled in by
``weights_conversion/<family>.py``. Components read these fields; none of them
asks which architecture it belongs to.

Axis vocabulary used across the library (docstrings, jaxtyping, einops strings):
``batch``, ``pos`` (query positions), ``key_pos``, ``head`` (query heads),
``kv_head``, ``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

NormType = Literal["LN", "LNPre", "RMS", "RMSPre"]
PositionalEmbedding = Literal["learned", "rotary"]
NormPlacement = Literal["pre", "both", "post"]
QKNorm = Literal["head", "all"]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. ``kind`` is HF's ``rope_type``.

    - ``linear``: positions divided by ``factor``.
    - ``llama3``: Llama 3.1's smooth per-frequency interpolation between
      ``low_freq_factor`` and ``high_freq_factor`` wavelengths.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts a forward pass needs, one field per quirk (see the module docstring).

    The first eleven fields are required (sizes, activation, norm type and epsilon, positional
    embedding); the rest default to GPT-2-like behaviour and are commented where they are
    declared. Filled in by ``weights_conversion/<family>.py``; frozen but for the
    TransformerLens ``use_*`` switches: use ``replace`` for a changed copy, ``to_dict`` /
    ``from_dict`` to store it.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization_type: NormType
    eps: float
    positional_embedding: PositionalEmbedding
    # n_kv_heads, rotary_dim and attn_windows accept None, which __post_init__ replaces with the
    # default it stands for: typed as what the model reads.
    n_kv_heads: int = None  # type: ignore[assignment]  # None: same as n_heads (MHA)
    # The unembedding's output size (TransformerLens's d_vocab_out, e.g. its toy algorithmic
    # models predict fewer classes than they read): None, the same as d_vocab.
    d_vocab_out: int = None  # type: ignore[assignment]
    # Rotary: applied to the first ``rotary_dim`` dims of each head (rotate-half layout).
    rotary_dim: int = None  # type: ignore[assignment]  # None: d_head (rotary models)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Scores are q·k / attn_scale (GPT-Neo uses 1.0, i.e. no scaling). None: sqrt(d_head).
    attn_scale: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option: scores / (layer + 1)
    # Per layer: None for global causal attention, or a window w (key within w-1 of query).
    attn_windows: tuple[int | None, ...] = None  # type: ignore[assignment]
    parallel_residual: bool = False  # NeoX/Pythia: attn and MLP both read resid_pre
    gated_mlp: bool = False  # SwiGLU: act(x W_gate) * (x W_in)
    # Gated MLP: b_in added to the product, act(x W_gate) * (x W_in) + b_in (TransformerLens's
    # GatedMLP, for models built from a HookedTransformerConfig), not inside the linear branch (HF).
    gated_bias_after_product: bool = False
    attn_only: bool = False  # blocks without an MLP (TransformerLens's toy attention-only models)
    tie_word_embeddings: bool = False
    original_architecture: str = ""
    default_prepend_bos: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # several (Llama 3 instruct): a tuple, so the config hashes
    pad_token_id: int | None = None
    # Quirks of the newer families (Mistral/Qwen use only attn_windows; see weights_conversion/).
    # The token embedding is multiplied by this (cast to the model's dtype first; Gemma: sqrt(d_model)).
    embed_scale: float = 1.0
    # Where each block's norms sit. "pre": ln1 before attention, ln2 before the MLP (GPT-2 ... Llama);
    # "both": also ln1_post / ln2_post on the attention and MLP outputs before they are added
    # (Gemma 2/3); "post": only ln1_post / ln2_post (OLMo 2).
    norm_placement: NormPlacement = "pre"
    # RMSNorm on queries and keys after the projection, before rotary: "head" over each head's
    # d_head (Qwen 3, Gemma 3), "all" over the whole projection, head*d_head (OLMo 2).
    qk_norm: QKNorm | None = None
    # Soft-capping c: x -> c * tanh(x / c), on the scaled attention scores (before the mask) and
    # on the logits (Gemma 2). None: off.
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Rotary base of the layers with an attention window (Gemma 3), without rope_scaling.
    # None: every layer uses rope_theta and rope_scaling.
    local_rope_theta: float | None = None
    # Weight processing applied to this model's weights (see processing.py), in order.
    processing: tuple[str, ...] = ()
    model_name: str = ""
    # Where the model's weights are, for TransformerLens code that reads model.cfg.device.
    # Not an architecture fact: the model keeps it current, and it is neither saved nor compared.
    device: str | None = field(default=None, compare=False)
    # TransformerLens's use_* switches (which sites run_with_cache() selects by default; see
    # HookedTransformer.set_use_attn_result). Not architecture facts: neither saved nor compared,
    # and the one thing assignable on this frozen config (``model.cfg.use_hook_mlp_in = True``).
    use_attn_result: bool = field(default=False, compare=False)
    use_split_qkv_input: bool = field(default=False, compare=False)
    use_attn_in: bool = field(default=False, compare=False)
    use_hook_mlp_in: bool = field(default=False, compare=False)
    # GQA: key/value heads repeated per query head before hook_k / hook_v (and the per-head
    # k/v inputs), so those sites have n_heads heads (set_ungroup_grouped_query_attention).
    ungroup_grouped_query_attention: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_vocab_out is None:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.attn_windows is None:
            object.__setattr__(self, "attn_windows", (None,) * self.n_layers)
        else:
            object.__setattr__(self, "attn_windows", tuple(self.attn_windows))
        if self.positional_embedding == "rotary" and self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.d_head)
        if isinstance(self.rope_scaling, dict):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as error:
                raise ValueError(
                    f"rope_scaling {self.rope_scaling!r} is malformed ({error}); it needs 'kind' "
                    f"('linear' or 'llama3') and 'factor'"
                ) from None
        object.__setattr__(self, "processing", tuple(self.processing))
        self._check()

    def _check(self) -> None:
        """Every field's type and range, naming the field, the value and what is accepted (the
        one check of a config's values; HF configs are checked first by ``weights_conversion``)."""
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_head",
            "d_mlp",
            "d_vocab",
            "d_vocab_out",
            "n_ctx",
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
            if value <= 0 and not (name == "d_mlp" and self.attn_only):
                raise ValueError(f"ModelConfig.{name} must be a positive integer (at least 1), got {value}")
        for name in ("eps", "rope_theta", "embed_scale"):
            value = getattr(self, name)
            # typeshed's numbers.Real has no __gt__, but every Real compares with 0
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:  # type: ignore[operator]
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.positional_embedding not in ("learned", "rotary"):
            raise ValueError(f"positional_embedding must be 'learned' or 'rotary', got {self.positional_embedding!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be None, a RopeScaling or a dict with 'kind' and 'factor', "
                f"got {self.rope_scaling!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.tie_word_embeddings and self.d_vocab_out != self.d_vocab:
            raise ValueError(
                f"tie_word_embeddings needs d_vocab_out == d_vocab (the unembedding is W_E's transpose), "
                f"got d_vocab_out={self.d_vocab_out}, d_vocab={self.d_vocab}"
            )
        if len(self.attn_windows) != self.n_layers:
            raise ValueError(f"attn_windows has {len(self.attn_windows)} entries for {self.n_layers} layers")
        if self.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            raise ValueError(f"unknown normalization_type {self.normalization_type!r}")
        if self.norm_placement not in ("pre", "both", "post"):
            raise ValueError(f"norm_placement must be 'pre', 'both' or 'post', got {self.norm_placement!r}")
        if self.qk_norm not in (None, "head", "all"):
            raise ValueError(f"qk_norm must be None, 'head' or 'all', got {self.qk_norm!r}")
        if self.positional_embedding == "rotary" and (self.rotary_dim % 2 or self.rotary_dim > self.d_head):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}")

    # Derived facts -------------------------------------------------------------------
    @property
    def scores_scale(self) -> float:
        """What q·k is multiplied by before the softmax (layer-independent part)."""
        return 1.0 / (math.sqrt(self.d_head) if self.attn_scale is None else self.attn_scale)

    @property
    def n_params(self) -> int:
        """TransformerLens's ``cfg.n_params``: the attention and MLP weight matrices only (no
        embeddings, biases or norms; ``model.n_params_total`` counts everything)."""
        mlp = 0 if self.attn_only else self.n_layers * self.d_model * self.d_mlp * (2 + self.gated_mlp)
        return self.n_layers * self.d_model * self.d_head * self.n_heads * 4 + mlp

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def norm_centres(self) -> bool:
        """Whether the norms subtract the mean (LayerNorm, folded or not; RMSNorm does not)."""
        return self.normalization_type in ("LN", "LNPre")

    @property
    def norm_folded(self) -> bool:
        """Whether the norms' weights (and biases) were folded into the weights that read them."""
        return self.normalization_type in ("LNPre", "RMSPre")

    @property
    def folded_normalization_type(self) -> NormType:
        """The norm left after ``fold_ln``: ``LNPre`` or ``RMSPre``."""
        return "LNPre" if self.norm_centres else "RMSPre"

    @property
    def unfolded_normalization_type(self) -> NormType:
        """The norm before ``fold_ln``: ``LN`` or ``RMS``."""
        return "LN" if self.norm_centres else "RMS"

    # TransformerLens spellings, so ported code keeps working.
    @property
    def n_key_value_heads(self) -> int:
        """TransformerLens's name for ``n_kv_heads``."""
        return self.n_kv_heads

    @property
    def parallel_attn_mlp(self) -> bool:
        """TransformerLens's name for ``parallel_residual``."""
        return self.parallel_residual

    @property
    def rotary_base(self) -> float:
        """TransformerLens's name for ``rope_theta``."""
        return self.rope_theta

    @property
    def device_map(self) -> None:
        """Moved: a config holds architecture facts only. Where a model's weights are is ``model.placement``."""
        raise AttributeError(
            "ModelConfig.device_map moved to model.placement.device_map (and pipeline_map to "
            "model.placement.pipeline_map): the config holds architecture facts only"
        )

    @property
    def pipeline_map(self) -> None:
        """Moved to ``model.placement.pipeline_map``."""
        return self.device_map

    @property
    def positional_embedding_type(self) -> str:
        """TransformerLens's name: ``"standard"`` for learned positions, else ``"rotary"``."""
        return "standard" if self.positional_embedding == "learned" else "rotary"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with the fields in ``changes`` replaced (checked as on construction)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (``ModelConfig(**d)`` rebuilds it)."""
        d = dataclasses.asdict(self)
        del d["device"]
        for switch in TL_SWITCHES:
            del d[switch]
        d["attn_windows"] = list(self.attn_windows)
        d["processing"] = list(self.processing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config stored as ``d`` (``to_dict``'s output); ValueError naming unknown or missing fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"ModelConfig fields missing: {sorted(missing)} (required: {sorted(required)})")
        return cls(**d)


TL_SWITCHES = (
    "use_attn_result",
    "use_split_qkv_input",
    "use_attn_in",
    "use_hook_mlp_in",
    "ungroup_grouped_query_attention",
)
_frozen_setattr = ModelConfig.__setattr__


def _setattr(self: ModelConfig, name: str, value: Any) -> None:
    """TransformerLens sets its use_* switches on the config (``model.cfg.use_attn_result =
    True``): those may be assigned; every other field stays frozen."""
    if name in TL_SWITCHES:
        object.__setattr__(self, name, bool(value))
    else:
        _frozen_setattr(self, name, value)


ModelConfig.__setattr__ = _setattr  # type: ignore[method-assign, assignment]
