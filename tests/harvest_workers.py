"""The workers of tests/test_activations_distributed.py, in a module of their own: a
spawned process imports the module its function lives in, and this one imports only
torch, transformer_hooks and the tiny tokenizer's sentences (not the test module's
checkpoint builders), so each rank starts in seconds."""

from __future__ import annotations

import datetime
import errno
import json
import os
import time
from pathlib import Path

import torch
from tokenizers_util import SENTENCES

from transformer_hooks import HookedTransformer
from transformer_hooks.activations import harvest

SITES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
DOCS = SENTENCES * 7
# 8-token contexts, batches of 2, shards of 4 contexts: each rank writes several shards,
# and the ranks' ranges differ in length (the corpus is an odd number of batches).
KW = dict(context_size=8, batch_size=2, shard_tokens=32)


def mask(n_contexts: int) -> torch.Tensor:
    """A positions mask over the whole corpus: each rank must index it by global context."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n_contexts, KW["context_size"], generator=g) < 0.3


def worker(rank: int, world: int, port: int, ckpt: str, out: str, mode: str, n_contexts: int) -> None:
    import torch.distributed as dist

    from transformer_hooks.scale import harvest as activations

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    model = HookedTransformer.from_pretrained_no_processing(ckpt)
    commits = []
    real_commit = activations._commit_shard

    real_save = activations.write_safetensors

    def save(path, tensors):
        if mode == "full" and rank == 1 and len(commits) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, tensors)

    def commit(place, state, tensors, n_ctx, n_tok):
        real_commit(place, state, tensors, n_ctx, n_tok)
        commits.append(tensors["row_context"].tolist())
        if mode == "die" and rank == 1 and len(commits) == 2:
            os._exit(3)  # a hard death after two complete shards: no exception, no goodbye

    activations._commit_shard = commit
    activations.write_safetensors = save
    report: dict = {"rank": rank}
    started = time.monotonic()
    try:
        ds = harvest(model, DOCS, SITES, out, timeout=datetime.timedelta(seconds=5), progress=False, **KW)
        report["rows"] = len(ds)
        report["commits"] = list(commits)
        if mode == "mask":
            again = harvest(model, DOCS, SITES, out, timeout=datetime.timedelta(seconds=5), progress=False, **KW)
            report["again"] = [len(again), len(commits) - len(report["commits"])]  # complete: nothing redone
            masked = harvest(model, DOCS, SITES[0], out + "-mask", positions=mask(n_contexts), progress=False, **KW)
            report["mask_rows"] = len(masked)
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
    report["seconds"] = time.monotonic() - started
    report.setdefault("commits", commits)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
    if mode != "die":
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    os._exit(0)  # the report is written; the interpreter's teardown would take seconds more
