"""``plan``: memory per device for a model (weights, KV cache, activation cache, logits), from
its config alone: nothing is loaded."""

from __future__ import annotations

import argparse

from ..loading.quantize import QUANTIZE_CHOICES
from ..presets import PUBLISHED_CONFIGS
from ..scale.plan import run_plan

NAME = "plan"
SUMMARY = (
    "memory per device for a model (weights, KV cache, activation cache), from its config alone, "
    "for each quantization choice"
)
EXAMPLE = "python -m transformer_hooks plan gpt2 --dtype bfloat16 --batch 8 --seq 1024 --cache resid"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``plan``'s options on the subcommand's parser ``p``."""
    p.add_argument(
        "model",
        help="a name as from_pretrained takes it (preset, HF repo id in the HF cache, local directory, .gguf "
        f"file), a config.json, or a model whose config is built in: {', '.join(sorted(PUBLISHED_CONFIGS))}",
    )
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--devices", default=None, help="comma-separated devices, e.g. cuda:0,cuda:1 (default: cpu)")
    p.add_argument(
        "--max-memory",
        default=None,
        help="per-device capacity, e.g. cuda:0=20GiB,cuda:1=20GiB (default: each device's free memory)",
    )
    p.add_argument(
        "--placement",
        default="auto",
        choices=("auto", "balanced", "sequential"),
        help="balanced: about equal bytes per device; sequential: fill each device in order; "
        "auto: balanced if it fits, else sequential",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument(
        "--cache",
        default="none",
        choices=("all", "resid", "none"),
        help="activation cache of one forward: every site, the residual stream, or none",
    )
    p.add_argument("--no-processing", action="store_true", help="plan for unprocessed weights")
    p.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE_CHOICES,
        help="plan the device table for weights quantized so (from_pretrained(..., quantize=...)); "
        "every choice's weights and fit are printed below it either way (default: none, unquantized)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit code 1 when it does not fit. ``args``: the parsed command line; returns the exit status."""
    plan = run_plan(
        args.model,
        dtype=args.dtype,
        devices=args.devices.split(",") if args.devices else None,
        max_memory=args.max_memory,
        batch=args.batch,
        seq=args.seq,
        cache=args.cache,
        mode=args.placement,
        processing=not args.no_processing,
        quantize=args.quantize,
    )
    print(plan.format())
    return 0 if plan.fits is not False else 1
