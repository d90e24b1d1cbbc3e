"""Shard and manifest files: written to a temporary name, flushed and renamed; read back as
memory maps, with a clear error naming the file when one is damaged."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a rank's list of its shards, under torchrun
FORMAT = "transformer_hooks.activations/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fsync_write(path: Path, data: bytes | None = None, writer: Callable[[Path], None] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if writer is not None:
            writer(tmp)
        else:
            assert data is not None, "fsync_write needs data or a writer"
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_NP = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I16": np.int16,
}


def open_shard(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps; a clear error if it is damaged."""
    size = path.stat().st_size if path.exists() else -1
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes, the header promises {8 + n + end}")
        return {
            name: np.memmap(
                path,
                dtype=_NP[info["dtype"]],
                mode="r",
                offset=8 + n + info["data_offsets"][0],
                shape=tuple(info["shape"]),
            )
            if info["data_offsets"][1] > info["data_offsets"][0]
            else np.zeros(tuple(info["shape"]), dtype=_NP[info["dtype"]])
            for name, info in header.items()
        }
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise ValueError(
            f"activation shard {path} is missing, truncated or corrupt ({e}); rerun harvest with the "
            f"same arguments: it rewrites the dataset from that shard on"
        ) from None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    fsync_write(path, json.dumps(manifest, indent=1).encode())
