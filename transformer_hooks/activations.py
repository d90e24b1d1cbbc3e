"""Activation datasets: harvest sites over a corpus to disk, read them back in batches.

``harvest(model, corpus, sites=[...], out=DIR)`` packs the corpus into contexts of
``context_size`` tokens with the model's BOS rule (``default_prepend_bos``: each context
starts with BOS, and documents are joined by BOS, as SAELens packs them), runs them in
batches (stopping after the last hooked block), keeps each site's activation at the
chosen positions, and writes shards (models without a BOS rule join documents by EOS)::

    DIR/manifest.json                 model, processing, sites and widths, dtype, counts, shard list
    DIR/shard_00000.safetensors       per site [rows, width] (heads flattened), and
                                      tokens [contexts, context_size], token_mask, row_context, row_position

Rows are (context, position) pairs in order: context by context, position by position.
Padding never makes a row; BOS tokens make none unless ``exclude_bos=False``.

Nothing is lost and nothing is claimed that is not there: a shard is written to a
temporary name, flushed and renamed; then the manifest, written the same way, lists it.
A rerun with the same arguments checks the listed shards, deletes anything the manifest
does not list, and continues after the last listed shard; shard boundaries fall on batch
boundaries, so the result is bit for bit the uninterrupted run's. A failing write
(a full disk) raises ``OSError`` naming the shard, leaving the dataset at its last
complete shard.

Under ``torchrun`` (or any initialised process group) each rank takes a contiguous range
of whole batches of contexts and keeps its shards and its progress in its own directory;
rank 0 writes the manifest, listing every rank's shards in context order, only after every
rank reported its range complete (a rank that fails or dies fails the others within the
timeout, and the manifest then lists no row)::

    DIR/manifest.json                 as above, plus world_size; shards rank_00000/..., rank_00001/...
    DIR/rank_00001/progress.json      rank 1's shard list: what a rerun resumes from
    DIR/rank_00001/shard_00000.safetensors

The batches are the single process's batches, so the dataset equals its dataset row for row.

``ActivationDataset(DIR)`` memory-maps the shards: ``len``, ``batches(site, ...)``
(ordered or shuffled, torch tensors on a device), ``tokens_of(rows)``, and
``check_model(model)``.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from weights_conversion.sources import write_safetensors

from . import sites
from .scale.process_group import (
    DEFAULT_TIMEOUT,
    RankFailedError,
    barrier,
    exchange,
    init_distributed,
    launched_by_torchrun,
    local_device,
    rank_and_world,
    shard_bounds,
)
from .tokens import bos_id, pad_id, require_tokenizer

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a rank's list of its shards, under torchrun
FORMAT = "transformer_hooks.activations/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Corpus = str | Path | Sequence[str] | torch.Tensor | np.ndarray
PositionChoice = str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


# The corpus as contexts -----------------------------------------------------------------
def _piece(tokens: torch.Tensor | np.ndarray, index: Any) -> torch.Tensor:
    """Some tokens as a CPU long tensor (copied: a memory-mapped array is read only)."""
    if isinstance(tokens, torch.Tensor):
        return tokens[index].to("cpu", torch.long)
    return torch.from_numpy(np.array(tokens[index])).long()


def _documents(corpus: str | Path, text_key: str) -> Iterator[str]:
    """A .jsonl file (one JSON object per line, text under ``text_key``) or a text file
    (documents separated by blank lines), read line by line."""
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file {path}: pass a text or .jsonl file, a list of strings or tokens")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for i, line in enumerate(f):
                if line.strip():
                    record = json.loads(line)
                    if text_key not in record:
                        raise KeyError(
                            f"{path} line {i + 1} has no {text_key!r} field (it has {sorted(record)}); "
                            f"pass text_key=..."
                        )
                    yield record[text_key]
            return
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).removesuffix("\n")  # the line break before the blank line separates
                lines = []
        if lines:
            yield "".join(lines).removesuffix("\n")


def _contexts(
    model: Any, corpus: Corpus, context_size: int, prepend_bos: bool, text_key: str, attention_mask: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [context_size], mask [context_size]) for each context, in order."""
    if isinstance(corpus, (torch.Tensor, np.ndarray)):  # read piece by piece: a memory-mapped array stays on disk
        if corpus.ndim == 2:  # contexts as given
            if corpus.shape[1] != context_size:
                raise ValueError(f"token contexts have length {corpus.shape[1]}, but context_size={context_size}")
            for i in range(corpus.shape[0]):
                m = (
                    torch.ones(context_size, dtype=torch.bool)
                    if attention_mask is None
                    else torch.as_tensor(attention_mask[i]).bool()
                )
                yield _piece(corpus, i), m
            return
        if corpus.ndim != 1:
            raise ValueError(
                f"tokens must be a stream [n] or contexts [n, context_size], got shape {tuple(corpus.shape)}"
            )
        streams: Iterable[list[int]] = (
            _piece(corpus, slice(i, i + (1 << 16))).tolist() for i in range(0, corpus.shape[0], 1 << 16)
        )
    else:
        docs = _documents(corpus, text_key) if isinstance(corpus, (str, Path)) else iter(corpus)
        tok = require_tokenizer(model.tokenizer)
        streams = (tok(doc, add_special_tokens=False)["input_ids"] for doc in docs)
    bos = bos_id(model.tokenizer, model.cfg) if prepend_bos else None
    eos = getattr(model.tokenizer, "eos_token_id", None)
    sep = bos if bos is not None else (eos if eos is not None else model.cfg.eos_token_id)
    body = context_size - (1 if prepend_bos else 0)
    buffer: list[int] = []
    first = True
    for ids in streams:
        if sep is not None and not first and not isinstance(corpus, (torch.Tensor, np.ndarray)):
            buffer.append(sep)  # documents joined by BOS (by EOS for models that prepend no BOS)
        first = False
        buffer.extend(ids)
        while len(buffer) >= body:
            chunk, buffer = buffer[:body], buffer[body:]
            yield torch.tensor(([bos] if bos is not None else []) + chunk), torch.ones(context_size, dtype=torch.bool)
    if buffer:
        n = len(buffer) + (1 if bos is not None else 0)
        row = torch.full((context_size,), pad_id(model.tokenizer, model.cfg), dtype=torch.long)
        row[:n] = torch.tensor(([bos] if bos is not None else []) + buffer)
        mask = torch.zeros(context_size, dtype=torch.bool)
        mask[:n] = True
        yield row, mask


def _select(
    positions: PositionChoice, tokens: torch.Tensor, mask: torch.Tensor, first_context: int, bos: int | None
) -> torch.Tensor:
    """The [batch, pos] rows to keep: real tokens at the chosen positions, BOS left out if asked."""
    if isinstance(positions, str):
        if positions == "all":
            chosen = mask.clone()
        elif positions == "last":
            chosen = torch.zeros_like(mask)
            last = mask.long().cumsum(1).argmax(1)
            chosen[torch.arange(len(mask)), last] = True
        else:
            raise ValueError(
                f"positions must be 'all', 'last', a [contexts, pos] bool mask or a function of the "
                f"tokens, got {positions!r}"
            )
    elif callable(positions):
        chosen = torch.as_tensor(positions(tokens)).bool()
    else:
        chosen = torch.as_tensor(positions).bool()[first_context : first_context + len(tokens)]
    if tuple(chosen.shape) != tuple(tokens.shape):
        raise ValueError(
            f"the positions mask for contexts {first_context}.. has shape {tuple(chosen.shape)}; "
            f"expected {tuple(tokens.shape)} ([contexts, context_size])"
        )
    chosen = chosen & mask
    if bos is not None:
        chosen &= tokens != bos
    return chosen


# Files ------------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes | None = None, writer: Callable[[Path], None] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if writer is not None:
            writer(tmp)
        else:
            assert data is not None, "_fsync_write needs data or a writer"
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


def _open_shard(path: Path) -> dict[str, np.ndarray]:
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


def _fingerprint(corpus: Corpus) -> str:
    h = hashlib.sha256()
    if isinstance(corpus, (str, Path)):
        p = Path(corpus)
        st = p.stat()
        h.update(f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif isinstance(corpus, (torch.Tensor, np.ndarray)):
        h.update(f"tokens:{tuple(corpus.shape)}".encode())
        for i in range(0, corpus.shape[0], 1 << 16):  # piece by piece, as the tokens are read
            piece = _piece(corpus, slice(i, i + (1 << 16))).numpy()
            h.update(np.ascontiguousarray(piece).data)
    elif isinstance(corpus, (list, tuple)):
        for doc in corpus:
            h.update(doc.encode())
            h.update(b"\0")
    else:  # a one-shot iterable: nothing to hash without consuming it; resuming needs the same stream again
        h.update(b"iterable")
    return h.hexdigest()[:16]


def _site_layer(site: str) -> int | None:
    """The block a site is in (-1 before the blocks; None after them)."""
    layer = sites.layer_of(site)
    if layer is not None:
        return layer
    return -1 if site in ("hook_embed", "hook_pos_embed", "hook_tokens") else None


# Harvest -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Place:
    """Where one writer keeps its shards and the JSON that lists them: the dataset directory
    and its manifest (one process), or a rank's directory and progress file (under torchrun).
    Shard entries name their file relative to ``root``, the dataset directory."""

    root: Path
    shards: Path
    state: Path

    @staticmethod
    def of_rank(root: Path, rank: int) -> _Place:
        shards = root / f"rank_{rank:05d}"
        return _Place(root, shards, shards / PROGRESS)


def harvest(
    model: Any,
    corpus: Corpus,
    sites: str | Sequence[str],
    out: str | Path,
    *,
    context_size: int = 128,
    batch_size: int = 8,
    positions: PositionChoice = "all",
    exclude_bos: bool = True,
    dtype: str = "float32",
    shard_tokens: int = 1 << 16,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    text_key: str = "text",
    attention_mask: Any = None,
    progress: bool = True,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> ActivationDataset:
    """Stream ``corpus`` through ``model`` and store ``sites`` at ``positions`` in ``out``.

    ``corpus``: a text or .jsonl file, a list of strings, a token stream [n] or token
    contexts [n, context_size] (with ``attention_mask`` for padding). ``sites``: hook names
    or globs. ``positions``: ``"all"`` real tokens, ``"last"`` (the last real token of each
    context), a bool mask [contexts, context_size], or a function of a batch's tokens
    [batch, context_size] giving one (a resumed harvest cannot compare functions: pass the
    same). ``dtype``: float32, float16 or bfloat16. ``max_tokens``: stop after that
    many tokens of contexts. Resumes an interrupted harvest with the same arguments;
    returns the dataset.

    Under ``torchrun`` (or with a process group initialised) every rank calls this with
    the same arguments and ``out`` on a filesystem they share: each takes a contiguous
    range of the contexts, writes its shards under ``out/rank_NNNNN/``, and rank 0 writes
    the manifest once every rank reported its shards complete; the dataset is the one a
    single process writes, row for row. Each rank reads (tokenises) the corpus once to count
    its contexts, then again up to the end of its range; a one-shot iterable cannot be
    shared. ``timeout``: how long a rank that finished waits for the others (a rank that
    dies fails them at once).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}")
    names = model.resolve_hook_names(sites)
    for name in names:
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            raise ValueError(f"{name} is per (query, key) pair, not per position; harvest takes per-position sites")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepend_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    bos = None
    if exclude_bos:
        try:
            bos = bos_id(model.tokenizer, model.cfg)
        except ValueError:  # no BOS token: nothing to leave out
            bos = None
    shard_contexts = max(1, shard_tokens // (context_size * batch_size)) * batch_size
    max_contexts = None if max_tokens is None else max(1, math.ceil(max_tokens / context_size))
    layers = [_site_layer(n) for n in names]
    known = [layer for layer in layers if layer is not None]
    stop = None if len(known) < len(layers) else max(known) + 1
    fingerprint = {
        "corpus": _fingerprint(corpus),
        "sites": names,
        "context_size": context_size,
        "batch_size": batch_size,
        "positions": positions
        if isinstance(positions, str)
        else ("function" if callable(positions) else _fingerprint(torch.as_tensor(positions).to(torch.uint8))),
        "exclude_bos": exclude_bos,
        "dtype": dtype,
        "shard_contexts": shard_contexts,
        "max_contexts": max_contexts,
        "prepend_bos": prepend_bos,
        "text_key": text_key,
    }

    def contexts(start: int, end: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Contexts [start, end) of the corpus (the ones before ``start`` are read and dropped)."""
        return islice(_contexts(model, corpus, context_size, prepend_bos, text_key, attention_mask), start, end)

    def run(place: _Place, state: dict[str, Any], end: int | None, desc: str, show: bool) -> None:
        first = state.get("first_context", 0) + state["n_contexts"]
        bar = tqdm(
            total=(end - state.get("first_context", 0)) * context_size if end is not None else None,
            initial=state["n_tokens"],
            unit="tok",
            unit_scale=True,
            desc=desc,
            disable=not show,
            delay=0.5,
        )
        try:
            _harvest_contexts(
                model,
                place,
                state,
                contexts(first, end),
                names=names,
                positions=positions,
                bos=bos,
                target=DTYPES[dtype],
                batch_size=batch_size,
                shard_contexts=shard_contexts,
                stop=stop,
                bar=bar,
            )
        finally:
            bar.close()

    if launched_by_torchrun():
        init_distributed(timeout=timeout)
    rank, world = rank_and_world()
    desc = f"harvesting {len(names)} site(s)"
    if world == 1:
        if _done(out, model, fingerprint):
            return ActivationDataset(out)
        place = _Place(out, out, out / MANIFEST)
        manifest = _resume(place, model, fingerprint)
        if not manifest["complete"]:
            run(place, manifest, max_contexts, desc, progress)
        return ActivationDataset(out)

    # Under torchrun: a contiguous range of whole batches per rank, so that every batch is
    # the batch one process runs (the same rows side by side: the same bits).
    if not isinstance(corpus, (str, Path, list, tuple, torch.Tensor, np.ndarray)):
        raise ValueError(
            f"a harvest over {world} processes reads the corpus on every rank; a one-shot iterable "
            f"({type(corpus).__name__}) can be read only once: pass a file, a list of strings or tokens"
        )
    fingerprint["world_size"] = world
    n = sum(1 for _ in contexts(0, max_contexts))
    bounds = [
        (min(lo * batch_size, n), min(hi * batch_size, n))
        for lo, hi in (shard_bounds(math.ceil(n / batch_size), r, world) for r in range(world))
    ]
    lo, hi = bounds[rank]
    if _done(out, model, fingerprint):
        return ActivationDataset(out)
    consequence = (
        f"The manifest of {out} lists no row of this run; rerun the same harvest to continue from "
        f"each rank's last complete shard."
    )
    place = _Place.of_rank(out, rank)
    state: dict[str, Any] | None = None
    error: BaseException | None = None
    try:
        if rank == 0:  # an empty, incomplete dataset until every rank has finished
            _write_manifest(out / MANIFEST, {**_fresh_manifest(model, fingerprint), "world_size": world})
        place.shards.mkdir(exist_ok=True)
        state = _resume(place, model, {**fingerprint, "rank": rank, "contexts": [lo, hi]}, first_context=lo)
        if not state["complete"]:
            run(place, state, hi, f"{desc} (rank 0 of {world})", progress and rank == 0)
    except Exception as e:  # noqa: BLE001  (reported to every rank below, then raised)
        error = e
    report = None if error is None else f"on its contexts [{lo}, {hi}): {type(error).__name__}: {error}"
    try:
        states = exchange(report, state, timeout=timeout, what="harvesting", consequence=consequence)
        write_error = None
        if rank == 0:
            try:
                _write_rank_manifest(out, model, fingerprint, states, bounds)
            except Exception as e:  # noqa: BLE001
                error = e
                write_error = f"writing the manifest: {type(e).__name__}: {e}"
        exchange(write_error, None, timeout=timeout, what="to finish the harvest", consequence=consequence)
    except RankFailedError as e:
        if error is not None:  # this rank's own failure: keep its traceback
            raise e from error
        raise
    return ActivationDataset(out)


def _harvest_contexts(
    model: Any,
    place: _Place,
    state: dict[str, Any],
    contexts: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    names: list[str],
    positions: PositionChoice,
    bos: int | None,
    target: torch.dtype,
    batch_size: int,
    shard_contexts: int,
    stop: int | None,
    bar: Any,
) -> None:
    """Run ``contexts`` in batches, commit a shard every ``shard_contexts`` contexts, then mark ``state`` complete."""
    seen: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = act

    index = state.get("first_context", 0) + state["n_contexts"]  # the global index of the next context
    exhausted = False
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        while not exhausted:
            shard: dict[str, list[torch.Tensor]] = {
                k: [] for k in [*names, "tokens", "token_mask", "row_context", "row_position"]
            }
            n_ctx = n_tok = 0
            while n_ctx < shard_contexts:
                batch = list(islice(contexts, min(batch_size, shard_contexts - n_ctx)))
                if not batch:
                    exhausted = True
                    break
                tokens = torch.stack([t for t, _ in batch])
                mask = torch.stack([m for _, m in batch])
                model(
                    tokens.to(model.device),
                    attention_mask=None if bool(mask.all()) else mask.long().to(model.device),
                    return_type=None,
                    stop_at_layer=stop,
                )
                chosen = _select(positions, tokens, mask, index, bos)
                ctx_idx, pos_idx = chosen.nonzero(as_tuple=True)
                for n in names:
                    act = seen[n]
                    act = act.flatten(2) if act.ndim == 4 else act
                    shard[n].append(act[chosen.to(act.device)].to("cpu", target))
                seen.clear()
                shard["tokens"].append(tokens.to(torch.int32))
                shard["token_mask"].append(mask)
                shard["row_context"].append((ctx_idx + index).to(torch.int64))
                shard["row_position"].append(pos_idx.to(torch.int32))
                n_ctx += len(batch)
                n_tok += int(mask.sum())
                index += len(batch)
                bar.update(int(mask.sum()))
            if n_ctx:
                _commit_shard(place, state, {k: torch.cat(v).contiguous() for k, v in shard.items()}, n_ctx, n_tok)
    state["complete"] = True
    _write_manifest(place.state, state)


def _commit_shard(
    place: _Place, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], n_ctx: int, n_tok: int
) -> None:
    i = len(manifest["shards"])
    path = place.shards / f"shard_{i:05d}.safetensors"
    try:
        _fsync_write(path, writer=lambda tmp: write_safetensors(tmp, tensors))
        entry = {
            "file": path.relative_to(place.root).as_posix(),
            "first_context": manifest.get("first_context", 0) + manifest["n_contexts"],
            "n_contexts": n_ctx,
            "n_rows": int(tensors["row_context"].shape[0]),
            "n_tokens": n_tok,
            "bytes": path.stat().st_size,
        }
        new = {
            **manifest,
            "shards": [*manifest["shards"], entry],
            "n_contexts": manifest["n_contexts"] + n_ctx,
            "n_rows": manifest["n_rows"] + entry["n_rows"],
            "n_tokens": manifest["n_tokens"] + n_tok,
        }
        _write_manifest(place.state, new)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OSError(
            e.errno,
            f"writing activation shard {path.name} in {place.shards} failed ({reason}); the dataset keeps "
            f"its {len(manifest['shards'])} complete shard(s) ({manifest['n_rows']} rows). Free "
            f"space and rerun the same harvest to continue from there",
        ) from e
    manifest.update(new)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _fsync_write(path, json.dumps(manifest, indent=1).encode())


def _fresh_manifest(model: Any, fingerprint: dict[str, Any]) -> dict[str, Any]:
    from .sae.core import site_width

    return {
        "format": FORMAT,
        "model_name": model.cfg.model_name,
        "processing": list(model.cfg.processing),
        "d_vocab": model.cfg.d_vocab,
        "dtype": fingerprint["dtype"],
        "sites": {name: site_width(model, name) for name in fingerprint["sites"]},
        "context_size": fingerprint["context_size"],
        "fingerprint": fingerprint,
        "shards": [],
        "n_contexts": 0,
        "n_rows": 0,
        "n_tokens": 0,
        "complete": False,
    }


def _check_same_harvest(where: Path, manifest: dict[str, Any], fresh: dict[str, Any]) -> None:
    """Raise unless ``manifest`` (found in ``where``) records the harvest ``fresh`` starts."""
    for key in ("model_name", "processing"):
        if manifest.get(key) != fresh[key]:
            raise ValueError(
                f"{where} holds a harvest of another model ({key}: {manifest.get(key)!r}, this model "
                f"{fresh[key]!r}); use another out directory or delete it"
            )
    old, new = manifest.get("fingerprint", {}), fresh["fingerprint"]
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        raise ValueError(
            f"{where} holds a harvest made with other arguments (they differ in {', '.join(differ)}); "
            f"rerun with the same arguments (and number of processes) to continue it, or use another "
            f"out directory"
        )


def _resume(place: _Place, model: Any, fingerprint: dict[str, Any], first_context: int | None = None) -> dict[str, Any]:
    """The list of shards to continue from: the existing one (checked, damaged tail dropped) or a new one.
    ``first_context``: where a rank's range starts (its progress file records it)."""
    fresh = _fresh_manifest(model, fingerprint)
    if first_context is not None:
        fresh["first_context"] = first_context
    if place.state.exists():
        manifest = json.loads(place.state.read_text())
        _check_same_harvest(place.shards, manifest, fresh)
        good = []
        for entry in manifest["shards"]:
            try:
                if (place.root / entry["file"]).stat().st_size != entry["bytes"]:
                    raise ValueError("size")
                _open_shard(place.root / entry["file"])
            except (OSError, ValueError):
                warnings.warn(f"{place.root / entry['file']} is damaged: harvesting again from it on", stacklevel=3)
                break
            good.append(entry)
        if len(good) < len(manifest["shards"]):
            manifest = {
                **manifest,
                "shards": good,
                "complete": False,
                "n_contexts": sum(e["n_contexts"] for e in good),
                "n_rows": sum(e["n_rows"] for e in good),
                "n_tokens": sum(e["n_tokens"] for e in good),
            }
            _write_manifest(place.state, manifest)
    else:
        manifest = fresh
    listed = {(place.root / e["file"]).name for e in manifest["shards"]} | {place.state.name}
    # Temp files and shards a kill left unlisted; ".tmp*" are safetensors' own temp files (it
    # writes to ".tmpXXXXXX" beside the target, then renames). Under torchrun each rank
    # cleans only its own directory.
    for f in place.shards.iterdir():
        if (
            f.is_file()
            and f.name not in listed
            and f.name.startswith((".shard_", ".manifest", f".{PROGRESS}", "shard_", ".tmp"))
        ):
            f.unlink()
    if not place.state.exists():
        _write_manifest(place.state, manifest)
    return manifest


def _done(out: Path, model: Any, fingerprint: dict[str, Any]) -> bool:
    """Whether ``out`` holds this harvest complete, with every shard there; raises if it
    holds another harvest. A finished harvest is the same dataset whatever the number of
    processes that wrote it; an unfinished one continues only with as many. Reads only
    (under torchrun every rank asks, and gets the same answer)."""
    path = out / MANIFEST
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    fresh = _fresh_manifest(model, fingerprint)
    done = bool(manifest["complete"]) and all(
        (out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["bytes"] for e in manifest["shards"]
    )
    if done:

        def any_world(m: dict[str, Any]) -> dict[str, Any]:
            return {**m, "fingerprint": {k: v for k, v in m.get("fingerprint", {}).items() if k != "world_size"}}

        manifest, fresh = any_world(manifest), any_world(fresh)
    _check_same_harvest(out, manifest, fresh)
    return done


def _write_rank_manifest(
    out: Path, model: Any, fingerprint: dict[str, Any], states: list[Any], bounds: list[tuple[int, int]]
) -> None:
    """Rank 0, once every rank reported: the manifest listing every rank's shards in context order."""
    shards = []
    for r, (state, (lo, hi)) in enumerate(zip(states, bounds, strict=True)):
        if not state["complete"] or state["first_context"] != lo or state["n_contexts"] != hi - lo:
            raise ValueError(
                f"rank {r} reported contexts [{state['first_context']}, {state['first_context'] + state['n_contexts']})"
                f"{'' if state['complete'] else ' (incomplete)'}, expected [{lo}, {hi})"
            )
        for entry in state["shards"]:
            f = out / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise FileNotFoundError(
                    f"rank {r}'s shard {f} is not there (or not whole) as rank 0 sees it: the out "
                    f"directory must be on a filesystem every rank shares"
                )
        shards.extend(state["shards"])
    manifest = {
        **_fresh_manifest(model, fingerprint),
        "world_size": fingerprint["world_size"],
        "shards": shards,
        "n_contexts": sum(e["n_contexts"] for e in shards),
        "n_rows": sum(e["n_rows"] for e in shards),
        "n_tokens": sum(e["n_tokens"] for e in shards),
        "complete": True,
    }
    _write_manifest(out / MANIFEST, manifest)


# Reading -----------------------------------------------------------------------------------
class ActivationDataset:
    """A harvested dataset (see the module docstring), memory-mapped shard by shard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path} has no {MANIFEST}: it is not a harvested activation dataset")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.path / MANIFEST} is format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.sites: list[str] = list(self.manifest["sites"])
        self.dtype = DTYPES[self.manifest["dtype"]]
        for entry in self.manifest["shards"]:  # a cheap check of every shard now; the header when first read
            f = self.path / entry["file"]
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
            tensors = _open_shard(self.path / entry["file"])
            if tensors["row_context"].shape[0] != entry["n_rows"]:
                raise ValueError(
                    f"activation shard {entry['file']} has {tensors['row_context'].shape[0]} rows, the "
                    f"manifest says {entry['n_rows']}: rerun harvest with the same arguments"
                )
            self._shards[i] = shard = tensors
        return shard

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np.uint16:  # bfloat16, which numpy lacks
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def rows(
        self, index: Sequence[int] | np.ndarray | torch.Tensor, site: str | None = None, device: Any = None
    ) -> torch.Tensor:
        """Rows [len(index), width] of ``site``, in the order given."""
        site = self._site(site)
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a dataset of {len(self)} rows")
        shard_of = np.searchsorted(self._row_starts, index, side="right") - 1
        out = torch.empty(len(index), self.width(site), dtype=self.dtype)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            local = index[where] - self._row_starts[s]
            out[torch.from_numpy(where)] = self._to_torch(self._shard(int(s))[site][local])
        return out if device is None else out.to(device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        return self.rows(np.atleast_1d(np.asarray(index)))

    def batches(
        self,
        site: str | None = None,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        device: Any = None,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Batches [batch, width] of ``site``: in order, or a seeded shuffle of all rows."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            yield self.rows(np.sort(idx) if shuffle else idx, site, device)

    def tokens_of(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row: its context's tokens [rows, context_size] and its position [rows]."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
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

    def check_model(self, model: Any) -> None:
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


# Command line (registered by cli.py) ----------------------------------------------------
def add_harvest_arguments(p: Any) -> None:
    from .resolution import DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"preset, HF repo id, directory or .gguf (default: {DEFAULT_MODEL}, embedded)",
    )
    p.add_argument("--no-processing", action="store_true", help="load the weights unprocessed (no fold_ln etc.)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--data", required=True, help="a text file (documents separated by blank lines) or .jsonl file")
    p.add_argument("--text-key", default="text", help="the field holding the text in a .jsonl file (default: text)")
    p.add_argument("--sites", nargs="+", required=True, help="hook names or globs, e.g. blocks.3.hook_resid_post")
    p.add_argument("--out", required=True, help="the dataset directory (rerun with the same arguments to resume)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--positions", choices=["all", "last"], default="all")
    p.add_argument("--keep-bos", action="store_true", help="keep BOS tokens' activations (left out by default)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens of context per shard (default: 65536)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens of contexts")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        help="under torchrun: seconds a rank that finished waits for the others before failing (default: 1800)",
    )


def run_harvest(args: Any) -> int:
    """The ``harvest`` command; under ``torchrun --nproc-per-node N`` the N ranks share the corpus."""
    import torch.distributed as dist

    from .model import HookedTransformer

    timeout = datetime.timedelta(seconds=args.timeout)
    rank, world = init_distributed(timeout=timeout)
    try:
        load = (
            HookedTransformer.from_pretrained_no_processing if args.no_processing else HookedTransformer.from_pretrained
        )
        model = load(args.model, device=args.device if args.device or world == 1 else local_device())
        ds = harvest(
            model,
            args.data,
            args.sites,
            args.out,
            context_size=args.context_size,
            batch_size=args.batch_size,
            positions=args.positions,
            exclude_bos=not args.keep_bos,
            dtype=args.dtype,
            shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens,
            text_key=args.text_key,
            timeout=timeout,
        )
        if rank == 0:
            print(
                f"{ds.path}: {len(ds)} rows of {', '.join(ds.sites)} from {ds.manifest['n_tokens']} tokens in "
                f"{len(ds.manifest['shards'])} shard(s)" + (f" over {world} processes" if world > 1 else "")
            )
        if world > 1:
            barrier(timeout)  # no rank tears the group down while another still uses it
        return 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
