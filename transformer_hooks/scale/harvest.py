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

A model split over processes (``pipeline_ranks``: every rank runs the same forward) makes
ONE harvest instead: every rank reads the corpus alike and runs every batch, each batch's
activations reach rank 0 (``model.blocks.from_sites``), and rank 0 alone holds ``out``,
decides where a rerun starts and writes shards and manifest as one process does (the same
files, byte for byte; a rerun by one process, or by another split, continues it). A rank
that fails or dies fails every rank; the manifest keeps its complete shards.

``ActivationDataset(DIR)`` (dataset.py) reads it back.
"""

from __future__ import annotations

import datetime
import errno
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weights_conversion.sources import write_safetensors

from ..progress import tqdm
from ..protocol import HookedModel
from ..sites import layer_of
from ..tokens import bos_id, pad_id
from .corpus import Corpus, PositionChoice, corpus_hash, pack_contexts, select_positions
from .dataset import ActivationDataset
from .harvest_resume import Place, finished, fresh_manifest, resume, write_rank_manifest
from .process_group import (
    DEFAULT_TIMEOUT,
    RankFailedError,
    exchange,
    init_distributed,
    launched_by_torchrun,
    rank_and_world,
    shard_bounds,
)
from .resume import KEY_VERSION, tensor_hash, tokenizer_hash, unnamed, weights_hash
from .shards import (
    DTYPES,
    FORMAT,
    MANIFEST,
    check_owned,
    fsync_write,
    holding,
    write_manifest,
)

# Also the names of the old path ``transformer_hooks.activations`` (a star re-export of this module).
__all__ = ["DTYPES", "FORMAT", "MANIFEST", "ActivationDataset", "harvest"]


def _site_layer(site: str) -> int | None:
    """The block a site is in (-1 before the blocks; None after them)."""
    layer = layer_of(site)
    if layer is not None:
        return layer
    return -1 if site in ("hook_embed", "hook_pos_embed", "hook_tokens") else None


def _cut(
    contexts: Iterator[tuple[torch.Tensor, torch.Tensor]], start: int, last: int, keep: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``contexts`` (the first is context ``start``) with context ``last`` cut to its first
    ``keep`` positions: the rest becomes padding, so the harvest holds exactly ``max_tokens``."""
    for i, (tokens, mask) in enumerate(contexts, start):
        if i == last and keep < len(tokens):
            tokens, mask = tokens.clone(), mask.clone()
            tokens[keep:], mask[keep:] = pad, False
        yield tokens, mask


# Harvest -----------------------------------------------------------------------------------
def harvest(
    model: HookedModel,
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
    resume_name: str | None = None,
    progress: bool = True,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> ActivationDataset | None:
    """Stream ``corpus`` through ``model`` and store ``sites`` at ``positions`` in ``out``.

    ``corpus``: a text or .jsonl file, a list of strings, a token stream [n] or token
    contexts [n, context_size] (with ``attention_mask`` for padding). ``sites``: hook names
    or globs. ``positions``: ``"all"`` real tokens, ``"last"`` (the last real token of each
    context), a bool mask [contexts, context_size], or a function of a batch's tokens
    [batch, context_size] giving one. ``dtype``: float32, float16 or bfloat16.
    ``max_tokens``: exactly that many tokens of contexts (the last context cut short).
    ``batch_size``: contexts per forward. ``exclude_bos``: BOS positions make no row.
    ``shard_tokens``: about how many tokens of contexts each shard holds. ``prepend_bos``:
    each context starts with BOS (None: the model's rule). ``text_key``: the field of a
    .jsonl line that holds its text. ``progress``: a progress bar (rank 0's under torchrun).

    ``out`` is a new or empty directory, or one of harvest's datasets: a rerun with the same
    inputs continues an interrupted harvest (or returns the finished one); one with other
    inputs is refused, naming what changed (the resume key: the weights' content hash, the
    tokenizer, the corpus's content hash, sites, every position and masking option, sizes,
    dtype, the format version). A one-shot iterable corpus or a positions function cannot
    be hashed: ``resume_name`` names them, and without it such a harvest cannot be resumed.
    One harvest at a time holds ``out`` (a lock file). Returns the dataset.

    Under ``torchrun`` (or with a process group initialised) every rank calls this with
    the same arguments and ``out`` on a filesystem they share: each takes a contiguous
    range of the contexts, writes its shards under ``out/rank_NNNNN/``, and rank 0 writes
    the manifest once every rank reported its shards complete; the dataset is the one a
    single process writes, row for row. Each rank reads (tokenises) the corpus once to count
    its contexts, then again up to the end of its range; a one-shot iterable cannot be
    shared. ``timeout``: how long a rank that finished waits for the others (a rank that
    dies fails them at once).

    A model split over processes (``pipeline_ranks``): every rank calls this alike (as
    torchrun runs one script) and runs every batch; rank 0 writes ``out`` (it need not be
    shared) exactly as one process, and returns the dataset; the other ranks return None.
    The resume key hashes every rank's weights. A failure on any rank raises
    ``RankFailedError`` on every rank (within ``timeout``, or the model's
    ``pipeline_timeout`` for a transfer of the forward) and the manifest keeps the complete
    shards, which a rerun continues.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for arg, value, least in (
        ("context_size", context_size, 2),
        ("batch_size", batch_size, 1),
        ("shard_tokens", shard_tokens, 1),
        ("max_tokens", 1 if max_tokens is None else max_tokens, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{arg} must be an int of at least {least}, got {value!r}")
    names = model.resolve_hook_names(sites)
    if not names:
        raise ValueError(f"sites={sites!r} names no hook site: name at least one, e.g. 'blocks.0.hook_resid_post'")
    for name in names:
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            raise ValueError(f"{name} is per (query, key) pair, not per position; harvest takes per-position sites")
    out = Path(out)
    prepend_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    bos = None
    if exclude_bos:
        try:
            bos = bos_id(model.tokenizer, model.cfg)
        except ValueError:  # no BOS token: nothing to leave out
            bos = None
    shard_contexts = max(1, shard_tokens // (context_size * batch_size)) * batch_size
    max_contexts = None if max_tokens is None else math.ceil(max_tokens / context_size)
    layers = [_site_layer(n) for n in names]
    known = [layer for layer in layers if layer is not None]
    stop = None if len(known) < len(layers) else max(known) + 1
    if callable(positions):
        positions_key = f"named {resume_name}" if resume_name is not None else unnamed("positions function")
    elif isinstance(positions, str):
        positions_key = positions
    else:
        chosen = torch.as_tensor(positions)
        if chosen.ndim != 2 or chosen.shape[1] != context_size:
            raise ValueError(
                f"positions mask has shape {tuple(chosen.shape)}; expected [contexts, context_size={context_size}]"
            )
        if isinstance(corpus, (torch.Tensor, np.ndarray)) and corpus.ndim == 2 and chosen.shape[0] < corpus.shape[0]:
            raise ValueError(
                f"positions mask has {chosen.shape[0]} rows for {corpus.shape[0]} contexts: one row per context"
            )
        positions_key = tensor_hash(chosen.bool())
    fingerprint = {
        "key_version": KEY_VERSION,
        "weights": weights_hash(model, timeout),
        "tokenizer": tokenizer_hash(model.tokenizer),
        "corpus": corpus_hash(corpus, resume_name),
        "attention_mask": None if attention_mask is None else tensor_hash(torch.as_tensor(attention_mask).bool()),
        "max_tokens": max_tokens,
        "sites": names,
        "context_size": context_size,
        "batch_size": batch_size,
        "positions": positions_key,
        "exclude_bos": exclude_bos,
        "dtype": dtype,
        "shard_contexts": shard_contexts,
        "max_contexts": max_contexts,
        "prepend_bos": prepend_bos,
        "text_key": text_key,
    }

    about = _about(model, names)

    def contexts(start: int, end: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Contexts [start, end) of the corpus (the ones before ``start`` are read and dropped);
        with ``max_tokens``, the context that reaches it ends there (the rest is padding)."""
        packed = islice(pack_contexts(model, corpus, context_size, prepend_bos, text_key, attention_mask), start, end)
        if max_tokens is None or max_contexts is None:
            return packed
        keep = max_tokens - (max_contexts - 1) * context_size
        return _cut(packed, start, max_contexts - 1, keep, pad_id(model.tokenizer, model.cfg))

    def run(place: Place | None, state: dict[str, Any], end: int | None, desc: str, show: bool) -> None:
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

    desc = f"harvesting {len(names)} site(s)"
    if model.blocks.processes > 1:  # one harvest, run by every rank of the split model
        return _split_harvest(model, out, fingerprint, about, run, max_contexts, desc, progress, timeout)
    check_owned(out)
    out.mkdir(parents=True, exist_ok=True)
    if launched_by_torchrun():
        init_distributed(timeout=timeout)
    rank, world = rank_and_world()
    if world == 1:
        with holding(out):
            if finished(out, fingerprint, about):
                return ActivationDataset(out)
            place = Place(out, out, out / MANIFEST)
            manifest = resume(place, fingerprint, about)
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
    if finished(out, fingerprint, about):
        return ActivationDataset(out)
    consequence = (
        f"The manifest of {out} lists no row of this run; rerun the same harvest to continue from "
        f"each rank's last complete shard."
    )
    place = Place.of_rank(out, rank)
    state: dict[str, Any] | None = None
    error: BaseException | None = None
    locks = ExitStack()
    try:
        locks.enter_context(holding(out, shared=True))  # the ranks of this harvest share the directory,
        locks.enter_context(holding(place.shards))  # and each holds its own
        if rank == 0:  # an empty, incomplete dataset until every rank has finished
            write_manifest(out / MANIFEST, {**fresh_manifest(fingerprint, about), "world_size": world})
        place.shards.mkdir(exist_ok=True)
        state = resume(place, {**fingerprint, "rank": rank, "contexts": [lo, hi]}, about, first_context=lo)
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
                write_rank_manifest(out, fingerprint, about, states, bounds)
            except Exception as e:  # noqa: BLE001
                error = e
                write_error = f"writing the manifest: {type(e).__name__}: {e}"
        exchange(write_error, None, timeout=timeout, what="to finish the harvest", consequence=consequence)
    except RankFailedError as e:
        if error is not None:  # this rank's own failure: keep its traceback
            raise e from error
        raise
    finally:
        locks.close()
    return ActivationDataset(out)


def _split_harvest(
    model: HookedModel,
    out: Path,
    fingerprint: dict[str, Any],
    about: dict[str, Any],
    run: Any,
    end: int | None,
    desc: str,
    show: bool,
    timeout: datetime.timedelta,
) -> ActivationDataset | None:
    """The harvest of a model split over processes: one harvest, not one per rank. Rank 0
    (the rank that gets the output) alone opens ``out``, decides where the harvest starts
    (``harvest_resume.finished``, ``resume``) and tells every rank; every rank then reads the
    corpus alike and runs every batch (``run``, up to context ``end``), each batch's sites reach rank 0,
    and rank 0 writes the shards and the manifest as one process does. A rank that fails
    or dies fails every rank (``exchange``, within ``timeout``; a transfer of the forward
    waits at most the model's ``pipeline_timeout``); the manifest lists only complete
    shards, and a rerun continues after them. Returns the dataset on rank 0, None elsewhere."""
    writer = model.blocks.gets_output
    place = Place(out, out, out / MANIFEST)
    state: dict[str, Any] | None = None
    start: int | None = None
    error: BaseException | None = None
    consequence = "Nothing was harvested."
    locks = ExitStack()
    try:
        try:
            if writer:
                check_owned(out)
                out.mkdir(parents=True, exist_ok=True)
                locks.enter_context(holding(out))
                if not finished(out, fingerprint, about):
                    state = resume(place, fingerprint, about)
                    start = None if state["complete"] else state["n_contexts"]
        except Exception as e:  # noqa: BLE001  (reported to every rank below, then raised)
            error = e
        start = exchange(_report(error), start, timeout=timeout, what=f"opening {out}", consequence=consequence)[0]
        if start is not None:
            try:
                mine = state if writer and state is not None else {"n_contexts": start, "n_tokens": 0}
                run(
                    place if writer else None,
                    mine,
                    end,
                    f"{desc} (over {model.blocks.processes} processes)",
                    show and writer,
                )
            except Exception as e:  # noqa: BLE001
                error = e
            consequence = f"The manifest of {out} lists only complete shards: rerun the same harvest to continue."
            exchange(_report(error), None, timeout=timeout, what="harvesting", consequence=consequence)
    except RankFailedError as e:
        if isinstance(error, RankFailedError):  # a transfer of the forward failed first: it names the rank
            raise RankFailedError(f"{error} {consequence}") from e
        if error is not None and e is not error:  # this rank's own failure: keep its traceback and name it
            own = _report(error) or ""
            raise (e if own in str(e) else RankFailedError(f"{e} This rank's error: {own}")) from error
        raise
    finally:
        locks.close()
    return ActivationDataset(out) if writer else None


def _report(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _harvest_contexts(
    model: HookedModel,
    place: Place | None,
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
    """Run ``contexts`` in batches, commit a shard every ``shard_contexts`` contexts, then mark ``state`` complete.
    Split over processes, every rank runs the batches and rank 0 (``place``; None elsewhere) writes."""
    seen: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = act

    index = state.get("first_context", 0) + state["n_contexts"]  # the global index of the next context
    exhausted = False
    failure: Exception | None = None
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
                got = model.blocks.from_sites(seen, names)  # split over processes: every site on rank 0
                seen.clear()
                first = index  # the batch's first context
                n_ctx += len(batch)
                index += len(batch)
                if got is None or failure is not None:  # another rank of a split model: rank 0 keeps the rows
                    continue
                try:
                    kept = _keep_rows(shard, got, positions, tokens, mask, first, bos, target)
                except Exception as e:
                    if model.blocks.processes == 1:
                        raise
                    failure = e  # split over processes: the other ranks learn it at the shard's end
                    continue
                n_tok += kept
                bar.update(kept)
            if n_ctx and not _committed(model, place, state, shard, n_ctx, n_tok, failure):
                return  # rank 0 of a split model failed: it reports its error to every rank
    if place is not None:
        state["complete"] = True
        write_manifest(place.state, state)


def _keep_rows(
    shard: dict[str, list[torch.Tensor]],
    got: dict[str, torch.Tensor],
    positions: PositionChoice,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    first: int,
    bos: int | None,
    target: torch.dtype,
) -> int:
    """Add to ``shard`` the rows of one batch (contexts ``first``, ...; ``tokens`` and ``mask``
    [batch, context_size]): each site's activation in ``got`` at the chosen ``positions``
    (``bos`` left out), as ``target``; returns the batch's number of real tokens."""
    chosen = select_positions(positions, tokens, mask, first, bos)
    ctx_idx, pos_idx = chosen.nonzero(as_tuple=True)
    for name, act in got.items():
        act = act.flatten(2) if act.ndim == 4 else act
        shard[name].append(act[chosen.to(act.device)].to("cpu", target))
    shard["tokens"].append(tokens.to(torch.int32))
    shard["token_mask"].append(mask)
    shard["row_context"].append((ctx_idx + first).to(torch.int64))
    shard["row_position"].append(pos_idx.to(torch.int32))
    return int(mask.sum())


def _committed(
    model: HookedModel,
    place: Place | None,
    state: dict[str, Any],
    shard: dict[str, list[torch.Tensor]],
    n_ctx: int,
    n_tok: int,
    failure: Exception | None = None,
) -> bool:
    """Commit the ``shard`` of ``n_ctx`` contexts (``n_tok`` tokens) to ``place`` (None: another
    rank of a split model, which writes nothing) and say whether it was written; raises the
    writer's error, or its ``failure`` while making the shard. Split over processes, rank 0
    tells every rank whether to go on."""
    error = failure
    if place is not None and error is None:
        try:
            _commit_shard(place, state, {k: torch.cat(v).contiguous() for k, v in shard.items()}, n_ctx, n_tok)
        except Exception as e:  # noqa: BLE001  (the other ranks learn it failed, then it is raised)
            error = e
    status = model.blocks.share(None if place is None else {"written": torch.tensor(error is None)})
    if error is not None:
        raise error
    return bool(status["written"])


def _commit_shard(
    place: Place, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], n_ctx: int, n_tok: int
) -> None:
    i = len(manifest["shards"])
    path = place.shards / f"shard_{i:05d}.safetensors"
    try:
        fsync_write(path, writer=lambda tmp: write_safetensors(tmp, tensors))
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
        write_manifest(place.state, new)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OSError(
            e.errno,
            f"writing activation shard {path.name} in {place.shards} failed ({reason}); the dataset keeps "
            f"its {len(manifest['shards'])} complete shard(s) ({manifest['n_rows']} rows). Free "
            f"space and rerun the same harvest to continue from there",
        ) from e
    manifest.update(new)


def _about(model: HookedModel, names: list[str]) -> dict[str, Any]:
    """The manifest's record of the model: its name, processing, vocabulary and each site's
    width. Every rank calls it alike (split over processes, each width is measured by a
    forward of every rank)."""
    from ..sae.core import site_width

    return {
        "model_name": model.cfg.model_name,
        "processing": list(model.cfg.processing),
        "d_vocab": model.cfg.d_vocab,
        "sites": {name: site_width(model, name) for name in names},
    }
