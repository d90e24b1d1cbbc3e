"""``sae-eval``: an SAE's reconstruction, sparsity and CE loss recovered on a corpus."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from ..sae.core import SAE
from ..sae.splice import evaluate_sae
from ..scale.corpus import pack_contexts
from .common import add_model_arguments, load_from_args

NAME = "sae-eval"
SUMMARY = "an SAE's reconstruction, sparsity and CE loss recovered on a corpus (units printed)"
EXAMPLE = "python -m transformer_hooks sae-eval --sae my_sae/ --data corpus.txt --max-tokens 4096"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``sae-eval``'s options on the subcommand's parser ``p``."""
    add_model_arguments(p)
    p.add_argument("--sae", required=True, help="an SAE directory (SAELens, Llama Scope) or Gemma Scope params.npz")
    p.add_argument(
        "--hook-name", default=None, help="the site, for files that do not name it (default: the file's own)"
    )
    p.add_argument("--data", required=True, help="a text file (documents separated by blank lines) or .jsonl file")
    p.add_argument("--text-key", default="text", help="the field holding the text in a .jsonl file")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (BOS included)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=16384,
        help="evaluate on this many tokens, rounded down to whole contexts (at least one)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    p.add_argument(
        "--skip-first",
        action="store_true",
        help="leave each context's first position out (an attention sink the SAE was not trained on)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Load the model and the SAE, pack the corpus into contexts, print ``evaluate_sae``'s metrics. ``args``: the
    parsed command line; returns the exit status.
    """
    model = load_from_args(args)
    sae = SAE.load_from_disk(args.sae, device=model.device, **({"hook_name": args.hook_name} if args.hook_name else {}))
    rows = []
    for _, (tokens, mask) in zip(
        range(max(1, args.max_tokens // args.context_size)),
        pack_contexts(model, args.data, args.context_size, model.cfg.default_prepend_bos, args.text_key, None),
        strict=False,
    ):
        rows.append((tokens, mask))
    tokens = torch.stack([t for t, _ in rows])
    mask = torch.stack([m for _, m in rows]).long()
    result = evaluate_sae(
        model,
        sae,
        tokens,
        batch_size=args.batch_size,
        attention_mask=mask,
        positions=slice(1, None) if args.skip_first else None,
    )
    if result is None:  # another rank of a model split over processes: rank 0 prints
        return 0
    print(json.dumps(asdict(result)) if args.json else f"SAE {args.sae} at {sae.cfg.hook_name}\n{result}")
    return 0
