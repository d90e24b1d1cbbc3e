"""Where a harvest keeps its state and how a rerun continues it (``harvest.py``'s bookkeeping):
the manifest a harvest starts with, the check that a directory holds this same harvest (its
resume key), the shards a rerun keeps (a damaged tail dropped), whether a harvest is done,
and, under torchrun, the manifest that lists every rank's shards."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .resume import check_same
from .shards import FORMAT, MANIFEST, PROGRESS, SHARD_NAME, open_shard, read_manifest, shard_path, write_manifest


@dataclass(frozen=True)
class Place:
    """Where one writer keeps its shards and the JSON that lists them: the dataset directory
    and its manifest (one process), or a rank's directory and progress file (under torchrun).
    Shard entries name their file relative to ``root``, the dataset directory; ``shards``:
    the directory of the writer's shards; ``state``: its JSON (manifest or progress file)."""

    root: Path
    shards: Path
    state: Path

    @staticmethod
    def of_rank(root: Path, rank: int) -> Place:
        """The place of ``rank`` of a data-parallel harvest into ``root``."""
        shards = root / f"rank_{rank:05d}"
        return Place(root, shards, shards / PROGRESS)


def fresh_manifest(fingerprint: dict[str, Any], about: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a harvest with the resume key ``fingerprint`` of the model ``about``
    describes (``harvest._about``: name, processing, vocabulary, site widths), before any shard."""
    return {
        "format": FORMAT,
        "model_name": about["model_name"],
        "processing": about["processing"],
        "d_vocab": about["d_vocab"],
        "dtype": fingerprint["dtype"],
        "sites": about["sites"],
        "context_size": fingerprint["context_size"],
        "fingerprint": fingerprint,
        "shards": [],
        "n_contexts": 0,
        "n_rows": 0,
        "n_tokens": 0,
        "complete": False,
    }


def check_same_harvest(where: Path, manifest: dict[str, Any], fresh: dict[str, Any]) -> None:
    """Raise unless ``manifest`` (found in ``where``) records the harvest the manifest ``fresh`` starts,
    naming every entry of the resume key that differs."""
    old = {k: manifest.get(k) for k in ("model_name", "processing")} | manifest.get("fingerprint", {})
    new = {k: fresh[k] for k in ("model_name", "processing")} | fresh["fingerprint"]
    check_same(
        where,
        "a harvest",
        old,
        new,
        f"delete {where} or pass another out directory (and the same number of processes to continue)",
    )


def resume(
    place: Place, fingerprint: dict[str, Any], about: dict[str, Any], first_context: int | None = None
) -> dict[str, Any]:
    """The list of shards to continue from in ``place``: the existing one (checked against the
    resume key ``fingerprint`` and the model ``about``, damaged tail dropped) or a new one.
    ``first_context``: where a rank's range starts (its progress file records it)."""
    fresh = fresh_manifest(fingerprint, about)
    if first_context is not None:
        fresh["first_context"] = first_context
    if place.state.exists():
        manifest = read_manifest(
            place.state, place.root, "manifest" if place.state.name == MANIFEST else "progress file"
        )
        check_same_harvest(place.shards, manifest, fresh)
        good = []
        for entry in manifest["shards"]:
            f = shard_path(place.root, entry["file"], place.state)
            try:
                if f.stat().st_size != entry["bytes"]:
                    raise ValueError("size")
                open_shard(f)
            except (OSError, ValueError):
                warnings.warn(f"{f} is damaged: harvesting again from it on", stacklevel=3)
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
            write_manifest(place.state, manifest)
    else:
        manifest = fresh
    # The temporary files a kill left (exactly the names fsync_write gives); an unlisted shard a
    # kill left is rewritten in place when the harvest reaches it. Nothing else is deleted.
    for f in place.shards.iterdir():
        if f.is_file() and (
            f.name == f".{place.state.name}.tmp"
            or (f.name.startswith(".") and SHARD_NAME.fullmatch(f.name[1:].removesuffix(".tmp")) and f.suffix == ".tmp")
        ):
            f.unlink()
    if not place.state.exists():
        write_manifest(place.state, manifest)
    return manifest


def finished(out: Path, fingerprint: dict[str, Any], about: dict[str, Any]) -> bool:
    """Whether ``out`` holds this harvest (the resume key ``fingerprint``, the model ``about``)
    complete, with every shard there; raises if it holds another harvest. A finished harvest
    is the same dataset whatever the number of processes that wrote it; an unfinished one
    continues only with as many. Reads only (under torchrun every rank asks, and gets the
    same answer)."""
    path = out / MANIFEST
    if not path.exists():
        return False
    manifest = read_manifest(path, out)
    fresh = fresh_manifest(fingerprint, about)
    done = bool(manifest["complete"]) and all(
        (f := shard_path(out, e["file"], path)).is_file() and f.stat().st_size == e["bytes"] for e in manifest["shards"]
    )
    if done:

        def any_world(m: dict[str, Any]) -> dict[str, Any]:
            return {**m, "fingerprint": {k: v for k, v in m.get("fingerprint", {}).items() if k != "world_size"}}

        manifest, fresh = any_world(manifest), any_world(fresh)
    check_same_harvest(out, manifest, fresh)
    return done


def write_rank_manifest(
    out: Path, fingerprint: dict[str, Any], about: dict[str, Any], states: list[Any], bounds: list[tuple[int, int]]
) -> None:
    """Rank 0, once every rank reported its ``states`` (progress files): the manifest of ``out``
    (resume key ``fingerprint``, model ``about``) listing every rank's shards in context order,
    each rank's range checked against its ``bounds``."""
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
        **fresh_manifest(fingerprint, about),
        "world_size": fingerprint["world_size"],
        "shards": shards,
        "n_contexts": sum(e["n_contexts"] for e in shards),
        "n_rows": sum(e["n_rows"] for e in shards),
        "n_tokens": sum(e["n_tokens"] for e in shards),
        "complete": True,
    }
    write_manifest(out / MANIFEST, manifest)
