"""Weight processing: rewrite the weights so that the model computes the same
log-probabilities but its activations are easier to read (TransformerLens's
``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``).

Each step works on a *group* of canonical tensors keyed by full name (``embed.W_E``,
``blocks.3.attn.W_Q``, ``ln_final.w``, ``unembed.W_U``): the embeddings, one block, or
the final norm with the unembedding, so a loader can process a checkpoint while it
streams and never holds two copies of the whole model. A group must hold each norm
together with the weights that read it (a block does; so does final norm + unembed);
a whole state dict is a group too.

The steps, in the order they run (and are recorded in ``ModelConfig.processing``):

1. ``fold_ln``: a norm's weight (and, for LayerNorm, its bias) moves into the weights
   that read the normalised residual; the norm becomes ``LNPre`` / ``RMSPre``.
2. ``center_writing_weights`` (LayerNorm models only): everything that writes to the
   residual stream writes a zero-mean vector.
3. ``center_unembed``: logits lose their mean over the vocabulary, which softmax
   ignores: log-probs (and logit differences) are kept, raw logits are not. Skipped (and
   not recorded, with a warning) when the logits are soft-capped (Gemma 2): ``c * tanh(x / c)``
   does not ignore a shift of x, so centring would change the log-probs.
4. ``fold_value_biases``: the value bias becomes part of the output bias.

Convention: tensors arriving in a group are never modified in place (they may be
memory-mapped, or views shared with another tensor); a step replaces the group's entry
with a new tensor, so the old one is freed as soon as nothing else holds it. Steps run
in float32; the caller casts afterwards. Each step function takes ``cfg``, the config the
group's tensors belong to (before the step), and the ``group``, whose entries it replaces.

Post-norms (``ln1_post`` / ``ln2_post``: Gemma 2/3, OLMo 2) sit after the weights that
write into them and before the residual stream, so no step folds them: they keep their
weights, and ``fold_ln`` folds the pre-norms (none in OLMo 2's blocks) and ``ln_final``.
Every other step is exact with them: ``fold_value_biases`` moves a constant within the
attention output before its post-norm; q/k norms read q and k, which ``fold_ln`` rewrites
linearly before them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import einsum, repeat
from jaxtyping import Float

from . import sites
from .config import ModelConfig

logger = logging.getLogger(__name__)
Group = dict[str, torch.Tensor]
STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
# Steps that rewrite W_E (centring) or W_U (folding ln_final, centring): after them a tied
# unembedding is its own tensor.
REWRITE_EMBEDDINGS = frozenset({"fold_ln", "center_writing_weights", "center_unembed"})


@dataclass(frozen=True)
class ProcessingOptions:
    """Which steps to apply; the defaults are TransformerLens's ``from_pretrained`` defaults."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False  # TransformerLens's option; refused below

    def __post_init__(self) -> None:
        if self.refactor_factored_attn_matrices:
            raise NotImplementedError(
                "refactor_factored_attn_matrices is not supported: it rewrites W_Q/W_K and "
                "W_V/W_O without changing the outputs, which rotary models cannot take"
            )


def steps_for(cfg: ModelConfig, options: ProcessingOptions) -> tuple[str, ...]:
    """The steps ``options`` asks for that apply to ``cfg`` and are not yet applied, in order.

    ``center_writing_weights`` needs every reader of the residual stream to subtract its
    mean, which only LayerNorm does: for RMSNorm models it is skipped (and not recorded).
    """
    wanted = [step for step in STEPS if getattr(options, step)]
    if not cfg.norm_centres:
        wanted = [step for step in wanted if step != "center_writing_weights"]
    if cfg.norm_folded:
        wanted = [step for step in wanted if step != "fold_ln"]
    if cfg.final_logit_softcap is not None:  # tanh is not shift-invariant: centring would change log-probs
        wanted = [step for step in wanted if step != "center_unembed"]
    return tuple(step for step in wanted if step not in cfg.processing)


def processed_config(cfg: ModelConfig, options: ProcessingOptions) -> ModelConfig:
    """The config of the model ``cfg`` processed as ``options`` asks: folded norms become
    LNPre/RMSPre, and ``processing`` records the steps applied, in order."""
    applied = steps_for(cfg, options)
    if options.center_unembed and cfg.final_logit_softcap is not None and "center_unembed" not in cfg.processing:
        logger.warning(
            "center_unembed skipped: this model soft-caps its logits (final_logit_softcap=%s), and "
            "c * tanh(x / c) changes when x shifts, so centring the unembedding would change the "
            "log-probs",
            cfg.final_logit_softcap,
        )
    norm = cfg.folded_normalization_type if "fold_ln" in applied else cfg.normalization_type
    return cfg.replace(normalization_type=norm, processing=cfg.processing + applied)


def process_group(cfg: ModelConfig, group: Group, options: ProcessingOptions) -> Group:
    """Apply the steps of ``options`` (see ``steps_for``) to one group of float32 tensors.

    ``cfg`` is the config the group's tensors belong to (before these steps). The dict
    is updated (entries replaced, folded norm weights removed) and returned.
    """
    for step in steps_for(cfg, options):
        _STEP_FUNCTIONS[step](cfg, group)
    return group


# ---------------------------------------------------------------------------- fold_ln


def fold_ln(cfg: ModelConfig, group: Group) -> None:
    """Fold each norm's weight w (and LayerNorm bias b) into the weights that read it.

    A norm outputs ``x̂ ⊙ w + b`` with ``x̂`` the normalised residual; a reader computes
    ``(x̂ ⊙ w + b) · W + b_W``. Since that equals ``x̂ · (diag(w) W) + (b · W + b_W)``::

        W'   = diag(w) W                 (W: [..., d_model, out])
        b_W' = b_W + b · W

    For LayerNorm, ``x̂`` has zero mean over d_model, so the component of W' along the
    all-ones direction is never read; removing it changes nothing and leaves no unread
    direction in the weights::

        W'' = W' - mean_{d_model}(W') = diag(w) W - (w · W) / d_model

    RMSNorm has no bias and does not centre: only ``W' = diag(w) W``. Readers: q, k, v
    read ``ln1``; the MLP's ``W_in`` (and ``W_gate``) read ``ln2``; ``W_U`` reads ``ln_final``.
    ``cfg`` and ``group`` as in the module docstring.
    """
    centre = cfg.norm_centres
    for block in _blocks_in(group):
        attn, mlp = f"{block}attn.", f"{block}mlp."
        attn_readers = [(attn + f"W_{x}", attn + f"b_{x}") for x in "QKV"]
        mlp_readers = [(mlp + "W_in", mlp + "b_in")]
        if mlp + "W_gate" in group:
            mlp_readers.append((mlp + "W_gate", mlp + "b_gate"))
        if block + "ln1.w" in group:  # OLMo 2's blocks have no pre-norms
            _fold_norm(group, block + "ln1", attn_readers, centre)
        if cfg.gated_bias_after_product and group.get(block + "ln2.b") is not None and group[block + "ln2.b"].any():
            raise ValueError(
                f"fold_ln: {block}ln2 has a bias, and this gated MLP adds b_in after the product "
                f"(TransformerLens's form): the bias cannot be folded exactly. Load with fold_ln=False"
            )
        if block + "ln2.w" in group:  # attention-only blocks have no ln2
            _fold_norm(group, block + "ln2", mlp_readers, centre)
    if "ln_final.w" in group:
        _fold_norm(group, "ln_final", [("unembed.W_U", "unembed.b_U")], centre)


def _fold_norm(group: Group, norm: str, readers: list[tuple[str, str]], centre: bool) -> None:
    w: Float[torch.Tensor, " d_model"] = group.pop(norm + ".w")
    b: Float[torch.Tensor, " d_model"] | None = group.pop(norm + ".b", None)
    for W_name, b_name in readers:
        W: Float[torch.Tensor, "... d_model out"] = group[W_name]
        if b is not None:
            group[b_name] = group[b_name] + b @ W  # b · W
        if centre:
            # mean_{d_model}(diag(w) W) = (w · W) / d_model: a matrix-vector product, and then
            # one fused pass for diag(w) W - mean.
            mean = (w @ W).unsqueeze(-2) / w.shape[0]
            group[W_name] = torch.addcmul(-mean, W, w[:, None])
        else:
            group[W_name] = W * w[:, None]


# ------------------------------------------------------------ center_writing_weights


def center_writing_weights(cfg: ModelConfig, group: Group) -> None:
    """Make every write into the residual stream have zero mean over d_model.

    Each writer ``W_E``, ``W_pos``, ``W_O``, ``W_out`` (d_model last) and bias ``b_O``,
    ``b_out`` becomes ``W - mean_{d_model}(W)``. Every reader of the residual stream is a
    LayerNorm, which subtracts the mean first, so nothing downstream changes; the
    residual stream itself then has zero mean (a direction nothing could read is gone).
    ``cfg`` and ``group`` as in the module docstring.
    """
    writers = [
        name
        for name in group
        if name in ("embed.W_E", "pos_embed.W_pos")
        or re.search(r"\.(attn\.W_O|attn\.b_O|mlp\.W_out|mlp\.b_out)$", name)
    ]
    for name in writers:
        group[name] = _centred(group[name])


# --------------------------------------------------------------------- center_unembed


def center_unembed(cfg: ModelConfig, group: Group) -> None:
    """Subtract each residual direction's mean logit: ``W_U' = W_U - mean_{d_vocab}(W_U)``,
    ``b_U' = b_U - mean(b_U)``.

    Logits at every position shift by one constant (``resid · mean(W_U) + mean(b_U)``),
    which softmax ignores: log-probs are unchanged, logits are not. ``cfg`` and ``group`` as
    in the module docstring.
    """
    for name in ("unembed.W_U", "unembed.b_U"):
        if name in group:
            group[name] = _centred(group[name])


# ------------------------------------------------------------------ fold_value_biases


def fold_value_biases(cfg: ModelConfig, group: Group) -> None:
    """Move the value bias through ``W_O`` into the output bias, and zero it.

    Each row of the attention pattern A sums to one, so head h's output is
    ``z_h = Σ_k A_hk (v_k + b_V,h) = Σ_k A_hk v_k + b_V,h``, and the attention output is
    ``Σ_h z_h W_O,h + b_O``. Hence::

        b_O' = b_O + Σ_h b_V,h · W_O,h        b_V' = 0

    With grouped-query attention, query head h reads value head ``h // group_size``, so
    b_V ([kv_head, d_head]) is expanded to one row per query head first. ``cfg`` and
    ``group`` as in the module docstring.
    """
    for block in _blocks_in(group):
        attn = f"{block}attn."
        b_V: Float[torch.Tensor, "kv_head d_head"] = group[attn + "b_V"]
        b_V_per_head = repeat(b_V, "kv_head d_head -> (kv_head group) d_head", group=cfg.group_size)
        W_O: Float[torch.Tensor, "head d_head d_model"] = group[attn + "W_O"]
        group[attn + "b_O"] = group[attn + "b_O"] + einsum(
            b_V_per_head, W_O, "head d_head, head d_head d_model -> d_model"
        )
        group[attn + "b_V"] = torch.zeros_like(b_V)


# ---------------------------------------------------------------------------- helpers


def _centred(x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
    """x minus its mean over the last axis, as a new tensor."""
    return x - x.mean(-1, keepdim=True)


def _blocks_in(group: Group) -> list[str]:
    """The block prefixes (``"blocks.3."``) with attention weights in the group, in order."""
    layers = {L for name in group if name.endswith(".attn.W_O") and (L := sites.layer_of(name)) is not None}
    return [f"blocks.{layer}." for layer in sorted(layers)]


_STEP_FUNCTIONS: dict[str, Callable[[ModelConfig, Group], None]] = {
    "fold_ln": fold_ln,
    "center_writing_weights": center_writing_weights,
    "center_unembed": center_unembed,
    "fold_value_biases": fold_value_biases,
}
