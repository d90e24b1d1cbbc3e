"""``logit-lens``: the top tokens of every layer's residual stream, attention and MLP output."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.dla import check_prompt, position_index
from ..analysis.lens import LENS_COLUMNS, format_logit_lens, logit_lens
from ..analysis.plots import plot_logit_lens
from .common import Steps, add_model_arguments, describe_model, load_from_args, status

NAME = "logit-lens"
SUMMARY = "top tokens of every layer's residual stream, attention and MLP output (table + PNG)"
EXAMPLE = 'python -m transformer_hooks logit-lens --prompt "The capital of France is"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``logit-lens``'s options on the subcommand's parser ``p``."""
    p.add_argument("--prompt", required=True, help="the text to run")
    p.add_argument("--pos", type=int, default=-1, help="position for the table (-1: the last)")
    add_model_arguments(p)
    p.add_argument("--out", default=".", help="directory for logit_lens.png")
    p.add_argument("--top", type=int, default=3, help="how many top tokens to show per site")


def run(args: argparse.Namespace) -> int:
    """Load, decode every layer, plot, print the table. ``args``: the parsed command line; returns the exit status."""
    check_prompt(args.prompt)
    with Steps("logit lens", 3) as step:
        step("loading the model")
        model = load_from_args(args)
        tokens = model.to_tokens(args.prompt)
        pos = position_index(args.pos, tokens.shape[1])
        step("decoding every layer")
        lens = logit_lens(model, tokens, sites=("resid_pre",) + LENS_COLUMNS, top_k=max(args.top, 1))
        assert lens is not None, "the command loads the model in one process, which gets the result"
        str_tokens = model.to_str_tokens(tokens[0])
        step("plotting")
        path = plot_logit_lens(lens, model, str_tokens, pos, Path(args.out) / "logit_lens.png")
    print(f"model: {describe_model(args.model)}")
    print(format_logit_lens(lens, model, str_tokens, pos, args.top))
    status(args, f"\nwrote {path}")
    return 0
