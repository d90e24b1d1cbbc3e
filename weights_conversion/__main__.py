"""Convert a checkpoint once, load it fast forever after.

    python -m weights_conversion SRC DST [--dtype float32|float16|bfloat16] [--no-processing] [--overwrite]

SRC is anything ``HookedTransformer.from_pretrained`` accepts (preset, HF repo id, HF
directory, .gguf file). DST becomes a directory holding:

- ``model.safetensors``: canonical tensors under the model's parameter names
  (``blocks.0.attn.W_Q`` [head, d_model, d_head], ...), contiguous, in ``--dtype``;
  a tied unembedding is stored only if processing made it differ from ``W_E.T``;
- ``transformer_hooks_config.json``: ``{"format_version": 1, "model_config": ...,
  "source": ...}``; the ModelConfig's ``processing`` says which weight processing
  the tensors have (TransformerLens's defaults unless ``--no-processing``);
- the tokenizer's files (``tokenizer.save_pretrained``).

``from_pretrained(DST)`` then reads the tensors straight into the model with no
conversion, and gives the same weights, bit for bit, as loading SRC directly with the
same processing and dtype. Everything is written to a temporary directory next to DST
and renamed into place at the end, so a failed or interrupted conversion leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def convert(src: str | Path, dst: str | Path, *, dtype: str = "float32", processing: bool = True,
            overwrite: bool = False) -> Path:
    """Load ``src`` (with TransformerLens's processing unless ``processing=False``) and
    write it to ``dst`` as a converted checkpoint. Returns ``dst``."""
    from transformer_hooks.loading import load_model
    from transformer_hooks.resolution import resolve_checkpoint

    dst = Path(dst)
    _check_destination(dst, overwrite)
    ckpt = resolve_checkpoint(src)
    model = load_model(src, dtype=dtype, **({} if processing else NO_PROCESSING))
    source = {"name_or_path": str(src), "kind": ckpt.kind, "path": str(ckpt.gguf_file or ckpt.directory)}
    return save_converted(model, dst, source=source, overwrite=overwrite)


def save_converted(model: Any, dst: str | Path, *, source: Any = None, overwrite: bool = False) -> Path:
    """Write a loaded ``HookedTransformer`` to ``dst`` (see the module docstring), atomically."""
    from transformer_hooks.loading import CONVERTED_CONFIG, CONVERTED_FORMAT_VERSION, CONVERTED_WEIGHTS

    dst = Path(dst).absolute()
    _check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        write_safetensors(tmp / CONVERTED_WEIGHTS, canonical_tensors(model))
        config = {"format_version": CONVERTED_FORMAT_VERSION, "model_config": model.cfg.to_dict(), "source": source}
        (tmp / CONVERTED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        _move_into_place(tmp, dst)
    except BaseException:  # KeyboardInterrupt too: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def canonical_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's parameters by name; a tied ``unembed.W_U`` only if it differs from ``W_E.T``."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    if model.cfg.tie_word_embeddings and torch.equal(tensors["unembed.W_U"], tensors["embed.W_E"].T):
        del tensors["unembed.W_U"]  # the loader ties it again
    return tensors


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A ``.safetensors`` file written one tensor at a time (a contiguous copy of one tensor
    at most), where ``safetensors.torch.save_file`` would serialize them all in memory first.

    Format: 8-byte little-endian header length, a JSON header of dtype, shape and
    [begin, end) byte offsets per tensor (padded with spaces to 8 bytes), then the data.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors here")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tqdm(tensors.values(), desc=f"writing {path.name}", unit="tensor", delay=1.0, leave=False):
            f.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="preset name, HF repo id, HF checkpoint directory or .gguf file")
    parser.add_argument("dst", type=Path, help="directory to create")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the stored tensors (processing itself runs in float32)")
    parser.add_argument("--no-processing", action="store_true",
                        help="store the weights as the checkpoint has them (no fold_ln, centring or value-bias fold)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        dst = convert(args.src, args.dst, dtype=args.dtype, processing=not args.no_processing,
                      overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
