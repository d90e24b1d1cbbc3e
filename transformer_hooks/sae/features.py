"""A feature's top-activating contexts from a harvested dataset, as data and as an HTML page.

``top_activations(dataset, sae, feature)`` encodes every row of the SAE's site in the
dataset (in batches, memory bounded) and keeps the ``top`` largest activations of the
feature: one per context (the context's strongest token), as SAE dashboards show them.
``feature_contexts_html(...)`` writes a self-contained page: one line per context, each
token shaded by the feature's activation on it (its value on hover), the strongest token
outlined. Token text is HTML-escaped (a ``<b>`` token shows as ``<b>``), spaces are kept,
and newlines, tabs and other control characters show as grey escapes (``\\n``, ``\\t``,
``\\x00``...) instead of vanishing; long contexts wrap at token boundaries.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import SAE


@dataclass
class FeatureContext:
    """One context: its tokens, the feature's activation on each (0 where no row was kept,
    e.g. BOS), and the position of the strongest."""

    row: int
    context: int
    position: int
    activation: float
    tokens: list[int]
    activations: list[float]


@torch.no_grad()
def top_activations(
    dataset: Any, sae: SAE, feature: int, top: int = 20, batch_size: int = 4096
) -> list[FeatureContext]:
    """The ``top`` contexts of ``dataset`` (an ``ActivationDataset`` of the SAE's site) where
    ``feature`` of ``sae`` is largest, strongest first (see the module docstring); encoded
    ``batch_size`` rows at a time.
    """
    if not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(f"feature {feature} is out of range: this SAE has d_sae={sae.cfg.d_sae}")
    site = dataset._site(sae.cfg.hook_name)
    values = torch.empty(len(dataset))
    start = 0
    for batch in dataset.batches(site, batch_size, device=sae.device):
        values[start : start + len(batch)] = sae.encode(batch.to(sae.W_enc.dtype))[:, feature].float().cpu()
        start += len(batch)
    order = torch.argsort(values, descending=True, stable=True)
    chosen: list[FeatureContext] = []
    seen: set[int] = set()
    for row in order.tolist():
        if values[row] <= 0 or len(chosen) == top:
            break
        tokens, positions = dataset.tokens_of([row])
        shard = int(np.searchsorted(dataset._row_starts, row, side="right") - 1)
        row_context = np.asarray(dataset._shard(shard)["row_context"])
        context = int(row_context[row - dataset._row_starts[shard]])
        if context in seen:
            continue
        seen.add(context)
        same = np.nonzero(row_context == context)[0] + dataset._row_starts[shard]  # the context's rows
        _, pos = dataset.tokens_of(same)
        acts = [0.0] * tokens.shape[1]
        for p, r in zip(pos.tolist(), same.tolist(), strict=True):
            acts[p] = float(values[r])
        mask = np.asarray(
            dataset._shard(shard)["token_mask"][context - dataset.manifest["shards"][shard]["first_context"]]
        )
        n_real = int(mask.sum())
        chosen.append(
            FeatureContext(
                row=row,
                context=context,
                position=int(positions[0]),
                activation=float(values[row]),
                tokens=tokens[0, :n_real].tolist(),
                activations=acts[:n_real],
            )
        )
    return chosen


_VISIBLE = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_html(text: str) -> str:
    """``text`` as HTML: escaped, control characters as grey escapes (``\\n``, ``\\t``, ``\\r``,
    ``\\x00``...; plain ASCII, which every monospace font draws), an empty token as a grey ``∅``."""
    if text == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in text:
        if ch in _VISIBLE or ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            shown = _VISIBLE.get(ch, f"\\x{ord(ch):02x}")
            out.append(f'<span class="ws">{shown}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def feature_contexts_html(
    contexts: list[FeatureContext], tokenizer: Any, title: str = "feature", path: str | Path | None = None
) -> str:
    """A self-contained HTML page of ``contexts`` (tokens decoded by ``tokenizer``, headed
    ``title``), written to ``path`` if given; returns it.
    """
    peak = max((c.activation for c in contexts), default=1.0) or 1.0
    rows = []
    for c in contexts:
        spans = []
        for i, (tok, act) in enumerate(zip(c.tokens, c.activations, strict=True)):
            text = tokenizer.decode([tok]) if tokenizer is not None else f"<{tok}>"
            alpha = max(0.0, min(1.0, act / peak))
            cls = "tok top" if i == c.position else "tok"
            spans.append(
                f'<span class="{cls}" title="{act:.4g}" style="background: rgba(255,110,0,{alpha:.3f})">'
                f"{token_html(text)}</span>"
            )
        rows.append(
            f'<li class="context" data-activation="{c.activation:.6g}" data-row="{c.row}">'
            f'<span class="act">{c.activation:.3f}</span><span class="text">{"".join(spans)}</span></li>'
        )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
ol.contexts {{ padding-left: 3em; }}
ol.contexts li {{ font-family: monospace; margin: 0.4em 0; line-height: 1.6; }}
.act {{ float: left; width: 5em; color: #555; }}
.text {{ display: block; margin-left: 5em; }}
.tok {{ display: inline-block; white-space: pre; min-width: 0.4em; }}
.tok.top {{ box-shadow: inset 0 0 0 2px #c40; padding: 0 2px; }}
.ws {{ color: #777; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(contexts)} contexts, strongest first; each token shaded by the feature's activation (hover for the value).</p>
<ol class="contexts">
{chr(10).join(rows)}
</ol></body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
