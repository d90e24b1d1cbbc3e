"""The command line: direct logit attribution, logit lens, and parity with HF transformers.

    python -m transformer_hooks dla --prompt "The capital of France is" --answer " Paris" --contrast " London"
    python -m transformer_hooks logit-lens --prompt "The capital of France is" [--pos -1]
    python -m transformer_hooks parity --model gpt2 [--tol 1e-3]

The model defaults to the embedded SmolLM2-135M-Instruct. ``dla`` and ``logit-lens`` load
it with TransformerLens's default weight processing (``--no-processing`` for the raw
weights; the attributions are the same either way, see ``ActivationCache.apply_ln_to_stack``),
print a table, and write a PNG into ``--out``. ``parity`` exits with 1 when any layer's
error exceeds ``--tol``, so it can gate a CI job.

This module only parses arguments and calls functions that live with their idea (and are
re-exported here): ``dla.direct_logit_attribution`` / ``format_dla``,
``lens.logit_lens`` / ``format_logit_lens``, ``parity.parity_errors`` / ``format_parity``,
and ``plots.plot_dla`` / ``plot_logit_lens``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .analysis.dla import DLAResult, check_prompt, direct_logit_attribution, format_dla, position_index
from .analysis.lens import LENS_COLUMNS, format_logit_lens, logit_lens
from .analysis.parity import ParityRow, format_parity, load_hf_model, parity_errors, parity_tokens
from .analysis.plots import plot_dla, plot_logit_lens
from .resolution import DEFAULT_MODEL

__all__ = [
    "DEFAULT_PROMPT",
    "DLAResult",
    "LENS_COLUMNS",
    "ParityRow",
    "build_parser",
    "direct_logit_attribution",
    "format_dla",
    "format_logit_lens",
    "format_parity",
    "load_hf_model",
    "load_model",
    "main",
    "parity_errors",
    "plot_dla",
    "plot_logit_lens",
]

DEFAULT_PROMPT = "The capital of France is"


# Loading ------------------------------------------------------------------------------
def load_model(name: str, no_processing: bool = False, device: str | None = None) -> Any:
    from .model import HookedTransformer

    if no_processing:
        return HookedTransformer.from_pretrained_no_processing(name, device=device)
    return HookedTransformer.from_pretrained(name, device=device)


# Commands ---------------------------------------------------------------------------------
class _Steps:
    """A progress bar over a command's steps, shown only once they take over a second."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", delay=1.0, leave=False)
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(label)

    def __enter__(self) -> "_Steps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def cmd_dla(args: argparse.Namespace) -> int:
    check_prompt(args.prompt)
    with _Steps("dla", 3) as step:
        step("loading the model")
        model = load_model(args.model, args.no_processing, args.device)
        step("running and attributing")
        result = direct_logit_attribution(model, args.prompt, args.answer, args.contrast, args.pos)
        step("plotting")
        path = plot_dla(result, Path(args.out) / "dla.png")
    print(format_dla(result, args.top))
    print(f"\nwrote {path}")
    return 0


def cmd_logit_lens(args: argparse.Namespace) -> int:
    check_prompt(args.prompt)
    with _Steps("logit lens", 3) as step:
        step("loading the model")
        model = load_model(args.model, args.no_processing, args.device)
        tokens = model.to_tokens(args.prompt)
        pos = position_index(args.pos, tokens.shape[1])
        step("decoding every layer")
        lens = logit_lens(model, tokens, sites=("resid_pre",) + LENS_COLUMNS, top_k=max(args.top, 1))
        str_tokens = model.to_str_tokens(tokens[0])
        step("plotting")
        path = plot_logit_lens(lens, model, str_tokens, pos, Path(args.out) / "logit_lens.png")
    print(format_logit_lens(lens, model, str_tokens, pos, args.top))
    print(f"\nwrote {path}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    with _Steps("parity", 3) as step:
        step("loading with transformer_hooks")
        model = load_model(args.model, no_processing=True)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformer-hooks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{dla,logit-lens,parity,harvest,sae-eval,plan,sweep}"
    )

    def model_args(p: argparse.ArgumentParser, top: int) -> None:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"preset, HF repo id, local directory or .gguf file (default: {DEFAULT_MODEL}, embedded)",
        )
        p.add_argument("--no-processing", action="store_true", help="load the weights unprocessed (no fold_ln etc.)")
        p.add_argument("--device", default=None, help="torch device (default: cpu)")
        p.add_argument("--out", default=".", help="directory for the PNG (default: current directory)")
        p.add_argument("--top", type=int, default=top, help=f"how many top entries to show (default: {top})")

    dla = sub.add_parser("dla", help="direct logit attribution of logit(answer) - logit(contrast) to heads and layers")
    dla.add_argument("--prompt", required=True)
    dla.add_argument("--answer", required=True, help="the answer token, e.g. ' Paris' (note the leading space)")
    dla.add_argument("--contrast", required=True, help="the token to compare with, e.g. ' London'")
    dla.add_argument("--pos", type=int, default=-1, help="position whose next-token logits to explain (default: -1)")
    model_args(dla, top=10)
    dla.set_defaults(func=cmd_dla)

    lens = sub.add_parser("logit-lens", help="top tokens of every layer's residual stream, attention and MLP output")
    lens.add_argument("--prompt", required=True)
    lens.add_argument("--pos", type=int, default=-1, help="position for the table (default: -1, the last)")
    model_args(lens, top=3)
    lens.set_defaults(func=cmd_logit_lens)

    parity = sub.add_parser("parity", help="compare every layer with HF transformers; exit 1 past --tol")
    parity.add_argument("--model", required=True, help="preset, HF repo id, local HF directory or .gguf file")
    parity.add_argument("--tol", type=float, default=1e-3, help="max abs error allowed (default: 1e-3)")
    parity.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to run (default: {DEFAULT_PROMPT!r})")
    parity.set_defaults(func=cmd_parity)

    from .activations import add_harvest_arguments, run_harvest

    harvest = sub.add_parser(
        "harvest", help="store sites' activations over a corpus (resumable; data-parallel under torchrun)"
    )
    add_harvest_arguments(harvest)
    harvest.set_defaults(func=run_harvest)
    from .sae.splice import add_sae_eval_arguments, run_sae_eval

    sae_eval = sub.add_parser("sae-eval", help="an SAE's reconstruction, sparsity and CE loss recovered on a corpus")
    add_sae_eval_arguments(sae_eval)
    sae_eval.set_defaults(func=run_sae_eval)
    from .plan import add_plan_parser
    from .scale.distributed import add_sweep_parser

    add_plan_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"transformer-hooks {args.command}: error: {e}", file=sys.stderr)
        return 2
