"""The one table of hook sites: every site a transformer has, its axes, and when it exists.

A row names a site relative to its owner: the model for top-level sites (``hook_embed``,
``ln_final.hook_scale``), a block for per-block sites (``attn.hook_z`` is
``blocks.{L}.attn.hook_z``). Everything that lists sites reads this table: the default
cache (which leaves per-head expansions out), ``pos_slice`` (which axis is the position),
``utils.get_act_name``'s short names, the cache's messages, patching's axis layouts, and
the README's table (tested to match). A new site is one new row here (and the
``HookPoint`` in its component).

Axis vocabulary (sizes from the config): ``batch``; ``pos`` (the sequence); ``query_pos``
and ``key_pos`` (attention scores and pattern); ``head`` (``n_heads``); ``kv_head``
(``n_kv_heads``: keys and values under GQA); ``d_model``, ``d_head``, ``d_mlp``; and ``1``
(a norm's scale keeps a size-one feature axis, as jaxtyping writes it).

One shape is not in the table: while a per-head input (``hook_attn_in``, ``hook_q/k/v_input``)
is observed, ``ln1`` reads the per-head copies and its sites gain a ``head`` axis before the
last ([batch, pos, head, 1] for the scale); the position axis stays where the table says.

This module imports nothing from the package: configs are read by duck typing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Condition:
    """When a site exists: a test on the config, and the reason a site is absent otherwise."""

    label: str
    holds: Callable[[Any], bool]
    absent_because: str


ALWAYS = Condition("always", lambda cfg: True, "")
LEARNED_POSITIONS = Condition(
    "learned positions",
    lambda cfg: cfg.positional_embedding == "learned",
    "rotary models have no position embedding in the residual stream",
)
ROTARY = Condition("rotary", lambda cfg: cfg.positional_embedding == "rotary", "only rotary models have rot_q/rot_k")
SEQUENTIAL = Condition(
    "sequential residual",
    lambda cfg: not cfg.parallel_residual,
    "parallel-residual blocks have no resid_mid: attention and MLP both read resid_pre",
)
GATED_MLP = Condition("gated MLP", lambda cfg: cfg.gated_mlp, "only gated MLPs have pre_linear")
PRE_NORM = Condition(
    "norms before attention and MLP",
    lambda cfg: cfg.norm_placement in ("pre", "both"),
    "this model normalises only the outputs of attention and MLP (norm_placement='post'): it has no ln1/ln2",
)
POST_NORM = Condition(
    "norms after attention and MLP",
    lambda cfg: cfg.norm_placement in ("both", "post"),
    "only models with norms after attention and MLP (Gemma 2/3, OLMo 2) have ln1_post/ln2_post",
)
QK_NORM = Condition(
    "q/k norms",
    lambda cfg: cfg.qk_norm is not None,
    "only models that normalise queries and keys (Qwen 3, Gemma 3, OLMo 2) have q_norm/k_norm",
)
QK_NORM_OVER_ALL_HEADS = Condition("q/k norm over the whole projection", lambda cfg: cfg.qk_norm == "all", "")

HAS_MLP = Condition("an MLP", lambda cfg: not getattr(cfg, "attn_only", False), "attention-only models have no MLP")


def all_of(*conditions: Condition) -> Condition:
    """A site that needs every one of ``conditions``."""
    return Condition(
        " and ".join(c.label for c in conditions),
        lambda cfg: all(c.holds(cfg) for c in conditions),
        "; ".join(c.absent_because for c in conditions if c.absent_because),
    )


RESID = ("batch", "pos", "d_model")
SCALE = ("batch", "pos", "1")
PER_HEAD = ("batch", "pos", "head", "d_head")
PER_KV_HEAD = ("batch", "pos", "kv_head", "d_head")
HEAD_SCALE = ("batch", "pos", "head", "1")
KV_HEAD_SCALE = ("batch", "pos", "kv_head", "1")
ATTENTION = ("batch", "head", "query_pos", "key_pos")
NEURONS = ("batch", "pos", "d_mlp")
LOGITS = ("batch", "pos", "d_vocab")


@dataclass(frozen=True)
class Site:
    """One kind of hook site.

    ``name``: relative to its owner; ``per_block``: one per block (``blocks.{L}.name``) or
    one for the model; ``axes``: the activation's axes; ``per_head_expansion``: n_heads
    copies of a residual-sized tensor, so the default cache leaves it out; ``when``: the
    architectures that have it; ``aliases``: TransformerLens's short names
    (``utils.get_act_name``), the first one canonical; ``other_axes``: the axes instead of
    ``axes`` in models where its condition holds (OLMo 2's q/k norms read all heads at once).
    The position axis is the same in both. ``tl_flag``: the TransformerLens switch
    (``set_use_attn_result`` sets ``use_attn_result``) without which TransformerLens never
    runs this site's hook; here a callable filter and the default cache skip the site unless
    the switch is on (a name or a list of names still selects it).
    """

    name: str
    per_block: bool
    axes: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    per_head_expansion: bool = False
    when: Condition = ALWAYS
    other_axes: tuple[Condition, tuple[str, ...]] | None = None
    tl_flag: str | None = None

    def axes_in(self, cfg: Any) -> tuple[str, ...]:
        """The activation's axes in a model with ``cfg``."""
        if self.other_axes is not None and self.other_axes[0].holds(cfg):
            return self.other_axes[1]
        return self.axes

    @property
    def position_axis(self) -> int:
        """Index of the (query) position axis in ``axes``."""
        return self.axes.index("query_pos" if "query_pos" in self.axes else "pos")

    @property
    def position_dim(self) -> int:
        """The (query) position axis counted from the end: right with or without the batch axis."""
        return self.position_axis - len(self.axes)

    @property
    def sublayer(self) -> str | None:
        """The submodule that owns the site (``"ln1"`` for ``ln1.hook_scale``), None for the block or model."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else None

    def full_name(self, layer: int | str | None = None) -> str:  # str: a pattern such as '{L}'
        """The site's hook name in block ``layer`` (``blocks.{layer}.`` prefix for per-block sites)."""
        if not self.per_block:
            return self.name
        if layer is None:
            raise ValueError(f"{self.name} is a per-block site: give a layer")
        return f"blocks.{layer}.{self.name}"

    def shape(self, cfg: Any, batch: int, pos: int) -> tuple[int, ...]:
        """The activation's shape for a model with ``cfg`` on ``batch`` sequences of ``pos`` tokens."""
        sizes = {
            "batch": batch,
            "pos": pos,
            "query_pos": pos,
            "key_pos": pos,
            "head": cfg.n_heads,
            "kv_head": cfg.n_heads if getattr(cfg, "ungroup_grouped_query_attention", False) else cfg.n_kv_heads,
            "d_model": cfg.d_model,
            "d_head": cfg.d_head,
            "d_mlp": cfg.d_mlp,
            "d_vocab": cfg.d_vocab_out,  # the logits' axis
            "1": 1,
            "head*d_head": cfg.n_heads * cfg.d_head,
            "kv_head*d_head": cfg.n_kv_heads * cfg.d_head,
        }
        return tuple(sizes[a] for a in self.axes_in(cfg))


SITES: tuple[Site, ...] = (
    # Top level.
    Site("hook_embed", False, RESID, ("embed",)),
    Site("hook_pos_embed", False, RESID, ("pos_embed",), when=LEARNED_POSITIONS),
    Site("ln_final.hook_scale", False, SCALE, ("scale",)),
    Site("ln_final.hook_normalized", False, RESID, ("normalized",)),
    Site("unembed.hook_in", False, RESID),
    Site("unembed.hook_out", False, LOGITS),
    # Per block, in the order the forward reaches them.
    Site("hook_resid_pre", True, RESID, ("resid_pre",)),
    Site(
        "hook_attn_in",
        True,
        ("batch", "pos", "head", "d_model"),
        ("attn_in",),
        per_head_expansion=True,
        tl_flag="use_attn_in",
    ),
    Site(
        "hook_q_input",
        True,
        ("batch", "pos", "head", "d_model"),
        ("q_input",),
        per_head_expansion=True,
        tl_flag="use_split_qkv_input",
    ),
    Site(
        "hook_k_input",
        True,
        ("batch", "pos", "kv_head", "d_model"),
        ("k_input",),
        per_head_expansion=True,
        tl_flag="use_split_qkv_input",
    ),
    Site(
        "hook_v_input",
        True,
        ("batch", "pos", "kv_head", "d_model"),
        ("v_input",),
        per_head_expansion=True,
        tl_flag="use_split_qkv_input",
    ),
    Site("ln1.hook_scale", True, SCALE, ("scale",), when=PRE_NORM),
    Site("ln1.hook_normalized", True, RESID, ("normalized",), when=PRE_NORM),
    Site("attn.hook_q", True, PER_HEAD, ("q",)),
    Site("attn.hook_k", True, PER_KV_HEAD, ("k",)),
    Site("attn.hook_v", True, PER_KV_HEAD, ("v",)),
    Site("attn.q_norm.hook_scale", True, HEAD_SCALE, (), when=QK_NORM, other_axes=(QK_NORM_OVER_ALL_HEADS, SCALE)),
    Site(
        "attn.q_norm.hook_normalized",
        True,
        PER_HEAD,
        (),
        when=QK_NORM,
        other_axes=(QK_NORM_OVER_ALL_HEADS, ("batch", "pos", "head*d_head")),
    ),
    Site("attn.k_norm.hook_scale", True, KV_HEAD_SCALE, (), when=QK_NORM, other_axes=(QK_NORM_OVER_ALL_HEADS, SCALE)),
    Site(
        "attn.k_norm.hook_normalized",
        True,
        PER_KV_HEAD,
        (),
        when=QK_NORM,
        other_axes=(QK_NORM_OVER_ALL_HEADS, ("batch", "pos", "kv_head*d_head")),
    ),
    Site("attn.hook_rot_q", True, PER_HEAD, ("rot_q",), when=ROTARY),
    Site("attn.hook_rot_k", True, PER_KV_HEAD, ("rot_k",), when=ROTARY),
    Site("attn.hook_attn_scores", True, ATTENTION, ("attn_scores", "scores")),
    Site("attn.hook_pattern", True, ATTENTION, ("pattern", "attn")),
    Site("attn.hook_z", True, PER_HEAD, ("z",)),
    Site(
        "attn.hook_result",
        True,
        ("batch", "pos", "head", "d_model"),
        ("result",),
        per_head_expansion=True,
        tl_flag="use_attn_result",
    ),
    Site("ln1_post.hook_scale", True, SCALE, ("scale",), when=POST_NORM),
    Site("ln1_post.hook_normalized", True, RESID, ("normalized",), when=POST_NORM),
    Site("hook_attn_out", True, RESID, ("attn_out",)),
    Site("hook_resid_mid", True, RESID, ("resid_mid",), when=all_of(SEQUENTIAL, HAS_MLP)),
    Site("ln2.hook_scale", True, SCALE, ("scale",), when=all_of(PRE_NORM, HAS_MLP)),
    Site("ln2.hook_normalized", True, RESID, ("normalized",), when=all_of(PRE_NORM, HAS_MLP)),
    Site("hook_mlp_in", True, RESID, ("mlp_in",), when=HAS_MLP, tl_flag="use_hook_mlp_in"),
    Site("mlp.hook_pre", True, NEURONS, ("pre", "mlp_pre"), when=HAS_MLP),
    Site("mlp.hook_pre_linear", True, NEURONS, ("pre_linear",), when=all_of(GATED_MLP, HAS_MLP)),
    Site("mlp.hook_post", True, NEURONS, ("post", "mlp_post"), when=HAS_MLP),
    Site("ln2_post.hook_scale", True, SCALE, ("scale",), when=all_of(POST_NORM, HAS_MLP)),
    Site("ln2_post.hook_normalized", True, RESID, ("normalized",), when=all_of(POST_NORM, HAS_MLP)),
    Site("hook_mlp_out", True, RESID, ("mlp_out",), when=HAS_MLP),
    Site("hook_resid_post", True, RESID, ("resid_post",)),
)

# Derived views ------------------------------------------------------------------------------
# Relative names of the per-head expansions (each n_heads copies of a residual-sized tensor).
PER_HEAD_EXPANSIONS: tuple[str, ...] = tuple(s.name for s in SITES if s.per_head_expansion)
BY_NAME: dict[str, Site] = {s.name: s for s in SITES}  # relative names are unique
_TOP = {s.name: s for s in SITES if not s.per_block}
_BLOCK = {s.name: s for s in SITES if s.per_block}
_BLOCK_PREFIX = re.compile(r"^blocks\.(\d+)(?:\.|$)")


@functools.cache
def layer_of(name: str) -> int | None:
    """The block a name belongs to, or None outside the blocks: the one parser of a name's layer.

    Hook names (``"blocks.3.attn.hook_z"``), parameter and module names (``"blocks.3.attn.W_O"``)
    and placement groups (``"blocks.3"``) -> ``3``; ``"hook_embed"``, ``"ln_final.w"``, ``"embed"``
    -> ``None``."""
    m = _BLOCK_PREFIX.match(name)
    return int(m.group(1)) if m else None


@functools.cache
def split_name(name: str) -> tuple[int | None, str]:
    """``"blocks.3.attn.hook_z"`` -> ``(3, "attn.hook_z")``; a top-level name -> ``(None, name)``."""
    layer = layer_of(name)
    rel = name.partition(".")[2].partition(".")[2]  # after "blocks.3."
    return (layer, rel) if layer is not None and rel else (None, name)


@functools.cache
def lookup(name: str) -> Site | None:
    """The row of a full hook name (``blocks.3.attn.hook_z``, ``hook_embed``), or None."""
    layer, rel = split_name(name)
    return _BLOCK.get(rel) if layer is not None else _TOP.get(rel)


def is_per_head_expansion(name: str) -> bool:
    """Whether ``name`` is one of the per-head copies a ``set_use_*`` switch turns on."""
    site = lookup(name)
    return site is not None and site.per_head_expansion


def tl_flag(name: str) -> str | None:
    """The TransformerLens switch a full hook name's site needs (``"use_attn_result"``), or None."""
    site = lookup(name)
    return site.tl_flag if site is not None else None


# The residual stream's sites in a block, in the order the stream passes them.
RESIDUAL_STREAM: tuple[str, ...] = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
TL_FLAGS: tuple[str, ...] = tuple(dict.fromkeys(s.tl_flag for s in SITES if s.tl_flag))


def position_dim(name: str) -> int | None:
    """The (query) position axis of a full hook name's activation (with its batch axis), or None
    for a name that is not a transformer site."""
    site = lookup(name)
    return site.position_axis if site is not None else None


def exists(name: str, cfg: Any) -> bool:
    """Whether a model with ``cfg`` has the site ``name`` (a full or relative name: ``"hook_resid_mid"``)."""
    site = lookup(name) or BY_NAME.get(name)
    return site is not None and site.when.holds(cfg)


def sites_of(cfg: Any) -> Iterator[Site]:
    """The rows that exist in a model with ``cfg``."""
    return (s for s in SITES if s.when.holds(cfg))


def hook_names(cfg: Any) -> list[str]:
    """Every full hook name a model with ``cfg`` has."""
    top = [s.name for s in sites_of(cfg) if not s.per_block]
    block = [s.name for s in sites_of(cfg) if s.per_block]
    return top + [f"blocks.{layer}.{name}" for layer in range(cfg.n_layers) for name in block]


def why_absent(name: str, cfg: Any) -> str:
    """Why a model with ``cfg`` has no hook ``name`` (a phrase, or "" when the table cannot tell)."""
    layer, _ = split_name(name)
    site = lookup(name)
    if site is not None and not site.when.holds(cfg):
        return site.when.absent_because
    if layer is not None and not 0 <= layer < cfg.n_layers:
        return f"the model has {cfg.n_layers} layers, 0..{cfg.n_layers - 1}"
    return ""


def by_alias(alias: str) -> list[Site]:
    """The rows with TransformerLens short name ``alias`` (several for the norms' ``scale``)."""
    return [s for s in SITES if alias in s.aliases]


ALIASES: tuple[str, ...] = tuple(dict.fromkeys(a for s in SITES for a in s.aliases))


def markdown_table() -> str:
    """The table as the README shows it."""
    rows = ["| site | axes | short name | exists | cached by default |", "|---|---|---|---|---|"]
    for s in SITES:
        by_default = "yes"
        if s.tl_flag:
            by_default = f"after `set_{s.tl_flag}(True)`" + (" (per-head expansion)" if s.per_head_expansion else "")
        rows.append(
            f"| `{s.full_name('{L}') if s.per_block else s.name}` | [{', '.join(s.axes)}] | "
            f"{', '.join(f'`{a}`' for a in s.aliases)} | {s.when.label} | {by_default} |"
        )
    return "\n".join(rows)
