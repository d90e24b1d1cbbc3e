"""The ranks of tests/test_sae_distributed.py, in a module of their own (a spawned process
imports the module its function lives in; this one imports only torch and the library).

Each rank trains the SAEs a job lists on a harvested dataset and writes, per run, its final
weights (``<out>/<name>.rank<r>.safetensors``) and a report (``<out>/rank<r>.json``): a hash
of the weights before every optimiser step, the rows it read, what it logged."""

from __future__ import annotations

import datetime
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch


class FakeWriter:
    """``SummaryWriter``'s surface: ``add_scalar`` calls recorded in ``FakeWriter.calls``."""

    calls: list[tuple[str, str, float, int]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def add_scalar(self, name: str, value: float, global_step: int) -> None:
        FakeWriter.calls.append((self.log_dir, name, float(value), int(global_step)))

    def close(self) -> None:
        FakeWriter.calls.append((self.log_dir, "closed", 0.0, 0))


def fake_tensorboard() -> types.ModuleType:
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    return module


def half_dead(acts: torch.Tensor, site: str, d_sae: int) -> Any:
    """An SAE (the trainer's seeded start) half of whose features cannot fire: resampling and
    ghost gradients have dead features to work on from the first steps."""
    from transformer_hooks.sae import train_sae

    sae = train_sae(acts, site, d_sae, steps=0, progress=False)
    with torch.no_grad():
        sae.b_enc[: d_sae // 2] = -1e3
    return sae


def train(ds: Any, site: str, kw: dict[str, Any]) -> Any:
    """A run of a job: on the dataset, or (``half_dead``) the older form on its rows as a tensor."""
    from transformer_hooks.sae import train_sae

    kw = dict(kw)
    if kw.pop("half_dead", False):
        acts = ds[:]
        sae = half_dead(acts, site, kw["d_sae"])
        sae.training_log = train_sae(sae, acts, progress=False, **kw)
        return sae
    return train_sae(ds, site, progress=False, **kw)


def weights_hash(params: Any) -> str:
    from transformer_hooks.scale.resume import tensor_hash

    return tensor_hash(torch.cat([p.detach().reshape(-1) for p in params]))


def instrument(reads: list[list[int]], hashes: list[str], die_at: int | None) -> None:
    """Record every row the rank reads and a hash of the weights before each optimiser step
    (the weights after the step before, every update included); die hard at step ``die_at``."""
    from transformer_hooks.scale.dataset import ActivationDataset

    real_rows, real_step = ActivationDataset.rows, torch.optim.Adam.step

    def rows(self, index, site=None, device=None):
        reads.append([int(i) for i in index])
        return real_rows(self, index, site, device)

    def step(self, *a, **kw):
        hashes.append(weights_hash(p for group in self.param_groups for p in group["params"]))
        if die_at is not None and len(hashes) == die_at:
            os._exit(3)  # a hard death: no exception, no goodbye
        return real_step(self, *a, **kw)

    ActivationDataset.rows = rows  # type: ignore[method-assign]
    torch.optim.Adam.step = step  # type: ignore[method-assign]


def worker(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from transformer_hooks.scale.dataset import ActivationDataset

    torch.set_num_threads(1)
    sys.modules["torch.utils.tensorboard"] = fake_tensorboard()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    out = Path(job["out"])
    reads: list[list[int]] = []
    hashes: list[str] = []
    instrument(reads, hashes, job.get("die_at") if rank == 1 else None)
    report: dict[str, Any] = {"rank": rank, "runs": {}}
    if "cli" in job:  # the command line, which leaves the process group when done
        from transformer_hooks.cli import main

        code = main(job["cli"])
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code}))
        os._exit(0)
    try:
        ds = ActivationDataset(job["data"])
        for name, kw in job["runs"].items():
            reads.clear(), hashes.clear()
            FakeWriter.calls.clear()
            sae = train(ds, job["site"], {**kw, **job.get("rank_overrides", {}).get(str(rank), {})})
            save_file(
                {n: p.detach().contiguous() for n, p in sae.named_parameters()}, out / f"{name}.rank{rank}.safetensors"
            )
            report["runs"][name] = {
                "reads": list(reads),
                "hashes": list(hashes),
                "log": sae.training_log,
                "logged": list(FakeWriter.calls),
            }
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if "error" not in report:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    os._exit(0)  # the report is written; the interpreter's teardown would take seconds more
