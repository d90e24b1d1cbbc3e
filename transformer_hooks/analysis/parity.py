"""Parity with Hugging Face transformers: the same checkpoint through both libraries, and
the largest difference of the residual stream entering each layer, the final norm's output
and the logits (the ``parity`` command).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import sites
from ..protocol import HookedModel
from ..tables import text_table


@dataclass
class ParityRow:
    """One row of the parity table: the site's ``name``, the largest absolute difference from HF
    (``max_abs_error``) and the largest absolute HF value (``max_abs_value``).
    """

    name: str
    max_abs_error: float
    max_abs_value: float


def load_hf_model(name: str) -> Any:
    """The checkpoint ``name`` through HF transformers (float32): an HF directory, repo id,
    preset or .gguf file (through transformers' ``gguf_file``). ValueError for a checkpoint
    converted by transformer_hooks.
    """
    from transformers import AutoModelForCausalLM

    from ..resolution import resolve_checkpoint

    ckpt = resolve_checkpoint(name)
    if ckpt.kind == "converted":
        raise ValueError(
            f"{name!r} is a checkpoint converted by transformer_hooks; HF transformers cannot load it. "
            f"Run parity on the original HF checkpoint or .gguf file"
        )
    if ckpt.kind == "gguf":
        assert ckpt.gguf_file is not None
        return AutoModelForCausalLM.from_pretrained(
            str(ckpt.directory), gguf_file=ckpt.gguf_file.name, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(ckpt.directory), dtype=torch.float32).eval()


def parity_errors(model: HookedModel, hf_model: Any, tokens: torch.Tensor) -> list[ParityRow]:
    """Max abs differences, ``model`` vs ``hf_model`` on ``tokens``: the residual stream entering
    each layer (HF's ``hidden_states[l]``), the final norm's output and the logits.
    """
    n = model.cfg.n_layers
    with torch.no_grad():
        ref = hf_model(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(
            tokens,
            names_filter=lambda name: (
                sites.split_name(name)[1] == "hook_resid_pre" or name == f"blocks.{n - 1}.hook_resid_post"
            ),
        )
        final = model.ln_final(cache["resid_post", -1])

    def row(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> ParityRow:
        return ParityRow(name, float((ours.float() - theirs.float()).abs().max()), float(theirs.abs().max()))

    rows = [row(f"resid_pre {L}", cache["resid_pre", L], ref.hidden_states[L]) for L in range(n)]
    rows.append(row("final norm", final, ref.hidden_states[n]))
    rows.append(row("logits", logits, ref.logits))
    return rows


def format_parity(rows: list[ParityRow], tol: float) -> str:
    """The ``parity`` command's table: each site's largest error and value, ``ok`` or ``FAIL`` past ``tol``.

    Args:
        rows: what ``parity_errors`` returned.
        tol: the largest absolute error allowed.
    """
    table = [
        [r.name, f"{r.max_abs_error:.3e}", f"{r.max_abs_value:.3g}", "ok" if r.max_abs_error <= tol else "FAIL"]
        for r in rows
    ]
    return "\n".join(text_table(["site", "max |ours - HF|", "max |HF|", f"tol {tol:g}"], table))


def parity_tokens(model: HookedModel, prompt: str) -> torch.Tensor:
    """The tokens of ``prompt`` for ``model``, or for a checkpoint without a tokenizer fixed random tokens [1, 16]."""
    if model.tokenizer is None:
        return torch.randint(0, model.cfg.d_vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    return model.to_tokens(prompt)
