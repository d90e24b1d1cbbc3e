"""Harvesting under torchrun: two gloo processes write per-rank shards and one manifest,
and the dataset reads back exactly as a one-process harvest of the same corpus (rows,
tokens, order, bit for bit); a rank that dies or fails fails the other within the
timeout, the manifest then claims no row, and a rerun resumes each rank from its own
last complete shard without repeating a context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB
from harvest_workers import DOCS, KW, SITES, mask, worker
from ranks import free_port, run_ranks
from tokenizers_util import add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.activations import ActivationDataset, harvest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    path, _ = hf_checkpoint("llama-gqa")
    return add_tokenizer(path, VOCAB)


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    """The one-process harvests the two-process ones must equal: (all positions, masked)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        model = HookedTransformer.from_pretrained_no_processing(str(ckpt))
        out = tmp_path_factory.mktemp("single")
        whole = harvest(model, DOCS, SITES, out / "all", progress=False, **KW)
        masked = harvest(
            model, DOCS, SITES[0], out / "mask", positions=mask(whole.manifest["n_contexts"]), progress=False, **KW
        )
    finally:
        torch.set_num_threads(threads)
    assert whole.complete and whole.manifest["n_contexts"] % 2 == 1  # the ranks' ranges differ
    return whole, masked


def assert_same_dataset(a: ActivationDataset, b: ActivationDataset) -> None:
    for key in ("n_contexts", "n_rows", "n_tokens", "sites", "dtype", "context_size", "model_name"):
        assert a.manifest[key] == b.manifest[key], key
    assert a.complete and b.complete and len(a) == len(b) > 0
    for site in a.sites:
        assert torch.equal(a.rows(range(len(a)), site), b.rows(range(len(b)), site)), site
    every = range(len(a))
    ta, pa = a.tokens_of(every)
    tb, pb = b.tokens_of(every)
    assert torch.equal(ta, tb) and torch.equal(pa, pb)


def _spawn(ckpt, out: Path, mode: str, n_contexts: int = 0) -> list[dict]:
    for f in out.parent.glob(f"{out.name}.rank*.json"):
        f.unlink()
    port = free_port()
    codes = run_ranks(worker, lambda r: (r, 2, port, str(ckpt), str(out), mode, n_contexts), timeout=90)
    if mode == "die":
        assert codes[1] == 3
    else:
        assert codes == [0, 0]
    return [
        json.loads(Path(f"{out}.rank{r}.json").read_text()) if Path(f"{out}.rank{r}.json").exists() else {}
        for r in range(2)
    ]


def test_two_ranks_write_the_dataset_one_process_writes(ckpt, single, tmp_path):
    whole, masked = single
    out = tmp_path / "two"
    reports = _spawn(ckpt, out, "mask", whole.manifest["n_contexts"])
    assert [r.get("error") for r in reports] == [None, None]
    assert [r["rows"] for r in reports] == [len(whole)] * 2  # every rank gets the dataset
    two = ActivationDataset(out)
    assert_same_dataset(two, whole)
    assert_same_dataset(ActivationDataset(str(out) + "-mask"), masked)
    # Each rank wrote its own shards (file names carry the rank), listed in context order.
    files = [e["file"] for e in two.manifest["shards"]]
    assert {f.split("/")[0] for f in files} == {"rank_00000", "rank_00001"} and files == sorted(files)
    firsts = [e["first_context"] for e in two.manifest["shards"]]
    assert firsts == sorted(firsts) and two.manifest["world_size"] == 2
    # Every context harvested once, by one rank: rank 0 the first ones, rank 1 the rest.
    both = [c for r in reports for shard in r["commits"] for c in dict.fromkeys(shard)]
    assert both == list(range(two.manifest["n_contexts"]))
    assert all(r["commits"] for r in reports)
    # A rerun finds it complete: nothing is harvested again.
    assert [r["again"] for r in reports] == [[len(whole), 0]] * 2


def test_a_rank_that_dies_fails_the_other_and_a_rerun_resumes_each_rank(ckpt, single, tmp_path):
    whole, _ = single
    out = tmp_path / "killed"
    first = _spawn(ckpt, out, "die")
    assert "died or hung" in first[0]["error"] and first[0]["error"].startswith("RankFailedError")
    assert "lists no row of this run" in first[0]["error"]
    assert first[0]["seconds"] < 30
    partial = ActivationDataset(out)  # the manifest claims nothing that is not there
    assert not partial.complete and len(partial) == 0 and partial.manifest["shards"] == []
    progress = json.loads((out / "rank_00001" / "progress.json").read_text())
    assert len(progress["shards"]) == 2 and not progress["complete"]

    second = _spawn(ckpt, out, "all")
    assert [r.get("error") for r in second] == [None, None]
    assert second[0]["commits"] == []  # rank 0 had finished its range: nothing again
    done_before = {
        c for e in progress["shards"] for c in range(e["first_context"], e["first_context"] + e["n_contexts"])
    }
    redone = {c for shard in second[1]["commits"] for c in shard}
    assert not done_before & redone  # rank 1 continued after its last complete shard
    assert min(redone) == max(done_before) + 1
    assert_same_dataset(ActivationDataset(out), whole)


def test_a_rank_whose_write_fails_fails_both_with_its_error(ckpt, tmp_path):
    out = tmp_path / "full"
    reports = _spawn(ckpt, out, "full")
    for r in reports:
        assert r["error"].startswith("RankFailedError: rank 1 failed harvesting"), r["error"]
        assert "shard_00001" in r["error"] and "disk is full" in r["error"] and "on its contexts [" in r["error"]
    assert len(reports[0]["commits"]) > 0 and len(reports[1]["commits"]) == 1
    assert ActivationDataset(out).manifest["shards"] == [] and not ActivationDataset(out).complete
    assert not list(out.glob("rank_*/.*tmp*"))
    # What a rerun resumes from (as after a death, above): each rank's complete shards.
    progress = [json.loads((out / f"rank_{r:05d}" / "progress.json").read_text()) for r in range(2)]
    assert progress[0]["complete"] and not progress[1]["complete"] and len(progress[1]["shards"]) == 1
    assert sum(e["n_contexts"] for e in progress[0]["shards"]) == progress[1]["first_context"]  # rank 0: [0, lo_1)
    assert progress[1]["shards"][0]["first_context"] == progress[1]["first_context"]


def test_harvest_command_same_under_python_and_torchrun(ckpt, tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    common = ["harvest", "--model", str(ckpt), "--no-processing", "--data", str(tmp_path / "c.txt")]
    common += ["--sites", "blocks.0.hook_resid_post", "--context-size", "8", "--batch-size", "2"]
    common += ["--shard-tokens", "32", "--timeout", "30"]
    launchers = {
        "one": [sys.executable, "-m", "transformer_hooks"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "transformer_hooks"],
    }
    printed = {}
    for name, launcher in launchers.items():
        run = subprocess.run(
            [*launcher, *common, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        printed[name] = run.stdout
    one, two = ActivationDataset(tmp_path / "one"), ActivationDataset(tmp_path / "two")
    assert_same_dataset(two, one)
    assert two.manifest["world_size"] == 2 and "world_size" not in one.manifest
    assert printed["two"].count("rows of blocks.0.hook_resid_post") == 1  # rank 0 reports, once
    assert "over 2 processes" in printed["two"]
    # Finished, it is the same dataset for one process: asked again, harvest returns it as it is.
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "two").rglob("*")}
    model = HookedTransformer.from_pretrained_no_processing(str(ckpt))
    again = harvest(
        model, tmp_path / "c.txt", "blocks.0.hook_resid_post", tmp_path / "two", **{**KW, "progress": False}
    )
    assert_same_dataset(again, one)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "two").rglob("*")} == before


def test_distributed_harvest_to_disk_is_the_one_harvest(ckpt, single, tmp_path, monkeypatch):
    from transformer_hooks import activations
    from transformer_hooks.scale import distributed

    whole, _ = single
    model = HookedTransformer.from_pretrained_no_processing(str(ckpt))
    ds = distributed.harvest(model, DOCS, SITES, tmp_path / "d", progress=False, **KW)
    assert isinstance(ds, ActivationDataset)
    assert_same_dataset(ds, whole)
    with pytest.raises(ValueError, match="drop reduce= and resume_dir="):
        distributed.harvest(model, DOCS, SITES, tmp_path / "e", reduce=lambda n, a: a)
    with pytest.raises(TypeError, match="pass out=DIR"):
        distributed.harvest(model, DOCS, SITES, context_size=8)
    monkeypatch.setattr(activations, "rank_and_world", lambda: (0, 2))  # as under torchrun
    with pytest.raises(ValueError, match="one-shot iterable"):
        harvest(model, iter(DOCS), SITES, tmp_path / "f", **KW)
