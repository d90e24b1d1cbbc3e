"""The workers of tests/test_pipeline_harvest.py, in a module of their own: a spawned rank
imports only torch, transformer_hooks and the tiny tokenizer's sentences (not the test
module's checkpoint builders), so each rank starts in seconds.

``harvests(model, out)`` is what the test compares: the same calls run in one process (the
test's) and on every rank of a split model (``worker``)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers_util import SENTENCES

from transformer_hooks import HookedTransformer

# 8-token contexts, batches of 2, shards of 4 contexts: several shards per harvest.
KW: dict[str, Any] = dict(context_size=8, batch_size=2, shard_tokens=32, progress=False)
DOCS = SENTENCES * 2
# One site on each block's rank (2 ranks: blocks 0-1 | 2; 3 ranks: one block each).
EVERY_BLOCK = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.hook_mlp_out"]
# Harvests that stop early (stop_at_layer=2: the stream ends on the rank of block 2) and after the blocks.
HARVESTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "every_block": (EVERY_BLOCK, {}),
    "early_last": (["blocks.1.hook_resid_mid"], {"positions": "last"}),
    "after_blocks": (["ln_final.hook_normalized", "blocks.0.mlp.hook_post"], {"max_tokens": 45}),
}
SAE_SITE = "blocks.2.hook_resid_pre"
SAE_KW: dict[str, Any] = dict(d_sae=16, steps=4, batch_size=8, seed=3, progress=False)
PAIR = {"clean": [1, 17, 42, 8, 19, 5], "corrupt": [1, 17, 42, 8, 30, 5], "answer": 5, "contrast": 7}


def harvests(model: HookedTransformer, out: Path) -> dict[str, Any]:
    """Every harvest compared, into ``out``/name; each harvest's returned row count (None off rank 0)."""
    from transformer_hooks.scale.harvest import harvest

    got = {}
    for name, (sites, kw) in HARVESTS.items():
        ds = harvest(model, DOCS, sites, out / name, **KW, **kw)
        got[name] = None if ds is None else len(ds)
    return got


def _launch(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))


def _error(call: Any) -> str | None:
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def killed(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    """Rank 1 (blocks.1's) dies (no exception, no goodbye) in the fifth batch of a harvest, after
    rank 0 committed two shards (its first two forwards measured site widths)."""
    from transformer_hooks.scale.harvest import harvest

    _launch(rank, world, port)
    model = HookedTransformer.from_pretrained_no_processing(ckpt, pipeline_ranks=world, pipeline_timeout=5)
    forwards = []

    def count(act: torch.Tensor, hook: Any) -> None:
        forwards.append(1)
        if rank == 1 and len(forwards) == 7:
            os._exit(3)

    model.add_hook("blocks.1.hook_resid_pre", count)
    started = time.monotonic()
    sites, kw = HARVESTS["every_block"]
    error = _error(lambda: harvest(model, DOCS, sites, Path(out), **KW, **kw, timeout=datetime.timedelta(seconds=10)))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"error": error, "seconds": time.monotonic() - started}))
    os._exit(0)  # the group lost a rank: nothing to tear down


def worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    """Every check on a model split over ``world`` ranks; rank ``rank``'s report saved beside ``out``."""
    from transformer_hooks.sae.training import _harvest_in_memory, train_sae
    from transformer_hooks.scale import distributed
    from transformer_hooks.scale import harvest as activations
    from transformer_hooks.scale.resume import weights_hash

    _launch(rank, world, port)
    root = Path(out)
    model = HookedTransformer.from_pretrained_no_processing(ckpt, pipeline_ranks=world, pipeline_timeout=5)
    report: dict[str, Any] = {"rank": rank, "hash": weights_hash(model)}
    report["rows"] = harvests(model, root / "split")
    commits: list[int] = []
    real_commit = activations._commit_shard

    def commit(*args: Any) -> None:
        real_commit(*args)
        commits.append(1)

    activations._commit_shard = commit
    report["again"] = harvests(model, root / "split")  # complete: nothing is harvested again
    report["again_commits"] = len(commits)
    sites, kw = HARVESTS["every_block"]
    if (root / "killed").exists():  # the rerun of the harvest the killed launch left (rank 1 died mid-harvest)
        resumed = activations.harvest(model, DOCS, sites, root / "killed", **KW, **kw)
        report["resumed"] = None if resumed is None else len(resumed)
        report["resumed_commits"] = len(commits) - report["again_commits"]

    # Rank 0's disk fills at its second shard: every rank fails with rank 0's error; the rerun completes it.
    real_save = activations.write_safetensors

    def save(path: Any, tensors: Any) -> None:
        if rank == 0 and path.name.startswith(".shard_00001"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, tensors)

    activations.write_safetensors = save
    report["full_error"] = _error(lambda: activations.harvest(model, DOCS, sites, root / "full", **KW, **kw))
    if rank == 0:
        report["full_manifest"] = json.loads((root / "full" / "manifest.json").read_text())
    activations.write_safetensors = real_save
    report["full_rerun"] = _error(lambda: activations.harvest(model, DOCS, sites, root / "full", **KW, **kw))

    # A positions function (run by rank 0 alone) raises on its third batch: rank 0 goes on to
    # the shard's end, tells every rank, and every rank fails with its error, at once.
    def positions(tokens: torch.Tensor) -> torch.Tensor:
        chosen.append(1)
        if len(chosen) == 3:
            raise ValueError("no positions today")
        return torch.ones_like(tokens, dtype=torch.bool)

    chosen: list[int] = []
    started = time.monotonic()
    report["positions_error"] = _error(
        lambda: activations.harvest(
            model, DOCS, sites, root / "positions", **KW, positions=positions, resume_name="all of them"
        )
    )
    report["positions_seconds"] = time.monotonic() - started

    # Another weight on the last rank only: every rank's key changes, and the resume is refused.
    with torch.no_grad():
        param = model.blocks[2].mlp.W_out
        saved = param.detach().clone()
        if not param.is_meta:
            param += 1.0
    report["changed_hash"] = weights_hash(model)
    report["changed_error"] = _error(
        lambda: activations.harvest(model, DOCS, sites, root / "split" / "every_block", **KW, **kw)
    )
    with torch.no_grad():
        param.copy_(saved)  # (x + 1) - 1 need not be x
    report["restored_hash"] = weights_hash(model)

    # The data-parallel entry points refuse a split model on every rank.
    report["gather_error"] = _error(
        lambda: distributed.gather_caches(model, ["The capital"], "blocks.0.hook_resid_post")
    )
    report["sweep_error"] = _error(lambda: distributed.patching_sweep(model, [PAIR]))
    report["pair"] = distributed.patch_pair(model, PAIR)  # what the refusal offers instead
    # SAE training from a split model: rank 0 gathers the activations, every rank trains on them.
    sae = train_sae(model, SAE_SITE, data=DOCS[:6], **SAE_KW)
    report["sae"] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    whole = HookedTransformer.from_pretrained_no_processing(ckpt)  # the same training on a whole model's rows
    with torch.no_grad():
        rows = _harvest_in_memory(whole, SAE_SITE, DOCS[:6])
    reference = train_sae(rows, SAE_SITE, **SAE_KW)
    report["sae_reference"] = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    # Last (a transfer that timed out leaves the group unusable): the last rank's forward
    # raises in the middle of a harvest (its third batch; the first call measures the
    # site's width), and every rank fails, naming it.
    calls = []

    def boom(act: torch.Tensor, hook: Any) -> None:
        calls.append(1)
        if rank == world - 1 and len(calls) == 4:
            raise RuntimeError("boom on the last rank")

    started = time.monotonic()
    with model.hooks(fwd_hooks=[("blocks.2.hook_mlp_out", boom)]):
        report["boom_error"] = _error(
            lambda: activations.harvest(
                model, DOCS, sites, root / "boom", **KW, **kw, timeout=datetime.timedelta(seconds=10)
            )
        )
    report["boom_seconds"] = time.monotonic() - started

    torch.save(report, f"{out}.rank{rank}")
    os._exit(0)  # the report is written; the group lost its connections to the failed rank
