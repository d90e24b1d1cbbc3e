"""Data-parallel sweeps (distributed.py): two gloo processes on the CPU give bit for bit
what one process gives, and a rank that fails or dies fails the run with a clear error
and no output."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, run_ranks

from transformer_hooks import HookedTransformer
from transformer_hooks.interventions.patching import get_act_patch_resid_pre
from transformer_hooks.scale.distributed import (
    RankFailedError,
    harvest,
    logit_diff_metric,
    map_prompts,
    patching_sweep,
    read_pairs,
    shard_bounds,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 101


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(4, 7)
        clean = [rng.randrange(VOCAB) for _ in range(length)]
        corrupt = list(clean)
        corrupt[1] = rng.randrange(VOCAB)
        pairs.append(dict(clean=clean, corrupt=corrupt, answer=rng.randrange(VOCAB), contrast=rng.randrange(VOCAB)))
    return pairs


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_shards_are_contiguous_and_cover_everything():
    for n in range(0, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


# Two processes spawned by torch.multiprocessing ---------------------------------------------
def _worker(rank: int, world: int, port: int, model_path: str, pairs: list, out: str, die_on: int | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    timeout = datetime.timedelta(seconds=5)
    try:
        if die_on is not None:

            def fn(i: int) -> int:
                if rank == die_on:
                    os._exit(3)  # a hard death: no exception, no goodbye to the other ranks
                time.sleep(0.2)
                return i * i

            started = time.monotonic()
            try:
                map_prompts(fn, list(range(8)), timeout=timeout, progress=False)
                outcome = "returned"
            except Exception as e:  # noqa: BLE001
                outcome = f"{type(e).__name__}: {e}"
            Path(out + f".rank{rank}").write_text(json.dumps([outcome, time.monotonic() - started]))
            return
        model = HookedTransformer.from_pretrained(model_path)
        act = patching_sweep(model, pairs, "resid_pre", timeout=timeout, progress=False)
        attr = patching_sweep(model, pairs, "resid_pre", attribution=True, timeout=timeout, progress=False)
        squares = map_prompts(lambda i: torch.arange(i), list(range(5)), timeout=timeout, progress=False)
        acts = harvest(
            model,
            [p["clean"] for p in pairs],
            ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"],
            timeout=timeout,
            progress=False,
        )
        if rank == 0:
            torch.save({"act": act, "attr": attr, "squares": squares, "harvest": acts}, out)
        else:
            assert act is None and attr is None and squares is None and acts is None
    finally:
        if die_on is None:
            dist.barrier()  # no rank tears the group down while another still uses it
            dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_bitwise(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama-gqa")
    pairs = _pairs(5)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), str(path), pairs, out, None), nprocs=2, join=True)
    two = torch.load(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        model = HookedTransformer.from_pretrained(str(path))
        act = patching_sweep(model, pairs, "resid_pre", progress=False)
        attr = patching_sweep(model, pairs, "resid_pre", attribution=True, progress=False)
        acts = harvest(
            model,
            [p["clean"] for p in pairs],
            ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"],
            progress=False,
        )
        # The sweep unembeds only the metric's position: the TransformerLens sweep with every
        # position unembedded gives the same numbers.
        clean, corrupt, answer, contrast = (pairs[0][k] for k in ("clean", "corrupt", "answer", "contrast"))
        _, clean_cache = model.run_with_cache(torch.tensor([clean]))
        full = get_act_patch_resid_pre(
            model, torch.tensor([corrupt]), clean_cache, logit_diff_metric(answer, contrast), progress=False
        )
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(act[0], full, rtol=0, atol=1e-5)
    assert len(two["act"]) == len(pairs) == len(two["attr"])
    for mine, theirs in zip(act + attr, two["act"] + two["attr"], strict=True):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    assert [t.tolist() for t in two["squares"]] == [list(range(i)) for i in range(5)]
    assert len(acts) == len(two["harvest"]) == len(pairs)
    for mine, theirs in zip(acts, two["harvest"], strict=True):
        assert mine.keys() == theirs.keys() == {"blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"}
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_rank_that_dies_fails_the_others_within_the_timeout(tmp_path):
    out = str(tmp_path / "dead")
    port = free_port()
    codes = run_ranks(_worker, lambda r: (r, 2, port, "", [], out, 1))
    assert codes[1] == 3
    outcome, seconds = json.loads(Path(out + ".rank0").read_text())
    assert outcome.startswith("RankFailedError") and "died or hung" in outcome, outcome
    assert "No result was gathered" in outcome
    assert seconds < 30


# The CLI: python -m and torchrun ----------------------------------------------------------------
def _write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_sweep_command_same_under_python_and_torchrun(hf_checkpoint, tmp_path):
    model_path, _ = hf_checkpoint("gpt2")
    prompts = _write_pairs(tmp_path / "pairs.jsonl", _pairs(5, seed=1))
    common = ["sweep", "--prompts", str(prompts), "--model", str(model_path)]
    one = subprocess.run(
        [sys.executable, "-m", "transformer_hooks", *common, "--out", str(tmp_path / "one.json")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "transformer_hooks",
            *common,
            "--out",
            str(tmp_path / "two.json"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["complete"] and b["complete"] and (a["world_size"], b["world_size"]) == (1, 2)
    assert a["results"] == b["results"]  # floats written exactly (repr round-trips)
    assert len(a["results"]) == 5 and len(a["results"][0]) == 2  # [layer, pos] per pair


def test_sweep_command_rank_that_raises_leaves_no_output(hf_checkpoint, tmp_path):
    model_path, _ = hf_checkpoint("gpt2")
    pairs = _pairs(4, seed=2)
    pairs[3]["corrupt"] = [VOCAB + 5] * len(pairs[3]["clean"])  # in rank 1's shard [2, 4)
    prompts = _write_pairs(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out.pt"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "transformer_hooks",
            "sweep",
            "--prompts",
            str(prompts),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--timeout",
            "30",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "rank 1 failed on its prompts [2, 4)" in run.stderr
    assert "outside the vocabulary" in run.stderr
    assert not out.exists() and not list(tmp_path.glob("out.pt*"))


def test_read_pairs_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"clean": [1], "corrupt": [2], "answer": 3, "contrast": 4}\n{"clean": [1]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: each line must be an object with clean"):
        read_pairs(path)


def test_map_prompts_in_one_process_raises_the_error_itself():
    with pytest.raises(ZeroDivisionError):
        map_prompts(lambda x: 1 / x, [1, 0], progress=False)
    assert RankFailedError.__mro__[1] is RuntimeError


def test_a_killed_run_resumes_with_the_same_results(tmp_path):
    items = [3, 1, 4, 1, 5, 9]
    calls = []
    kill_at = [4]

    def fn(x: int) -> torch.Tensor:
        calls.append(x)
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # killed after three results were kept
        return torch.full((2,), float(x)) ** 0.5

    with pytest.raises(KeyboardInterrupt):
        map_prompts(fn, items, resume_dir=tmp_path / "r", job={"what": "sqrt"}, progress=False)
    assert len(list((tmp_path / "r").glob("*.pt"))) == 3 and not list((tmp_path / "r").glob("*.partial"))
    calls.clear()
    kill_at[0] = None
    resumed = map_prompts(fn, items, resume_dir=tmp_path / "r", job={"what": "sqrt"}, progress=False)
    assert calls == [1, 5, 9]  # only the items not kept before
    assert all(torch.equal(r, torch.full((2,), float(x)) ** 0.5) for r, x in zip(resumed, items, strict=True))
    with pytest.raises(ValueError, match="holds results of another job"):
        map_prompts(fn, items, resume_dir=tmp_path / "r", job={"what": "square"}, progress=False)
    with pytest.raises(ValueError, match="holds results of another job"):
        map_prompts(fn, items[:-1], resume_dir=tmp_path / "r", job={"what": "sqrt"}, progress=False)
