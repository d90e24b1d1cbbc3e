"""Data-parallel work over prompts with ``torch.distributed``: run under ``torchrun``
(gloo on CPU, NCCL on GPU), each rank takes a contiguous shard of the prompts, and rank
0 gets every result in prompt order, exactly what one process computes alone.

    prompts [0 .. n)  --rank r of w takes [r*n//w, (r+1)*n//w)-->  fn(prompt) per prompt
                      --every rank reports ok / its error (all_gather)-->
                      --results gathered on rank 0, concatenated in rank order

Exactness: each prompt is computed by itself (never batched with its neighbours), so a
result does not depend on which rank computed it; the tests compare two gloo processes
with one process bit for bit.

Failure: a rank whose function raises still takes part in the status exchange, so every
rank raises ``RankFailedError`` naming it (no rank waits for results that will not come).
A rank that dies or hangs is caught by a barrier with a timeout (gloo's
``monitored_barrier`` names the missing rank) or by the process group's own timeout; the
result is never returned, so nothing partial is written. Without an initialised process
group (plain ``python``), everything runs in this process.

The process group itself (rank, world size, the barrier, the status exchange) lives in
``process_group`` and is re-exported here. Harvesting a corpus to disk under torchrun is
``activations.harvest`` (per-rank shards, one manifest); ``harvest(..., out=DIR)`` here
is that same function, and ``harvest`` without ``out`` gathers each prompt's cache in
memory (``gather_caches``).

A model split over processes (``pipeline_ranks``) cannot be data-parallel: every rank of it
must run the same forward. ``harvest(..., out=DIR)`` runs it as one harvest (every rank runs
every batch, rank 0 writes); ``gather_caches`` and ``patching_sweep`` refuse it on every rank,
naming the per-prompt call that works (``process_group.refuse_split_model``); a function
given to ``map_prompts`` must not run one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..progress import tqdm
from ..protocol import HookedModel
from .process_group import (
    DEFAULT_TIMEOUT,
    RankFailedError,
    all_gather_json,
    init_distributed,
    launched_by_torchrun,
    local_device,
    rank_and_world,
    refuse_split_model,
    shard_bounds,
)
from .process_group import barrier as _barrier
from .resume import KEY_VERSION, check_same, tensor_hash, tokenizer_hash, unnamed, weights_hash

__all__ = [  # the process group's names live in process_group; re-exported here, where they were first
    "DEFAULT_TIMEOUT",
    "RankFailedError",
    "ResultStore",
    "gather_caches",
    "harvest",
    "init_distributed",
    "job_fingerprint",
    "launched_by_torchrun",
    "local_device",
    "logit_diff_metric",
    "map_prompts",
    "patch_pair",
    "patching_sweep",
    "rank_and_world",
    "read_pairs",
    "shard_bounds",
    "write_results",
]

T = TypeVar("T")
R = TypeVar("R")


# Mapping over prompts ---------------------------------------------------------------------
def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


class ResultStore:
    """One file per finished item under ``directory``, so a run that was killed resumes where
    it stopped: items found there are read back instead of computed again.

    ``job`` (JSON: see ``job_fingerprint``) is the resume key: a directory holding another
    job's results is refused, naming what differs, never mixed in. A result is stored as
    safetensors (its tensors) with its structure as JSON in the file's metadata: nothing
    is unpickled, so a planted file cannot run code. Each file is written to a temporary
    name and renamed, so a kill leaves no half-written result.
    """

    def __init__(self, directory: str | os.PathLike[str], job: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        job = json.loads(json.dumps(job, sort_keys=True))  # as it reads back
        marker = self.directory / "job.json"
        if marker.exists():
            try:
                old = json.loads(marker.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"the resume file {marker} is damaged ({e}); delete the directory {self.directory} to start over"
                ) from None
            check_same(self.directory, "results of a job", old, job, f"delete {self.directory} or give another one")
        else:
            strangers = [f.name for f in self.directory.iterdir()]
            if strangers:
                raise FileExistsError(
                    f"the resume directory {self.directory} is not empty ({', '.join(sorted(strangers)[:5])}) and "
                    f"holds no job: give a new or empty directory"
                )
        tmp = marker.with_name(f"job.json.{os.getpid()}.partial")
        tmp.write_text(json.dumps(job, sort_keys=True))
        os.replace(tmp, marker)

    def path(self, index: int) -> Path:
        """The file that holds result ``index``."""
        return self.directory / f"{index:08d}.safetensors"

    def has(self, index: int) -> bool:
        """Whether result ``index`` is stored."""
        return self.path(index).exists()

    def load(self, index: int) -> Any:
        """Result ``index``, as stored."""
        from safetensors import safe_open

        path = self.path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
                structure = json.loads((f.metadata() or {})["structure"])
            return _unflatten(structure, tensors)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own types; any damage is one error)
            raise ValueError(
                f"the resumed result {path} is damaged ({type(e).__name__}: {e}); delete it and rerun: "
                f"that item is computed again"
            ) from None

    def save(self, index: int, value: Any) -> None:
        """Store ``value`` as result ``index`` (atomically)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        structure = json.dumps(_flatten(value, tensors))
        path = self.path(index)
        tmp = path.with_name(path.name + f".{os.getpid()}.partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"structure": structure})
        os.replace(tmp, path)


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (by number)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu()
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_flatten(v, tensors) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    raise TypeError(
        f"a result of type {type(value).__name__} cannot be kept in a resume directory: return tensors, "
        f"numbers, strings, or lists, tuples and str-keyed dicts of them"
    )


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "value":
        return body
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in body}
    raise ValueError(f"unknown node {kind!r}")


def _canonical(item: Any) -> Any:
    """An item as JSON that equals another item's exactly when they are equal: tensors and
    arrays by a content hash (a repr truncates them), containers element by element."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return {"tensor": tensor_hash(item)}
    if item is None or isinstance(item, (bool, int, float, str)):
        return item
    if isinstance(item, (list, tuple)):
        return [type(item).__name__, [_canonical(v) for v in item]]
    if isinstance(item, dict):
        return ["dict", sorted([json.dumps(_canonical(k)), _canonical(v)] for k, v in item.items())]
    raise TypeError(
        f"an item of type {type(item).__name__} cannot be fingerprinted for a resume directory: pass "
        f"tensors, numbers, strings, or lists, tuples and dicts of them"
    )


def job_fingerprint(items: Sequence[Any], **job: Any) -> dict[str, Any]:
    """What a ``ResultStore`` checks: the ``items`` (by content) and whatever else defines the work
    (``**job``: the model, the site, ...).
    """
    text = json.dumps([_canonical(item) for item in items], sort_keys=True)
    return {
        "key_version": KEY_VERSION,
        "n_items": len(items),
        "items_sha256": hashlib.sha256(text.encode()).hexdigest(),
        **job,
    }


def model_key(model: HookedModel) -> dict[str, Any]:
    """The model's part of a resume key: its weights by content (processing and dtype included), its tokenizer."""
    return {
        "model": model.cfg.model_name,
        "processing": list(model.cfg.processing),
        "dtype": str(model.dtype),
        "weights": weights_hash(model),
        "tokenizer": tokenizer_hash(getattr(model, "tokenizer", None)),
    }


def map_prompts(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    progress: bool = True,
    desc: str = "prompts",
    resume_dir: str | os.PathLike[str] | None = None,
    job: dict[str, Any] | None = None,
) -> list[R] | None:
    """``[fn(x) for x in items]``, sharded over the ranks of the process group.

    Rank 0 returns the whole list in ``items`` order (results moved to the CPU); other
    ranks return None. Every rank must call this with the same ``items``; ``fn`` must not
    run a model split over processes (each rank runs other items). If any rank's
    ``fn`` raises, every rank raises ``RankFailedError`` with that rank's error. The results go
    to rank 0 with ``torch.distributed.gather_object`` (pickled between this job's own ranks,
    so ``fn`` may return any object; nothing is read from files that way).
    ``progress``: a tqdm bar of rank 0's shard. ``resume_dir``: keep each result there as
    it is computed and reuse those found (see ``ResultStore``; ``job`` names what else,
    beyond the items, the results depend on: the model, the site, ...). ``timeout``: how long
    a rank waits for the others; ``desc``: the progress bar's label.
    """
    rank, world = rank_and_world()
    lo, hi = shard_bounds(len(items), rank, world)
    store = ResultStore(resume_dir, job_fingerprint(items, **(job or {}))) if resume_dir is not None else None

    def run(index: int) -> R:
        if store is not None and store.has(index):
            return store.load(index)
        result = _to_cpu(fn(items[index]))
        if store is not None:
            store.save(index, result)
        return result

    shard = tqdm(
        range(lo, hi),
        desc=desc if world == 1 else f"{desc} (rank 0 of {world})",
        disable=not progress or rank != 0,
        delay=1.0,
        leave=False,
    )
    if world == 1:
        return [run(i) for i in shard]
    mine: list[R] | None = None
    error: str | None = None
    try:
        mine = [run(i) for i in shard]
    except Exception as e:  # noqa: BLE001  (reported to every rank below, then raised)
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    _barrier(timeout)
    errors: list[str | None] = all_gather_json(error)
    failed = [(r, err) for r, err in enumerate(errors) if err is not None]
    if failed:
        r, err = failed[0]
        lo_r, hi_r = shard_bounds(len(items), r, world)
        others = f" (and ranks {[f for f, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise RankFailedError(
            f"rank {r}{others} failed on its prompts [{lo_r}, {hi_r}); no result was gathered. Its error: {err}"
        )
    gathered: list[list[R] | None] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    assert gathered is not None  # rank 0 gathers
    results: list[R] = []
    for part in gathered:
        assert part is not None  # every rank computed its part (failures were raised above)
        results.extend(part)
    return results


def gather_caches(
    model: HookedModel,
    prompts: Sequence[Any],
    names_filter: Any,
    *,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    progress: bool = True,
    resume_dir: str | os.PathLike[str] | None = None,
    resume_name: str | None = None,
) -> list[dict[str, torch.Tensor]] | None:
    """Each prompt's cache of ``names_filter``'s sites, one forward of ``model`` per prompt (text or
    token ids), sharded over the ranks; rank 0 gets ``[{name: activation}]`` in prompt order, in memory.

    ``reduce(name, activation)`` shrinks each before it is kept (e.g. the last position, a mean
    over positions). For a few prompts and for sites that are not per position (attention
    patterns); a corpus goes to disk with ``activations.harvest``. ``timeout`` and
    ``progress`` as in ``map_prompts``; ``resume_dir``: see ``map_prompts``; a resume cannot
    compare functions (a callable ``names_filter``, ``reduce``): ``resume_name`` names them,
    and without it they are never taken as the same.
    """

    refuse_split_model(
        model,
        "gather_caches",
        "call model.run_with_cache(prompt) for each prompt on every rank (rank 0 gets each cache), or "
        "harvest(model, prompts, sites, out=DIR), which runs a split model as one harvest",
    )

    def named(what: str) -> str:
        return f"named {resume_name}" if resume_name is not None else unnamed(what)

    def one(prompt: Any) -> dict[str, torch.Tensor]:
        tokens = model.to_tokens(prompt) if isinstance(prompt, str) else torch.tensor([list(prompt)])
        _, cache = model.run_with_cache(tokens.to(model.cfg.device or "cpu"), names_filter=names_filter)
        return {name: (act if reduce is None else reduce(name, act)) for name, act in cache.items()}

    return map_prompts(
        one,
        prompts,
        timeout=timeout,
        progress=progress,
        desc="harvest",
        resume_dir=resume_dir,
        job=None
        if resume_dir is None
        else model_key(model)
        | {
            "harvest": json.dumps(names_filter, default=repr) if not callable(names_filter) else named("names_filter"),
            "reduce": None if reduce is None else named("reduce"),
        },
    )


def harvest(
    model: HookedModel,
    prompts: Any,
    names_filter: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    progress: bool = True,
    resume_dir: str | os.PathLike[str] | None = None,
    resume_name: str | None = None,
    **dataset_options: Any,
) -> Any:
    """Activations of ``model`` over many ``prompts`` under ``torchrun``.

    With ``out``: the one harvest, ``activations.harvest(model, prompts, names_filter, out,
    ...)`` (each rank writes its shards there, one manifest covers them; every rank gets the
    ``ActivationDataset``; a model split over processes makes one harvest that rank 0 writes
    and returns); ``**dataset_options`` are that harvest's keyword options
    (``context_size``, ``batch_size``, ``positions``, ...). Without: ``gather_caches`` (each
    prompt's cache, gathered in memory on rank 0), with ``reduce`` and ``resume_dir`` (which
    a harvest to disk refuses: it resumes in ``out``). ``timeout``, ``progress`` and
    ``resume_name`` as in ``gather_caches``.
    """
    if out is not None:
        if reduce is not None or resume_dir is not None:
            raise ValueError(
                "harvest(..., out=DIR) writes a dataset, which resumes in DIR itself and keeps "
                "activations per position: drop reduce= and resume_dir= (or drop out= to gather caches)"
            )
        from .harvest import harvest as harvest_to_disk

        return harvest_to_disk(
            model,
            prompts,
            names_filter,
            Path(out),
            timeout=timeout,
            progress=progress,
            resume_name=resume_name,
            **dataset_options,
        )
    if dataset_options:
        raise TypeError(f"{sorted(dataset_options)} are options of a harvest to disk: pass out=DIR as well")
    return gather_caches(
        model,
        prompts,
        names_filter,
        reduce=reduce,
        timeout=timeout,
        progress=progress,
        resume_dir=resume_dir,
        resume_name=resume_name,
    )


# Patching sweeps over prompt pairs ----------------------------------------------------------
def logit_diff_metric(answer: int, contrast: int, pos: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits[:, pos, answer] - logits[:, pos, contrast], averaged over the batch."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, pos, answer] - logits[:, pos, contrast]).mean()

    return metric


def _pair_tokens(model: HookedModel, pair: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(clean [1, pos], corrupt [1, pos], answer id, contrast id) of one prompt pair.

    A pair gives ``clean`` / ``corrupt`` as text or token-id lists, and ``answer`` /
    ``contrast`` as a single-token string or a token id."""

    def tokens(key: str) -> torch.Tensor:
        value = pair.get(key)
        if value is None:
            raise ValueError(f"prompt pair {pair!r} has no {key!r}")
        if isinstance(value, str):
            return model.to_tokens(value)
        return torch.tensor([list(value)], dtype=torch.long)

    def token_id(key: str) -> int:
        value = pair.get(key)
        if value is None:
            raise ValueError(f"prompt pair {pair!r} has no {key!r}")
        return model.to_single_token(value) if isinstance(value, str) else int(value)

    clean, corrupt = tokens("clean"), tokens("corrupt")
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean and corrupt prompts must have the same number of tokens to patch position by "
            f"position; got {clean.shape[1]} and {corrupt.shape[1]} in {pair!r}"
        )
    for t in (clean, corrupt):
        if int(t.max()) >= model.cfg.d_vocab or int(t.min()) < 0:
            raise ValueError(f"token ids of {pair!r} are outside the vocabulary [0, {model.cfg.d_vocab})")
    return clean, corrupt, token_id("answer"), token_id("contrast")


def patch_pair(
    model: HookedModel, pair: dict[str, Any], activation_name: str = "resid_pre", attribution: bool = False
) -> torch.Tensor:
    """One pair's sweep on ``model``: TransformerLens's ``get_act_patch_{activation_name}`` (or
    ``get_attr_patch_...`` with ``attribution``) with the logit-difference metric; ``pair`` as
    ``read_pairs`` reads it.
    """
    from ..interventions import patching

    prefix = "get_attr_patch_" if attribution else "get_act_patch_"
    sweep = getattr(patching, prefix + activation_name, None)
    if sweep is None:
        known = sorted(n.removeprefix(prefix) for n in dir(patching) if n.startswith(prefix))
        raise ValueError(f"no {prefix}{activation_name} sweep; known: {', '.join(known)}")
    clean, corrupt, answer, contrast = _pair_tokens(model, pair)
    device = model.cfg.device or "cpu"
    clean, corrupt = clean.to(device), corrupt.to(device)
    _, clean_cache = model.run_with_cache(clean)
    # Activation patching: one bar for the whole shard (map_prompts), and only the last
    # position, the one the metric reads, is unembedded.
    options = {} if attribution else {"progress": False, "metric_positions": -1}
    return sweep(model, corrupt, clean_cache, logit_diff_metric(answer, contrast, pos=-1), **options)


def patching_sweep(
    model: HookedModel,
    pairs: Sequence[dict[str, Any]],
    activation_name: str = "resid_pre",
    *,
    attribution: bool = False,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    progress: bool = True,
    resume_dir: str | os.PathLike[str] | None = None,
) -> list[torch.Tensor] | None:
    """``patch_pair(model, pair, activation_name, attribution)`` for every one of ``pairs``,
    sharded over the ranks (``map_prompts``, with ``timeout`` and ``progress``); rank 0 gets
    the list in pair order. ``resume_dir``: results kept as they come, reused on a rerun.
    """
    refuse_split_model(
        model,
        "patching_sweep",
        "call patch_pair(model, pair, activation_name, attribution) for each pair on every rank (rank 0 gets "
        "each sweep)",
    )
    job = None if resume_dir is None else model_key(model) | {"sweep": activation_name, "attribution": attribution}
    return map_prompts(
        lambda pair: patch_pair(model, pair, activation_name, attribution),
        pairs,
        timeout=timeout,
        progress=progress,
        desc="prompt pairs",
        resume_dir=resume_dir,
        job=job,
    )


def read_pairs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The prompt pairs of the JSONL file ``path``, one JSON object per line: ``clean``,
    ``corrupt`` (text or token ids), ``answer``, ``contrast`` (a single-token string or a token
    id); ValueError naming the line otherwise.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from e
        if not isinstance(pair, dict) or not {"clean", "corrupt", "answer", "contrast"} <= set(pair):
            raise ValueError(
                f"{path}:{number}: each line must be an object with clean, corrupt, answer and "
                f"contrast, got {line.strip()[:80]!r}"
            )
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path} holds no prompt pairs")
    return pairs


def write_results(results: list[torch.Tensor], path: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write ``results`` and ``meta`` to ``path`` atomically (a temporary file renamed into place:
    a reader never sees a partial file); ``.json``: nested lists, otherwise ``torch.save`` of a
    dict. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".json":
        tmp.write_text(json.dumps({**meta, "results": [r.tolist() for r in results]}))
    else:
        torch.save({**meta, "results": results}, tmp)
    os.replace(tmp, path)
    return path
