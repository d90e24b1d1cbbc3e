"""The command line: ``python -m transformer_hooks COMMAND`` (or ``transformer-hooks COMMAND``).

One module per command (``dla``, ``logit_lens``, ``parity``, ``plan``, ``sweep``, ``harvest``,
``sae_train``, ``sae_eval``, ``serve``, ``convert``), each with ``NAME``, ``SUMMARY``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args) -> exit code``; what they share (the model arguments and loading from them,
``--quiet``, the help formatter) is in ``common``. The commands only parse arguments and call
the library's functions, which live with their idea.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from . import convert, dla, harvest, logit_lens, parity, plan, sae_eval, sae_train, serve, sweep
from .common import DEFAULT_MODEL_NOTE, HelpFormatter, add_common_arguments, apply_common_arguments

__all__ = ["COMMANDS", "build_parser", "main"]

# In the order --help lists them.
COMMANDS: tuple[ModuleType, ...] = (dla, logit_lens, parity, plan, sweep, harvest, sae_train, sae_eval, serve, convert)

DESCRIPTION = f"""\
Mechanistic-interpretability commands on hooked transformers.

The default model is {DEFAULT_MODEL_NOTE}.
Run `python -m transformer_hooks COMMAND --help` for a command's options and defaults.
"""


def _epilog() -> str:
    lines = ["examples (one per command):"]
    lines += [f"  {command.EXAMPLE}" for command in COMMANDS]
    lines.append("\nProgress bars go to stderr, only on a terminal and never under CI; --quiet turns them off.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command as a subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m transformer_hooks", description=DESCRIPTION, epilog=_epilog(), formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.SUMMARY,
            description=f"{command.SUMMARY}\n\nexample:\n  {command.EXAMPLE}",
            formatter_class=HelpFormatter,
        )
        command.add_arguments(p)
        add_common_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code; bad
    input is a one-line error and exit code 2, not a traceback."""
    args = build_parser().parse_args(argv)
    apply_common_arguments(args)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"transformer-hooks {args.command}: error: {e}", file=sys.stderr)
        return 2
