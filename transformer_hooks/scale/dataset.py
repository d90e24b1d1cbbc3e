"""Reading a harvested activation dataset: ``ActivationDataset(DIR)`` memory-maps the
shards; ``len``, ``rows``, ``batches(site, ...)`` (ordered or shuffled), ``tokens_of(rows)``
and ``check_model(model)``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..protocol import HookedModel
from .shards import DTYPES, MANIFEST, open_shard, read_manifest, shard_path

# How each dtype is stored in a shard as numpy reads it (numpy has no bfloat16: its bits as uint16).
_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class ActivationDataset:
    """A harvested dataset (see the module docstring), memory-mapped shard by shard.

    Args:
        path: the dataset's directory (``harvest``'s ``out``); its manifest and shard sizes are
            checked on opening (FileNotFoundError, ValueError naming the fault and the fix).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path} has no {MANIFEST}: it is not a harvested activation dataset")
        self.manifest = read_manifest(self.path / MANIFEST, self.path)
        sites, dtype = self.manifest.get("sites"), self.manifest.get("dtype")
        if (
            not isinstance(sites, dict)
            or not sites
            or not all(isinstance(w, int) and w > 0 for w in sites.values())
            or not isinstance(dtype, str)
            or dtype not in DTYPES
        ):
            raise ValueError(
                f"the manifest {self.path / MANIFEST} is invalid (sites {sites!r}, dtype {dtype!r}); delete "
                f"the directory {self.path} and harvest again"
            )
        self.sites: list[str] = list(sites)
        self.dtype = DTYPES[dtype]
        self._files = [shard_path(self.path, e["file"], self.path / MANIFEST) for e in self.manifest["shards"]]
        for f, entry in zip(self._files, self.manifest["shards"], strict=True):
            # a cheap check of every shard now; the header when first read
            size = f.stat().st_size if f.exists() else -1
            if size != entry["bytes"]:
                raise ValueError(
                    f"activation shard {f} is missing, truncated or corrupt ({size} bytes, the manifest "
                    f"says {entry['bytes']}); rerun harvest with the same arguments: it rewrites the "
                    f"dataset from that shard on"
                )
        self._shards: list[dict[str, np.ndarray] | None] = [None] * len(self.manifest["shards"])
        self._row_starts = np.cumsum([0] + [e["n_rows"] for e in self.manifest["shards"]])
        self._ctx_starts = np.array([e["first_context"] for e in self.manifest["shards"]] or [0])

    @property
    def complete(self) -> bool:
        """Whether the harvest finished (an interrupted one can be resumed by rerunning it)."""
        return bool(self.manifest["complete"])

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({str(self.path)!r}, rows={len(self)}, sites={self.sites}, "
            f"dtype={self.manifest['dtype']}, model={self.manifest['model_name']!r}"
            f"{'' if self.complete else ', INCOMPLETE'})"
        )

    def width(self, site: str | None = None) -> int:
        """The width of each row of ``site`` (None: the dataset's one site)."""
        return int(self.manifest["sites"][self._site(site)])

    def _site(self, site: str | None) -> str:
        if site is None:
            if len(self.sites) != 1:
                raise ValueError(f"this dataset holds {len(self.sites)} sites {self.sites}: name one")
            return self.sites[0]
        if site not in self.manifest["sites"]:
            import difflib

            close = difflib.get_close_matches(site, self.sites, n=3, cutoff=0.5)
            raise KeyError(
                f"the dataset has no site {site!r}; it has {self.sites}"
                + (f" (closest: {', '.join(close)})" if close else "")
            )
        return site

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        shard = self._shards[i]
        if shard is None:
            entry = self.manifest["shards"][i]
            tensors = open_shard(self._files[i])
            missing = sorted({*self.sites, "tokens", "row_context", "row_position"} - set(tensors))
            if missing:
                raise ValueError(
                    f"activation shard {self._files[i]} lacks {missing}: rerun harvest with the same arguments"
                )
            for site in self.sites:
                arr = tensors[site]
                want = _STORED[self.manifest["dtype"]]
                if arr.ndim != 2 or arr.shape[1] != self.width(site) or arr.dtype != want:
                    raise ValueError(
                        f"activation shard {self._files[i]} holds {site} as {arr.dtype} {list(arr.shape)}, the "
                        f"manifest says {self.manifest['dtype']} [rows, {self.width(site)}]: the manifest or the "
                        f"shard is not this dataset's; rerun harvest with the same arguments"
                    )
            if tensors["row_context"].shape[0] != entry["n_rows"]:
                raise ValueError(
                    f"activation shard {entry['file']} has {tensors['row_context'].shape[0]} rows, the "
                    f"manifest says {entry['n_rows']}: rerun harvest with the same arguments"
                )
            self._shards[i] = shard = tensors
        return shard

    def open_shards(self) -> list[int]:
        """The shards whose memory maps this dataset holds open (each holds file descriptors)."""
        return [i for i, shard in enumerate(self._shards) if shard is not None]

    def release(self, keep: Iterable[int] = ()) -> None:
        """Close the memory maps of every shard but those in ``keep`` (a streaming reader's
        bound on open files and mapped pages); a shard read again is mapped again."""
        keep = set(keep)
        for i in self.open_shards():
            if i not in keep:
                self._shards[i] = None

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np.uint16:  # bfloat16, which numpy lacks
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def rows(
        self, index: Sequence[int] | np.ndarray | torch.Tensor, site: str | None = None, device: Any = None
    ) -> torch.Tensor:
        """Rows [len(index), width] of ``site`` (None: the one site), in the order given, on ``device``."""
        site = self._site(site)
        index = self._index(index)
        shard_of = np.searchsorted(self._row_starts, index, side="right") - 1
        out = torch.empty(len(index), self.width(site), dtype=self.dtype)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            local = index[where] - self._row_starts[s]
            out[torch.from_numpy(where)] = self._to_torch(self._shard(int(s))[site][local])
        return out if device is None else out.to(device)

    def _index(self, rows: Any) -> np.ndarray:
        """Row numbers as int64, each in [0, len): a clear IndexError otherwise."""
        arr = np.atleast_1d(np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows))
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"rows must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= len(self))]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} is out of range: {self.path} holds rows 0..{len(self) - 1}")
        return arr

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        index = np.atleast_1d(np.asarray(index))
        if np.issubdtype(index.dtype, np.integer):  # negative indices count from the end, as in a list
            index = np.where(index < 0, index + len(self), index)
        return self.rows(index)

    def batches(
        self,
        site: str | None = None,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        device: Any = None,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Batches [batch, width] of ``site`` (None: the one site), ``batch_size`` rows each, on ``device``.

        In order, or with ``shuffle`` a shuffle of all rows seeded by ``seed`` (each batch a random
        set of rows, read in file order); ``drop_last`` leaves out a last, short batch.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            yield self.rows(np.sort(idx) if shuffle else idx, site, device)

    def tokens_of(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row: its context's tokens [rows, context_size] and its position [rows]."""
        rows = self._index(rows)
        contexts, positions = [], []
        for r in rows:
            s = int(np.searchsorted(self._row_starts, r, side="right") - 1)
            shard = self._shard(s)
            local = r - self._row_starts[s]
            ctx = int(shard["row_context"][local])
            contexts.append(
                torch.from_numpy(np.array(shard["tokens"][ctx - self.manifest["shards"][s]["first_context"]]))
            )
            positions.append(int(shard["row_position"][local]))
        return torch.stack(contexts).long(), torch.tensor(positions)

    def check_model(self, model: HookedModel) -> None:
        """Raise if ``model`` is not the model (name and weight processing) that wrote this."""
        m = self.manifest
        if m["model_name"] != model.cfg.model_name or list(m["processing"]) != list(model.cfg.processing):
            raise ValueError(
                f"{self.path} was harvested from {m['model_name']!r} with processing {m['processing']}, "
                f"but this model is {model.cfg.model_name!r} with {list(model.cfg.processing)}: its "
                f"activations would not match"
            )
        if m["d_vocab"] != model.cfg.d_vocab:
            raise ValueError(
                f"{self.path} was harvested with a vocabulary of {m['d_vocab']}, this model has {model.cfg.d_vocab}"
            )
