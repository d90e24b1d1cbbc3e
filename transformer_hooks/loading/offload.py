"""Offload: block weights kept off the compute device and brought in block by block.

    offload="cpu"   each block's parameters live in CPU memory (pinned when the compute
                    device is a GPU); a pre-forward hook copies the block to the compute
                    device just before it runs (the next block's copy is started on a side
                    CUDA stream meanwhile) and the copies are dropped after it ran.
    offload="disk"  each block's parameters are written once to ``offload_dir/blocks.{L}.
                    safetensors`` and memory-mapped back (copy-on-write, so they are file
                    pages, not process memory): a model larger than RAM runs, slowly.

The stored tensors keep the parameters' exact layout (strides), so a block computes the
same numbers it computes without offload, bit for bit (tested on CPU). Embeddings and
the final norm and unembedding stay on the compute device. Hooks, caching and gradients
through hooks work as without offload; the parameters themselves get no gradients (the
copies on the compute device are not leaves of the stored ones).

The hooks are PyTorch module hooks registered on each block by this module: the
components never know where their weights come from.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import sites
from ..components.stack import BlockStack, Placement
from .build import OneDevice
from .groups import modules_of_group

OffloadKind = Literal["cpu", "disk"]


def _storage_order(t: torch.Tensor) -> list[int]:
    """The permutation of dims that lays ``t`` out contiguously (largest stride first)."""

    def key(d: int) -> tuple[int, int]:
        return (-t.stride(d), -t.shape[d])

    return sorted(range(t.ndim), key=key)


def _check_dense(name: str, t: torch.Tensor) -> list[int]:
    order = _storage_order(t)
    if not t.permute(order).is_contiguous():
        raise ValueError(
            f"cannot offload {name}: its memory is not one dense block (shape {tuple(t.shape)}, strides {t.stride()})"
        )
    return order


def _write_block(path: Path, params: Mapping[str, torch.Tensor]) -> None:
    """Each parameter in its storage order, plus the permutation that restores its layout."""
    from safetensors.torch import save_file

    tensors, layouts = {}, {}
    for name, p in params.items():
        order = _check_dense(name, p)
        tensors[name] = p.detach().permute(order).contiguous().cpu()
        layouts[name] = order
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"layouts": json.dumps(layouts)})
    tmp.replace(path)


def _map_block(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``_write_block``'s file, memory-mapped copy-on-write, in their original layout."""
    from weights_conversion.sources import SafetensorsFile

    handle = SafetensorsFile(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        layouts = json.loads(json.loads(f.read(n)).get("__metadata__", {}).get("layouts", "{}"))
    out = {}
    for name, (dtype, shape, begin, end) in handle.entries.items():
        if end == begin:
            flat = torch.empty(0, dtype=torch.uint8)
        else:
            mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=handle.data_start + begin, shape=(end - begin,))
            flat = torch.from_numpy(mapped)
        stored = flat.view(dtype).reshape(shape)
        order = layouts[name]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        out[name] = stored.permute(inverse)
    return out


def _temporary_directory() -> Path:
    """A new directory for disk offload's block files, removed when the process exits (said where)."""
    directory = Path(tempfile.mkdtemp(prefix="transformer_hooks-offload-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    warnings.warn(
        f"offload='disk' without offload_dir: the block files go to {directory}, a temporary directory removed "
        f"when this process exits (it needs as much space as the blocks' weights; give offload_dir=... to choose)",
        stacklevel=4,
    )
    return directory


class BlockOffload:
    """Keeps the parameters of a model's blocks off the compute device (see module docstring).

    Args:
        kind: ``"cpu"`` (pinned CPU memory when computing on CUDA) or ``"disk"`` (memory-mapped files).
        device: the compute device blocks are brought to as they run.
        offload_dir: where ``"disk"`` writes each block's weights (None: a temporary directory,
            removed at exit, with a warning naming it).
    """

    def __init__(self, kind: OffloadKind, device: Any, offload_dir: str | Path | None = None) -> None:
        if kind not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {kind!r}")
        if kind == "disk" and offload_dir is None:
            offload_dir = _temporary_directory()
        if kind == "disk" and offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
            raise ValueError(
                f"offload_dir={str(offload_dir)!r} is a file, not a directory: offload='disk' writes each block's "
                f"weights there (blocks.{{L}}.safetensors, from any checkpoint format) and memory-maps them; give a "
                f"new or empty directory (the checkpoint itself is never written to)"
            )
        self.kind = kind
        self.device = torch.device(device or "cpu")
        self.directory = Path(offload_dir) if offload_dir is not None else None
        self.pin = kind == "cpu" and self.device.type == "cuda"
        self._prefetched: dict[int, tuple[dict[str, torch.Tensor], Any]] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._handles: list[Any] = []
        self._blocks: list[nn.Module] = []

    # Storing -------------------------------------------------------------------------
    def keep(self, block: nn.Module, layer: int) -> None:
        """Replace the parameters of ``block`` (block ``layer``) by stored copies (CPU, or
        memory-mapped from disk); the originals are released.
        """
        params = dict(block.named_parameters())
        if self.kind == "disk":
            assert self.directory is not None  # __init__ refuses disk offload without a directory
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"blocks.{layer}.safetensors"
            _write_block(path, params)
            stored = _map_block(path)
        else:
            stored = {}
            for name, p in params.items():
                _check_dense(name, p)
                t = p.detach().to("cpu")
                stored[name] = t.pin_memory() if self.pin else t
        for name, t in stored.items():
            module_name, _, pname = name.rpartition(".")
            module = block.get_submodule(module_name)
            module._parameters[pname] = nn.Parameter(t, requires_grad=params[name].requires_grad)

    # Running -------------------------------------------------------------------------
    def attach(self, blocks: nn.ModuleList) -> None:
        """Register the hooks that bring each of ``blocks`` to the compute device as it runs. A
        block whose weights can run where they are (CPU compute) needs none.
        """
        self._blocks = list(blocks)
        if self.device.type == "cpu":
            return
        for layer, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(lambda module, args, layer=layer: self._bring(layer)))
            self._handles.append(
                block.register_forward_hook(lambda module, args, out, layer=layer: self._release(layer))
            )

    def install(self, model: Any) -> None:
        """Attach the hooks to ``model``'s blocks and record the offload on the model."""
        self.attach(model.blocks)
        directory = str(self.directory) if self.directory is not None else None
        placement = Placement("offload", offload=self.kind, offload_dir=directory, device=str(self.device))
        model.blocks = BlockStack(model.blocks, placement)

    def detach(self) -> None:
        """Remove the offload hooks and leave every block's weights where they are."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _copies(self, layer: int) -> dict[str, torch.Tensor]:
        return {
            name: p.detach().to(self.device, non_blocking=True) for name, p in self._blocks[layer].named_parameters()
        }

    def _bring(self, layer: int) -> None:
        if layer in self._prefetched:
            copies, event = self._prefetched.pop(layer)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in copies.values():  # made on the side stream, used on this one: keep the allocator from reusing it
                t.record_stream(stream)
        else:
            copies = self._copies(layer)
        block = self._blocks[layer]
        stored: dict[str, nn.Parameter | None] = {}
        block._offload_stored = stored  # type: ignore[assignment]  # a plain attribute: Module.__setattr__ takes any value
        for name, t in copies.items():
            module_name, _, pname = name.rpartition(".")
            module = block.get_submodule(module_name)
            stored[name] = module._parameters[pname]
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
        nxt = layer + 1
        if self._stream is not None and nxt < len(self._blocks) and nxt not in self._prefetched:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                copies = self._copies(nxt)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._prefetched[nxt] = (copies, event)

    def _release(self, layer: int) -> None:
        block = self._blocks[layer]
        for name, stored in getattr(block, "_offload_stored", {}).items():
            module_name, _, pname = name.rpartition(".")
            block.get_submodule(module_name)._parameters[pname] = stored
        block._offload_stored = {}  # type: ignore[assignment]  # a plain attribute: Module.__setattr__ takes any value


class Offloaded(OneDevice):
    """The load of an offloaded model: each block is stored in ``store`` as soon as it is read; the
    embeddings and the final norm and unembedding go to the compute ``device``.
    """

    def __init__(self, store: BlockOffload, device: Any) -> None:
        super().__init__(device)
        self.store = store

    def device_of(self, group: str) -> Any:
        """Where ``group`` is read to: the CPU for a block (then stored), the compute device for the others."""
        return "cpu" if sites.layer_of(group) is not None else self.device

    def after_group(self, model: Any, names: list[str]) -> None:
        """Store every block whose parameters ``names`` were just filled in ``model``."""
        for layer in sorted({L for n in names if (L := sites.layer_of(n)) is not None}):
            self.store.keep(model.blocks[layer], layer)

    def attach(self, model: Any) -> None:
        """Install the offload hooks on ``model`` (``BlockOffload.install``)."""
        self.store.install(model)


def offload_blocks(
    model: Any, offload: OffloadKind, *, device: Any = None, offload_dir: str | Path | None = None
) -> Any:
    """Offload the blocks of a loaded ``HookedTransformer`` ``model`` (in place; returns it).

    ``offload`` and ``offload_dir`` as in ``BlockOffload``. The embeddings, final norm and
    unembedding go to ``device`` (default: where the model is).
    """
    device = torch.device(device or model.device)
    store = BlockOffload(offload, device, offload_dir)
    for layer, block in enumerate(model.blocks):
        store.keep(block, layer)
    for module in (*modules_of_group(model, "embed"), *modules_of_group(model, "final")):
        module.to(device)
    store.install(model)
    model._note_device()
    return model
