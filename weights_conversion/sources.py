"""Checkpoint readers: named tensors read on demand, and the errors a bad checkpoint raises.

- ``SafetensorsFile``: one ``.safetensors`` file, each tensor read into a fresh buffer
  (``write_safetensors`` writes the same format, from the same dtype table);
- ``tensor_source(weight_files)``: a ``TensorSource`` over safetensors files (single or
  sharded) or ``.bin`` files (``torch.load(weights_only=True)``: no pickled code runs;
  the memory-mapped file stays resident while loading, so about two copies at the peak);
- ``in_memory_source(hf_model)``: a transformers model already in memory.

GGUF files have their own ``TensorSource`` in ``gguf.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from tqdm import tqdm

from transformer_hooks.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES, SAFETENSORS_NUMPY


class MissingWeightsError(KeyError):
    """Tensors the model needs are missing from the checkpoint; the message lists them."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is prose
        return str(self.args[0])


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read as its format says (truncated, damaged, wrong dtype)."""


class WeightShapeError(ValueError):
    """Converted tensors that do not fit the model the config describes (a shape, or a name with
    no parameter); the message names them."""


class TensorSource:
    """Named tensors of a checkpoint, read on demand; remembers which were read.

    Every tensor read here is a weight, so it must be stored as floating point: an integer
    or bool dtype (int bit patterns would become values near 1e9 once cast) is refused,
    naming the tensor and the dtype. Integer buffers (GPT-2's attention masks, position
    ids) are never read as weights; they stay in the file, unused.

    Args:
        names: a reader (a function returning the tensor) per tensor name.
        where: the checkpoint, for error messages.
    """

    def __init__(self, names: dict[str, Callable[[], torch.Tensor]], where: str) -> None:
        self._readers = names
        self.where = where
        self.used: set[str] = set()

    def names(self) -> set[str]:
        """The tensor names this source can read."""
        return set(self._readers)

    def __call__(self, name: str) -> torch.Tensor:
        key = name
        if key not in self._readers:
            # Old hub checkpoints drop the base-model prefix ("h.0..." instead of "transformer.h.0...").
            key = name.split(".", 1)[1] if "." in name else name
        if key not in self._readers:
            raise KeyError(name)
        self.used.add(key)
        tensor = self._readers[key]()
        if not (tensor.is_floating_point() or tensor.is_complex()):
            raise CorruptCheckpointError(
                f"cannot read {self.where}: tensor {key!r} is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                f"but it is a weight and must be floating point (F32, F16, BF16, ...). The file is corrupt or "
                f"was written wrongly; convert or download it again."
            )
        return tensor


class SafetensorsFile:
    """One ``.safetensors`` file: the header is read and checked against the file size
    up front; each tensor is then read into a fresh buffer of its own.

    Why not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor
    was read from stays in this process's resident set while the handle lives, so a
    streaming load would peak at the file *plus* the model. A plain read goes through
    the kernel's page cache (not our RSS), and the buffer it fills can become the
    parameter itself. The format is an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the data. ``path``:
    the file (``CorruptCheckpointError`` for a header that does not fit it).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    self._corrupt(f"its header claims {n} bytes but the file has only {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self._corrupt(str(e))
        if not isinstance(header, dict):
            self._corrupt("its header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        for name, entry in header.items():
            self.entries[name] = self._check_entry(name, entry, size - self.data_start)

    def _check_entry(self, name: str, entry: Any, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
        try:
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"])
            begin, end = entry["data_offsets"]
            bad_shape = any(type(d) is not int or d < 0 for d in shape)
            numel = 0 if bad_shape else int(torch.Size(shape).numel())
        except (KeyError, TypeError, ValueError):
            self._corrupt(f"its header entry for {name!r} is malformed: {entry!r}")
        if bad_shape:
            self._corrupt(f"tensor {name!r} has shape {shape}: a dimension is negative or not an integer")
        if end - begin != numel * dtype.itemsize or begin < 0:
            self._corrupt(f"tensor {name!r} of shape {shape} ({entry['dtype']}) has {end - begin} bytes of data")
        if end > data_size:
            self._corrupt(f"tensor {name!r} ends at byte {end} of the data but the file holds only {data_size}")
        return dtype, shape, begin, end

    def _corrupt(self, why: str) -> NoReturn:
        raise CorruptCheckpointError(
            f"cannot read {self.path}: {why}. The file is truncated or corrupt; download or convert it again."
        )

    def keys(self) -> list[str]:
        """The tensor names in the file."""
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from the file."""
        dtype, shape, begin, end = self.entries[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0  # type: ignore[arg-type]  # an ndarray is a buffer
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                while done < len(view):  # a read may return less than asked (over 2 GB on Linux)
                    got = f.readinto(view[done:])
                    if not got:
                        self._corrupt(f"tensor {name!r} is cut short (the file shrank while loading?)")
                    done += got
        except OSError as e:
            self._corrupt(f"reading tensor {name!r} failed: {e}")
        return buffer.view(dtype).reshape(shape)

    def memmap(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only numpy memory map of the file (bfloat16 as its bits,
        uint16): for datasets read a few rows at a time, where ``read`` would copy it whole."""
        dtype, shape, begin, end = self.entries[name]
        code = SAFETENSORS_NAMES[dtype]
        if code not in SAFETENSORS_NUMPY:
            raise ValueError(f"{self.path}: tensor {name!r} is {code}, which numpy cannot map")
        if end == begin:  # numpy cannot map zero bytes
            return np.zeros(shape, dtype=SAFETENSORS_NUMPY[code])
        return np.memmap(
            self.path, dtype=SAFETENSORS_NUMPY[code], mode="r", offset=self.data_start + begin, shape=tuple(shape)
        )


def _no_progress() -> bool | None:
    """tqdm's ``disable``: None (off unless stderr is a terminal), True under CI."""
    return True if os.environ.get("CI") else None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to the ``.safetensors`` file ``path`` one tensor at a time (a contiguous
    copy of one tensor at most), where ``safetensors.torch.save_file`` would serialize them all
    in memory first.

    Format: 8-byte little-endian header length, a JSON header of dtype, shape and
    [begin, end) byte offsets per tensor (padded with spaces to 8 bytes), then the data,
    widest dtype first (as safetensors orders it), so a reader that memory-maps the file
    gets every tensor aligned to its element size. No ctypes (``safetensors.torch.save_file``
    makes a ctypes array type per distinct byte size, kept for the life of the process).
    """
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())  # stable: given order within a width
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_NAMES:
            raise ValueError(
                f"{name}: dtype {t.dtype} cannot be stored in safetensors; "
                f"cast it to one of {sorted(map(str, SAFETENSORS_NAMES))}"
            )
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        # Shown only on a terminal (disable=None) and never under CI, as transformer_hooks.progress's bars.
        bar = tqdm(
            order, desc=f"writing {Path(path).name}", unit="tensor", delay=1.0, leave=False, disable=_no_progress()
        )
        for name in bar:
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def safetensors_source(files: Iterable[Path]) -> TensorSource:
    """A ``TensorSource`` over safetensors ``files`` (memory-mapped, read on demand)."""
    files = tuple(files)
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        handle = SafetensorsFile(file)
        for key in handle.keys():
            readers.setdefault(key, partial(handle.read, key))
    return TensorSource(readers, ", ".join(str(f) for f in files))


def torch_bin_source(files: Iterable[Path]) -> TensorSource:
    """A ``TensorSource`` over pickled ``pytorch_model*.bin`` ``files`` (loaded with ``weights_only``)."""
    files = tuple(files)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:  # weights_only: no pickled code runs
            tensors.update(_torch_load(file))
        except Exception as e:
            raise CorruptCheckpointError(
                f"cannot read {file}: {e}. Only plain tensors are loaded from .bin "
                f"files (weights_only=True); prefer safetensors."
            ) from e
    # A clone per tensor: parameters must not alias the memory-mapped file (the loader may
    # adopt a tensor as a parameter without copying it).
    return TensorSource({k: t.clone for k, t in tensors.items()}, ", ".join(map(str, files)))


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped when it is in torch's zip format; the legacy
    (pre-1.6, non-zip) format cannot be memory-mapped and is read into memory."""
    import zipfile

    mmap = zipfile.is_zipfile(file)
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def in_memory_source(hf_model: Any) -> tuple[dict, TensorSource]:
    """The config and tensors of a transformers model in memory. Each tensor is copied as
    it is converted, so the new model never shares memory with ``hf_model``."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "state_dict"):
        raise TypeError(
            f"hf_model must be a transformers model (with .config and .state_dict()), got {type(hf_model).__name__}"
        )
    state = hf_model.state_dict()
    readers: dict[str, Callable[[], torch.Tensor]] = {
        name: partial(torch.Tensor.to, t.detach(), "cpu", copy=True) for name, t in state.items()
    }
    return config.to_dict(), TensorSource(readers, f"the {type(hf_model).__name__} passed as hf_model")


def tensor_source(weight_files: Any) -> TensorSource:
    """The tensors of safetensors or ``.bin`` files (or of a ``Checkpoint``: its ``weight_files``)."""
    files = tuple(getattr(weight_files, "weight_files", weight_files))
    if all(Path(f).suffix == ".safetensors" for f in files):
        return safetensors_source(files)
    return torch_bin_source(files)
