"""``parity``: every layer's activations against HF transformers; exit code 1 past ``--tol``."""

from __future__ import annotations

import argparse

from ..analysis.dla import check_prompt
from ..analysis.parity import format_parity, load_hf_model, parity_errors, parity_tokens
from .common import Steps, load_from_args

NAME = "parity"
SUMMARY = "compare every layer with HF transformers; exit code 1 past --tol (for CI)"
EXAMPLE = "python -m transformer_hooks parity --model gpt2 --tol 1e-3"
DEFAULT_PROMPT = "The capital of France is"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``parity``'s options on the subcommand's parser ``p``."""
    p.add_argument("--model", required=True, help="preset, HF repo id, local HF directory or .gguf file")
    p.add_argument("--tol", type=float, default=1e-3, help="largest absolute error allowed at any site")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to run")


def run(args: argparse.Namespace) -> int:
    """Load with both libraries, run both, print the per-site table; 1 if any site is past ``--tol``. ``args``: the
    parsed command line; returns the exit status.
    """
    with Steps("parity", 3) as step:
        step("loading with transformer_hooks")
        model = load_from_args(argparse.Namespace(model=args.model, no_processing=True, device=None))
        step("loading with HF transformers")
        hf_model = load_hf_model(args.model)
        step("running both")
        if model.tokenizer is not None:
            check_prompt(args.prompt)
        tokens = parity_tokens(model, args.prompt)
        rows = parity_errors(model, hf_model, tokens)
    print(
        f"parity of {args.model} ({model.cfg.n_layers} layers, {tokens.shape[1]} tokens, float32): "
        f"transformer_hooks vs HF transformers"
    )
    print(format_parity(rows, args.tol))
    failed = [r.name for r in rows if not r.max_abs_error <= args.tol]
    if failed:
        print(f"\nFAIL: {len(failed)} site(s) past the tolerance {args.tol:g}, first: {failed[0]}")
        return 1
    print(f"\nok: every site within {args.tol:g}")
    return 0
