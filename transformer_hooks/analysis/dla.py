"""Direct logit attribution: how much each head, layer and the embeddings write, directly,
towards ``logit(answer) - logit(contrast)`` at one position (the ``dla`` command).

Every part goes through the final norm with its cached scale (``cache.apply_ln_to_stack``),
so the parts add up to the model's logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from ..protocol import HookedModel
from ..tables import text_table
from .lens import final_norm


def check_prompt(prompt: str) -> None:
    """Raise ``ValueError`` for an empty ``prompt`` (the command line's one-line error)."""
    if not prompt:
        raise ValueError('empty prompt: pass the text to analyse, e.g. --prompt "The capital of France is"')


def position_index(pos: int, n_tokens: int) -> int:
    """``pos`` (negative counts from the end) as an index in ``[0, n_tokens)``, or a clear error."""
    if not -n_tokens <= pos < n_tokens:
        raise ValueError(
            f"--pos {pos} is out of range for a prompt of {n_tokens} tokens (valid: {-n_tokens}..{n_tokens - 1})"
        )
    return pos % n_tokens


def dla_inputs(
    model: HookedModel, prompt: str, answer: str, contrast: str, pos: int
) -> tuple[torch.Tensor, int, int, int]:
    """``direct_logit_attribution``'s inputs checked (``ValueError`` / ``IndexError`` naming the
    problem; nothing runs): the ``prompt``'s tokens, the ids of ``answer`` and ``contrast`` (one
    token each, not the same) and ``pos`` as an index (negative counts from the end) of ``model``'s tokens."""
    check_prompt(prompt)
    a, b = model.to_single_token(answer), model.to_single_token(contrast)
    if a == b:
        raise ValueError(
            f"--answer {answer!r} and --contrast {contrast!r} are the same token ({a}); "
            f"their logit difference is 0 by definition"
        )
    tokens = model.to_tokens(prompt)
    return tokens, a, b, position_index(pos, tokens.shape[1])


@dataclass
class DLAResult:
    """Direct effects on ``logit(answer) - logit(contrast)`` at one position.

    ``logit_diff = embed + attn.sum() + mlp.sum() + constant`` exactly, where
    ``constant`` is what no component writes (``b_U`` and an unfolded LayerNorm's bias),
    and ``attn[l] = heads[l].sum() + (b_O[l]'s effect)``. A model that soft-caps its
    logits (Gemma 2) has ``logit_diff_before_cap`` as that sum instead: the cap is not linear.
    """

    str_tokens: list[str]
    pos: int
    answer: str
    contrast: str
    answer_logit: float
    contrast_logit: float
    logit_diff: float
    accumulated: Float[torch.Tensor, " row"]  # the logit difference the residual stream would give at each point
    accumulated_labels: list[str]
    heads: Float[torch.Tensor, "layer head"]
    attn: Float[torch.Tensor, " layer"]
    mlp: Float[torch.Tensor, " layer"]
    embed: float
    constant: float
    logit_diff_before_cap: float | None = None  # models with final_logit_softcap
    softcap: float | None = None


def direct_logit_attribution(
    model: HookedModel, prompt: str, answer: str, contrast: str, pos: int = -1
) -> DLAResult | None:
    """Run ``prompt`` in ``model`` and attribute the logit difference ``answer`` - ``contrast``
    (one-token strings) at ``pos`` to heads and layers.

    Every part goes through the final norm with its cached scale
    (``cache.apply_ln_to_stack``), so the parts add up to the model's logit difference.

    Split over processes (``pipeline_ranks``): every rank calls it after
    ``model.hold_weights()`` (it reads ``W_O``, ``W_U`` and ``b_U``); rank 0 returns the
    result, the other ranks None.
    """
    tokens, a, b, pos = dla_inputs(model, prompt, answer, contrast, pos)
    suffixes = (
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "attn.hook_z",
        "hook_embed",
        "hook_pos_embed",
        "ln_final.hook_scale",
        "_post.hook_scale",
    )  # post-norms' scales (Gemma 2/3, OLMo 2): a head's direct part passes them
    wanted = lambda name: name.endswith(suffixes)  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=wanted)
        if cache is None:  # split over processes: rank 0 attributes
            return None
        cfg = model.cfg
        direction = model.tokens_to_residual_directions(a) - model.tokens_to_residual_directions(b)
        b_U = model.b_U
        constant = b_U[a] - b_U[b]
        ln_b = getattr(model.ln_final, "b", None)
        if ln_b is not None:
            constant = constant + ln_b @ direction

        acc, acc_labels = cache.accumulated_resid(-1, incl_mid=True, pos_slice=pos, return_labels=True)
        accumulated = final_norm(model, acc, "cached", cache, pos_slice=pos) @ direction + (b_U[a] - b_U[b])
        heads = cache.logit_attrs(cache.stack_head_results(-1, pos_slice=pos), a, b, pos_slice=pos)
        parts, labels = cache.decompose_resid(-1, pos_slice=pos, return_labels=True)
        part_attrs = dict(zip(labels, cache.logit_attrs(parts, a, b, pos_slice=pos)[:, 0].tolist(), strict=True))
    layers = range(cfg.n_layers)
    return DLAResult(
        str_tokens=model.to_str_tokens(tokens[0]),  # type: ignore[arg-type]  # one sequence: list[str]
        pos=pos,
        answer=answer,
        contrast=contrast,
        answer_logit=float(logits[0, pos, a]),
        contrast_logit=float(logits[0, pos, b]),
        logit_diff=float(logits[0, pos, a] - logits[0, pos, b]),
        logit_diff_before_cap=None if cfg.final_logit_softcap is None else float(accumulated[-1, 0]),
        softcap=cfg.final_logit_softcap,
        accumulated=accumulated[:, 0].cpu(),
        accumulated_labels=acc_labels,
        heads=heads[:, 0].reshape(cfg.n_layers, cfg.n_heads).cpu(),
        attn=torch.tensor([part_attrs[f"{L}_attn_out"] for L in layers]),
        mlp=torch.tensor([part_attrs[f"{L}_mlp_out"] for L in layers]),
        embed=part_attrs["embed"] + part_attrs.get("pos_embed", 0.0),
        constant=float(constant),
    )


def format_dla(r: DLAResult, top: int = 10) -> str:
    """The ``dla`` command's text: the logit difference, its parts, and the ``top`` heads and layers.

    Args:
        r: what ``direct_logit_attribution`` returned.
        top: how many heads and layers to list.
    """
    n_layers, n_heads = r.heads.shape
    total = r.embed + float(r.attn.sum()) + float(r.mlp.sum()) + r.constant
    lines = [
        f"prompt: {''.join(r.str_tokens)!r} ({len(r.str_tokens)} tokens); predicting after position {r.pos} "
        f"({r.str_tokens[r.pos]!r})",
        f"logit({r.answer!r}) = {r.answer_logit:.4f}   logit({r.contrast!r}) = {r.contrast_logit:.4f}",
        f"logit difference = {r.logit_diff:.4f}",
        *(
            []
            if r.softcap is None
            else [
                f"logit difference before the final soft-cap (c * tanh(x / c), c = "
                f"{r.softcap:g}) = {r.logit_diff_before_cap:.4f}"
            ]
        ),
        f"  = embeddings {r.embed:+.4f} + attention {float(r.attn.sum()):+.4f} + MLPs {float(r.mlp.sum()):+.4f}"
        f" + unembedding/norm biases {r.constant:+.4f} (sum {total:.4f})",
        "",
        f"Top {min(top, n_layers * n_heads)} heads by |direct contribution| to the logit difference",
    ]
    flat = r.heads.flatten()
    order = flat.abs().argsort(descending=True)[:top].tolist()
    rows = [[str(i + 1), f"L{j // n_heads}H{j % n_heads}", f"{float(flat[j]):+.4f}"] for i, j in enumerate(order)]
    lines += text_table(["rank", "head", "contribution"], rows)
    lines += ["", f"Top {min(top, n_layers)} layers by |direct contribution| (attention incl. b_O, MLP incl. b_out)"]
    per_layer = r.attn + r.mlp
    order = per_layer.abs().argsort(descending=True)[:top].tolist()
    rows = [
        [str(i + 1), str(L), f"{float(r.attn[L]):+.4f}", f"{float(r.mlp[L]):+.4f}", f"{float(per_layer[L]):+.4f}"]
        for i, L in enumerate(order)
    ]
    lines += text_table(["rank", "layer", "attn", "mlp", "total"], rows)
    return "\n".join(lines)
