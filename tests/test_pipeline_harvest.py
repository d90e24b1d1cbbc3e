"""Harvesting activations from a model split over processes (``pipeline_ranks``) with two
and three gloo processes, each holding a range of blocks of a three-block model: ONE harvest
whose files (manifest and shards) are byte for byte those of a one-process harvest of the
same model, with sites on every rank, one that stops early (``stop_at_layer``) and one after
the blocks; a finished harvest is not run again; the resume key hashes every rank's weights
(the one-process hash; a change on the last rank alone changes it and refuses the resume);
a rank killed mid-harvest (of three), a full disk on rank 0, an error in rank 0's positions
function and an error on the last rank fail every rank with ``RankFailedError`` and a
manifest of complete shards only, which a rerun (split, or by one process) continues to the
one-process dataset. Also the data-parallel entry points: ``gather_caches`` and
``patching_sweep`` refuse a split model on every rank, naming the per-pair call (which gives
one process's sweep), and ``train_sae`` from a split model trains on the rows one process
harvests.

One launch of the ranks per world size runs every check (``pipeline_harvest_workers.worker``);
with three ranks, after a launch in which rank 1 dies mid-harvest (``killed``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB, save_checkpoint
from pipeline_harvest_workers import DOCS, HARVESTS, KW, PAIR, harvests, killed, worker
from ranks import free_port, run_ranks
from tokenizers_util import add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.scale.dataset import ActivationDataset
from transformer_hooks.scale.distributed import patch_pair
from transformer_hooks.scale.harvest import harvest
from transformer_hooks.scale.resume import weights_hash


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint("llama-gqa", tmp_path_factory.mktemp("split-harvest"), num_hidden_layers=3)
    return str(add_tokenizer(path, VOCAB))


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    """The one-process harvests (and hash, sweep) the split ones must equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        model = HookedTransformer.from_pretrained_no_processing(checkpoint)
        out = tmp_path_factory.mktemp("one")
        rows = harvests(model, out)
        return {"out": out, "rows": rows, "hash": weights_hash(model), "pair": patch_pair(model, PAIR), "model": model}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launches(checkpoint, tmp_path_factory):
    """world -> (the launch's directory, each rank's report), launched once per world size. With
    three ranks, a launch in which rank 1 dies mid-harvest (``killed``) comes first."""
    done: dict = {}

    def launch(world: int) -> tuple:
        if world not in done:
            root = tmp_path_factory.mktemp(f"ranks{world}")
            if world == 3:
                port = free_port()
                codes = run_ranks(killed, lambda r: (r, world, port, checkpoint, str(root / "killed")), world, 60)
                assert codes == [0, 3, 0], codes
            port = free_port()
            codes = run_ranks(worker, lambda r: (r, world, port, checkpoint, str(root)), world=world, timeout=120)
            assert codes == [0] * world, codes
            done[world] = root, [torch.load(f"{root}.rank{r}") for r in range(world)]
        return done[world]

    return launch


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, launches):
    """(world, the launch's directory, each rank's report)."""
    return request.param, *launches(request.param)


def assert_same_files(got: Path, want: Path) -> None:
    """The same dataset, byte for byte: the manifest and every shard it lists."""
    assert (got / "manifest.json").read_bytes() == (want / "manifest.json").read_bytes(), got
    manifest = json.loads((want / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_rows"] > 0
    for entry in manifest["shards"]:
        assert (got / entry["file"]).read_bytes() == (want / entry["file"]).read_bytes(), entry["file"]
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def test_a_split_harvest_writes_the_one_process_files(ranks, one_process):
    world, root, reports = ranks
    for name in HARVESTS:
        assert_same_files(root / "split" / name, one_process["out"] / name)
        assert len(json.loads((root / "split" / name / "manifest.json").read_text())["shards"]) > 1, name
    for r in reports:  # the dataset on rank 0, None elsewhere; asked again, nothing is harvested
        want = one_process["rows"] if r["rank"] == 0 else dict.fromkeys(HARVESTS)
        assert r["rows"] == want and r["again"] == want
        assert r["again_commits"] == 0
    ds = ActivationDataset(root / "split" / "every_block")
    assert set(ds.sites) == set(HARVESTS["every_block"][0]) and len(ds) == one_process["rows"]["every_block"]


def test_the_resume_key_hashes_every_ranks_weights(ranks, one_process):
    world, _, reports = ranks
    assert [r["hash"] for r in reports] == [one_process["hash"]] * world
    changed = {r["changed_hash"] for r in reports}  # a weight of the last rank's block 2 changed
    assert len(changed) == 1 and one_process["hash"] not in changed
    assert [r["restored_hash"] for r in reports] == [one_process["hash"]] * world
    for r in reports:  # rank 0 refuses the resume; every rank fails with its reason
        assert r["changed_error"].startswith("RankFailedError: rank 0 failed opening"), r["changed_error"]
        assert "weights: was" in r["changed_error"]


def test_a_killed_rank_fails_the_others_and_a_rerun_continues(launches, one_process):
    """Three ranks; rank 1 (the middle) dies mid-harvest."""
    root, reports = launches(3)
    for r in (0, 2):
        report = json.loads(Path(f"{root / 'killed'}.rank{r}.json").read_text())
        # A rank names the peer whose transfer failed (the dead rank, or a rank that failed because of it).
        assert report["error"].startswith("RankFailedError") and "died, hung or failed" in report["error"], report
        assert "lists only complete shards" in report["error"]
        assert report["seconds"] < 15  # within the timeouts (5 s a transfer, 10 s the exchange)
    # The rerun continued after the shards the killed harvest completed, to the one-process files.
    assert reports[0]["resumed"] == one_process["rows"]["every_block"]
    assert [r["resumed"] for r in reports[1:]] == [None, None]
    total = len(json.loads((one_process["out"] / "every_block" / "manifest.json").read_text())["shards"])
    assert 0 < reports[0]["resumed_commits"] < total
    assert_same_files(root / "killed", one_process["out"] / "every_block")


def test_a_full_disk_or_an_error_on_any_rank_fails_every_rank(ranks, one_process):
    world, root, reports = ranks
    for r in reports:
        assert r["full_error"].startswith("RankFailedError: rank 0 failed harvesting"), r["full_error"]
        assert "shard_00001" in r["full_error"] and "disk is full" in r["full_error"]
        assert r["full_rerun"] is None
        # The last rank names its error; the others name it (their transfer with it failed).
        assert r["boom_error"].startswith("RankFailedError"), r["boom_error"]
        named = "boom on the last rank" if r["rank"] == world - 1 else "died, hung or failed"
        assert named in r["boom_error"] and "lists only complete shards" in r["boom_error"], r["boom_error"]
        assert r["boom_seconds"] < 15  # within the timeouts (5 s a transfer, 10 s the exchange)
    for r in reports:  # rank 0's positions function failed: every rank names its error, without waiting
        assert r["positions_error"].startswith("RankFailedError: rank 0 failed harvesting"), r["positions_error"]
        assert "ValueError: no positions today" in r["positions_error"] and r["positions_seconds"] < 4
    positions = json.loads((root / "positions" / "manifest.json").read_text())
    assert not positions["complete"] and len(positions["shards"]) == 1  # the shard before the failure
    partial = reports[0]["full_manifest"]  # it claimed only its complete shard
    assert not partial["complete"] and len(partial["shards"]) == 1 and partial["n_rows"] > 0
    assert_same_files(root / "full", one_process["out"] / "every_block")
    boom = json.loads((root / "boom" / "manifest.json").read_text())
    assert not boom["complete"] and all((root / "boom" / e["file"]).is_file() for e in boom["shards"])
    # The split harvest's files are one process's: one process continues them.
    sites, kw = HARVESTS["every_block"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        harvest(one_process["model"], DOCS, sites, root / "boom", **KW, **kw)
    finally:
        torch.set_num_threads(threads)
    assert_same_files(root / "boom", one_process["out"] / "every_block")


def test_data_parallel_entry_points_refuse_or_work_on_a_split_model(ranks, one_process):
    world, _, reports = ranks
    for r in reports:
        for key, name, instead in (
            ("gather_error", "gather_caches", "model.run_with_cache(prompt)"),
            ("sweep_error", "patching_sweep", "patch_pair(model, pair"),
        ):
            assert r[key].startswith(f"ValueError: {name} is data-parallel"), r[key]
            assert f"split over {world} processes" in r[key] and instead in r[key]
        assert (r["pair"] is None) == (r["rank"] != 0)
        for k, v in r["sae_reference"].items():  # the same SAE on every rank, from the same rows
            assert torch.equal(r["sae"][k], v), k
    torch.testing.assert_close(reports[0]["pair"], one_process["pair"], rtol=0, atol=1e-6)
