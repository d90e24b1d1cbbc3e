"""``sweep``: an activation-patching (or attribution-patching) sweep over prompt pairs from a
JSONL file, data-parallel under ``torchrun``; the results are written with their axes named and
every index labelled (layer ``L3``, head ``H5``, position ``7:' Paris'``).

Output by ``--out``'s suffix:

- ``.json``: ``{"axes": [...], "metric": ..., "pairs": [{clean, corrupt, answer, contrast,
  "labels": {axis: [label, ...]}}], "results": [nested lists, one per pair], ...}``
- ``.csv``: one row per pair and index: ``pair, <axis>..., <axis>_label..., value``
- anything else: ``torch.save`` of the same dictionary as ``.json``, with tensors as results.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..interventions import patching
from ..protocol import HookedModel
from ..scale.distributed import _pair_tokens, patching_sweep, read_pairs
from ..scale.process_group import DEFAULT_TIMEOUT, init_distributed, local_device
from .common import add_model_arguments, load_from_args, status

NAME = "sweep"
SUMMARY = "activation-patching sweep over prompt pairs from a JSONL file, labelled JSON/CSV (torchrun: data-parallel)"
EXAMPLE = "python -m transformer_hooks sweep --prompts pairs.jsonl --site attn_head_out_all_pos --out sweep.csv"
METRIC = "logits[:, -1, answer] - logits[:, -1, contrast]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``sweep``'s options on the subcommand's parser ``p``."""
    p.add_argument("--prompts", required=True, help="JSONL: one {clean, corrupt, answer, contrast} per line")
    add_model_arguments(p, device=False, dtype=True)
    p.add_argument("--out", required=True, help="result file: .json or .csv (labelled), anything else torch.save")
    p.add_argument("--site", default="resid_pre", help="the patched site, as in get_act_patch_<site>")
    p.add_argument("--attribution", action="store_true", help="attribution patching instead of activation patching")
    p.add_argument(
        "--resume-dir",
        default=None,
        help="keep each pair's result here as it is computed; a rerun after a kill computes only the missing ones "
        "(default: no resume)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        help="seconds a rank that finished waits for the others before failing (a rank that dies is noticed at once)",
    )


def axis_names(site: str, attribution: bool, ndim: int) -> list[str]:
    """The index axes of ``get_act_patch_<site>`` (``get_attr_patch_`` with ``attribution``):
    ``layer``, ``pos``, ``head`` (``kv_head`` for k and v under GQA), ``dest_pos``,
    ``src_pos``; ``dim0``, ... when the sweep does not name ``ndim`` axes.
    """
    fn = getattr(patching, ("get_attr_patch_" if attribution else "get_act_patch_") + site, None)
    names = getattr(fn, "index_axis_names", None)
    if names is None or len(names) != ndim:
        return [f"dim{i}" for i in range(ndim)]
    return ["head" if a == "head_index" else a for a in names]


def axis_labels(
    model: HookedModel, pair: dict[str, Any], axes: list[str], shape: tuple[int, ...]
) -> dict[str, list[str]]:
    """A label for every index of every axis of a result of ``shape``: ``L{i}``, ``H{i}``, or
    ``{pos}:{token!r}`` (the clean prompt of ``pair``, tokenized by ``model``), by the names in ``axes``.
    """
    clean = _pair_tokens(model, pair)[0]
    str_tokens = model.to_str_tokens(clean[0]) if model.tokenizer is not None else [str(int(t)) for t in clean[0]]
    labels = {}
    for axis, size in zip(axes, shape, strict=True):
        if axis == "layer":
            labels[axis] = [f"L{i}" for i in range(size)]
        elif axis in ("head", "kv_head"):
            labels[axis] = [f"H{i}" for i in range(size)]
        elif axis in ("pos", "dest_pos", "src_pos"):
            labels[axis] = [f"{i}:{str_tokens[i]!r}" for i in range(size)]
        else:
            labels[axis] = [str(i) for i in range(size)]
    return labels


def write_labelled(
    path: str | os.PathLike[str],
    results: list[torch.Tensor],
    pairs: list[dict[str, Any]],
    labels: list[dict[str, list[str]]],
    axes: list[str],
    meta: dict[str, Any],
) -> Path:
    """Write the sweep's ``results`` to ``path`` atomically (a temporary file renamed into place:
    a reader never sees a partial file); returns the path.

    ``.csv``: one row per cell (pair, indices, labels, value); ``.json``: ``meta``, ``axes``,
    the ``pairs`` with their ``labels`` and the results as nested lists; anything else a
    ``torch.save`` file of the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    described = [{**pair, "labels": lab} for pair, lab in zip(pairs, labels, strict=True)]
    if path.suffix == ".csv":
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pair", *axes, *(f"{a}_label" for a in axes), "value"])
            for i, (result, lab) in enumerate(zip(results, labels, strict=True)):
                for idx in itertools.product(*(range(n) for n in result.shape)):
                    named = (lab[a][j] for a, j in zip(axes, idx, strict=True))
                    w.writerow([i, *idx, *named, repr(float(result[idx]))])
    elif path.suffix == ".json":
        body = {**meta, "axes": axes, "pairs": described, "results": [r.tolist() for r in results]}
        tmp.write_text(json.dumps(body))
    else:
        torch.save({**meta, "axes": axes, "pairs": described, "results": results}, tmp)
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> int:
    """Sweep; under torchrun every rank runs this and rank 0 writes the file. ``args``: the parsed
    command line; returns the exit status.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=args.timeout)
    rank, world = init_distributed(timeout=timeout)
    try:
        pairs = read_pairs(args.prompts)
        model = load_from_args(args, device=local_device())
        results = patching_sweep(
            model,
            pairs,
            args.site,
            attribution=args.attribution,
            timeout=timeout,
            resume_dir=args.resume_dir,
        )
        if rank == 0:
            assert results is not None  # rank 0 gets the list
            axes = axis_names(args.site, args.attribution, results[0].ndim)
            labels = [axis_labels(model, pair, axes, tuple(r.shape)) for pair, r in zip(pairs, results, strict=True)]
            meta = {
                "model": args.model,
                "site": args.site,
                "attribution": args.attribution,
                "n_prompts": len(pairs),
                "world_size": world,
                "metric": METRIC,
                "complete": True,
            }
            path = write_labelled(args.out, results, pairs, labels, axes, meta)
            status(args, f"sweep: {len(pairs)} prompt pairs over {world} process(es) -> {path}")
        return 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
