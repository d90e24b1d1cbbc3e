"""``dla``: direct logit attribution of logit(answer) - logit(contrast) to every head and layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.dla import check_prompt, direct_logit_attribution, format_dla
from ..analysis.plots import plot_dla
from .common import Steps, add_model_arguments, describe_model, load_from_args, status

NAME = "dla"
SUMMARY = "direct logit attribution of logit(answer) - logit(contrast) to heads and layers (table + PNG)"
EXAMPLE = 'python -m transformer_hooks dla --prompt "The capital of France is" --answer " Paris" --contrast " London"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``dla``'s options on the subcommand's parser ``p``."""
    p.add_argument("--prompt", required=True, help="the text to run")
    p.add_argument("--answer", required=True, help="the answer token, e.g. ' Paris' (note the leading space)")
    p.add_argument("--contrast", required=True, help="the token to compare with, e.g. ' London'")
    p.add_argument("--pos", type=int, default=-1, help="position whose next-token logits to explain (-1: the last)")
    add_model_arguments(p)
    p.add_argument("--out", default=".", help="directory for dla.png")
    p.add_argument("--top", type=int, default=10, help="how many heads and layers to list")


def run(args: argparse.Namespace) -> int:
    """Load, attribute, plot, print the table. ``args``: the parsed command line; returns the exit status."""
    check_prompt(args.prompt)
    with Steps("dla", 3) as step:
        step("loading the model")
        model = load_from_args(args)
        step("running and attributing")
        result = direct_logit_attribution(model, args.prompt, args.answer, args.contrast, args.pos)
        assert result is not None, "the command loads the model in one process, which gets the result"
        step("plotting")
        path = plot_dla(result, Path(args.out) / "dla.png")
    print(f"model: {describe_model(args.model)}")
    print(format_dla(result, args.top))
    status(args, f"\nwrote {path}")
    return 0
