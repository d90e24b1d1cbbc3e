"""Shard and manifest files: written to a temporary name, flushed and renamed; read back as
memory maps, with a clear error naming the file when one is damaged. A manifest names its
shards by paths inside the dataset directory (anything else is refused), and a directory
has one writer at a time (a lock file)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a rank's list of its shards, under torchrun
FORMAT = "transformer_hooks.activations/2"  # /2: the manifest's fingerprint is a full resume key
READABLE = ("transformer_hooks.activations/1", FORMAT)
LOCK = ".harvest.lock"
SHARD_NAME = re.compile(r"shard_\d{5}\.safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fsync_write(path: Path, data: bytes | None = None, writer: Callable[[Path], None] | None = None) -> None:
    """Write ``path`` durably and atomically: ``data`` (bytes), or whatever ``writer(tmp_path)``
    writes, goes to a temporary file that is fsynced and renamed into place (the rename fsynced
    too, where the filesystem allows); the temporary file is removed on failure.
    """
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
    """The tensors of the safetensors file ``path`` as read-only memory maps; a clear error if it is damaged."""
    size = path.stat().st_size if path.exists() else -1
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, stop = info["data_offsets"]
            nbytes = int(np.prod(info["shape"])) * np.dtype(_NP[info["dtype"]]).itemsize
            if not 0 <= begin <= stop or stop - begin != nbytes:
                raise ValueError(f"tensor {name}'s offsets {[begin, stop]} do not hold its shape {info['shape']}")
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(
            f"activation shard {path} is missing, truncated or corrupt ({e}); rerun harvest with the "
            f"same arguments: it rewrites the dataset from that shard on"
        ) from None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as JSON to ``path`` (durably, ``fsync_write``)."""
    fsync_write(path, json.dumps(manifest, indent=1).encode())


_ENTRY = {"file": str, "first_context": int, "n_contexts": int, "n_rows": int, "n_tokens": int, "bytes": int}
_TOP = {"shards": list, "n_contexts": int, "n_rows": int, "n_tokens": int, "complete": bool}


def read_manifest(path: Path, root: Path, what: str = "manifest") -> dict[str, Any]:
    """The manifest (or a rank's progress file) at ``path`` read and checked: JSON, its fields and
    their types, and every shard a file inside ``root``. A ValueError names the file (as
    ``what``) and the fault.
    """

    def bad(fault: str) -> ValueError:
        return ValueError(
            f"the {what} {path} is invalid ({fault}); it was not written by harvest or was damaged. "
            f"Delete the directory {root} and harvest again"
        )

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") not in READABLE:
        raise bad(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key, kind in _TOP.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"{key!r} is {manifest.get(key)!r}, expected a {kind.__name__}")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise bad(f"shard entry {i} is not an object")
        for key, kind in _ENTRY.items():
            value: Any = entry.get(key)
            negative = isinstance(value, int) and value < 0
            if not isinstance(value, kind) or isinstance(value, bool) or negative:
                expected = "non-negative int" if kind is int else kind.__name__
                raise bad(f"shard entry {i}'s {key!r} is {value!r}, expected a {expected}")
        shard_path(root, entry["file"], path)
    for key in ("n_contexts", "n_rows", "n_tokens"):
        total = sum(e[key] for e in manifest["shards"])
        if manifest[key] != total:
            raise bad(f"{key!r} is {manifest[key]}, its shards hold {total}")
    return manifest


def shard_path(root: Path, name: str, listed_in: Path) -> Path:
    """``root/name``, refused unless it stays inside ``root`` (no absolute path, no ``..``, no link
    out); the error names ``listed_in``, the file that lists it.
    """
    candidate = Path(name)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(root.resolve()):
        raise ValueError(
            f"{listed_in} lists the shard {name!r}, which is outside the dataset directory {root}: "
            f"a manifest names its shards inside its own directory. Delete the directory and harvest again"
        )
    return root / candidate


@contextmanager
def holding(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``directory``'s lock file for the duration: exclusively (one harvest), or shared
    (the ranks of one harvest under torchrun, which lock their own directories exclusively)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another harvest holds this directory ({directory}, lock file {LOCK}): wait for it to "
                f"finish, or harvest into another directory"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def is_harvest_file(name: str) -> bool:
    """A name a harvest writes in its directory (beside it, the directory may hold anything the user put there)."""
    return (
        name in (MANIFEST, LOCK, f".{MANIFEST}.tmp")
        or re.fullmatch(r"rank_\d{5}", name) is not None
        or SHARD_NAME.fullmatch(name) is not None
        or SHARD_NAME.fullmatch(name.removeprefix(".").removesuffix(".tmp")) is not None
    )


def check_owned(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a directory holding files but no harvest."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file; harvest writes a dataset directory")
    if not out.is_dir() or (out / MANIFEST).exists():
        return
    foreign = sorted(f.name for f in out.iterdir() if not is_harvest_file(f.name))
    if foreign:
        raise FileExistsError(
            f"{out} is not empty ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) and holds no "
            f"harvest: harvest writes into a new or empty directory it owns. Pass another out directory"
        )
