"""Convert a checkpoint once, load it fast forever after.

    python -m weights_conversion SRC DST [--dtype float32|float16|bfloat16] [--no-processing] [--overwrite]
    python -m transformer_hooks convert SRC DST ...   (the same command)

SRC is anything ``HookedTransformer.from_pretrained`` accepts (preset, HF repo id, HF
directory, .gguf file). DST becomes a converted checkpoint (the format is described in
``weights_conversion/converted.py``): canonical tensors in ``--dtype``, with the weight
processing TransformerLens applies by default unless ``--no-processing``.

``from_pretrained(DST)`` then reads the tensors straight into the model with no
conversion, and gives the same weights, bit for bit, as loading SRC directly with the
same processing and dtype. Everything is written to a temporary directory next to DST
and renamed into place at the end, so a failed or interrupted conversion leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .converted import canonical_tensors, write_converted  # noqa: F401  (canonical_tensors: re-exported)
from .sources import write_safetensors


def convert(
    src: str | Path, dst: str | Path, *, dtype: str = "float32", processing: bool = True, overwrite: bool = False
) -> Path:
    """Load ``src`` (with TransformerLens's processing unless ``processing=False``) and write it to
    ``dst`` as a converted checkpoint with tensors in ``dtype``. Returns ``dst``.

    ``overwrite``: replace an existing ``dst`` (else FileExistsError). This command is an entry
    point, above the library: it loads through the public ``HookedTransformer.from_pretrained``,
    as a user would.
    """
    from transformer_hooks import HookedTransformer
    from transformer_hooks.resolution import resolve_checkpoint

    dst = Path(dst)
    _check_destination(dst, overwrite)
    ckpt = resolve_checkpoint(src)
    load = HookedTransformer.from_pretrained if processing else HookedTransformer.from_pretrained_no_processing
    model = load(str(src), dtype=dtype)
    source = {"name_or_path": str(src), "kind": ckpt.kind, "path": str(ckpt.gguf_file or ckpt.directory)}
    return save_converted(model, dst, source=source, overwrite=overwrite)


def save_converted(model: Any, dst: str | Path, *, source: Any = None, overwrite: bool = False) -> Path:
    """Write a loaded ``HookedTransformer`` ``model`` to ``dst`` (see the module docstring),
    atomically; ``source``: what it was loaded from (recorded); ``overwrite`` as in ``convert``.
    """
    dst = Path(dst).absolute()
    _check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        write_converted(tmp, model, source, write_tensors=write_safetensors)
        _move_into_place(tmp, dst)
    except BaseException:  # KeyboardInterrupt too: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite to replace it")


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is replaced only once ``tmp`` is complete."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.rename(dst, old / dst.name)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``convert``'s options on the parser ``p``."""
    p.add_argument("src", help="preset name, HF repo id, HF checkpoint directory or .gguf file")
    p.add_argument("dst", type=Path, help="directory to create")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the stored tensors (processing itself runs in float32)",
    )
    p.add_argument(
        "--no-processing",
        action="store_true",
        help="store the weights as the checkpoint has them (no fold_ln, centring or value-bias fold)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    """Convert as the parsed ``args`` say; returns 0, or 1 with a one-line error when DST exists or SRC is not found."""
    quiet = io.StringIO() if args.quiet else None  # the writer's bar draws on stderr
    try:
        with contextlib.redirect_stderr(quiet) if quiet is not None else contextlib.nullcontext():
            dst = convert(
                args.src, args.dst, dtype=args.dtype, processing=not args.no_processing, overwrite=args.overwrite
            )
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m weights_conversion SRC DST ...``: the same command as ``python -m
    transformer_hooks convert`` (this module defines both); ``argv``: the arguments (None:
    ``sys.argv``). Returns the exit status.
    """
    from transformer_hooks.cli.common import HelpFormatter, add_common_arguments, apply_common_arguments

    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion", description=__doc__, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
