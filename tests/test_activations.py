"""Harvested activation datasets: the rows are the model's activations at the right
(context, position), every corpus form packs the same way, a harvest killed at any
moment resumes to the bit-identical dataset, a failing disk leaves a consistent one,
and the reader batches, shuffles and checks what it reads."""

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from tokenizers_util import SENTENCES, add_tokenizer

from transformer_hooks import HookedTransformer, activations
from transformer_hooks.activations import ActivationDataset, harvest
from transformer_hooks.hooks import UnknownHookError
from transformer_hooks.tokens import bos_id

SITES = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    path, _ = hf_checkpoint("llama-gqa")
    return add_tokenizer(path, VOCAB)


@pytest.fixture(scope="module")
def model(ckpt, one_thread):
    m = HookedTransformer.from_pretrained_no_processing(str(ckpt))
    assert m.tokenizer is not None and m.cfg.default_prepend_bos
    return m


def stream(n=600, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def files(path):
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}


def test_rows_are_the_activations_at_their_context_and_position(model, tmp_path):
    docs = SENTENCES * 6
    ds = harvest(model, docs, SITES, tmp_path / "h", context_size=9, batch_size=3, shard_tokens=40, progress=False)
    assert ds.complete and len(ds.manifest["shards"]) > 2
    bos = bos_id(model.tokenizer, model.cfg)
    # The packing: [BOS] + 8 tokens of the documents joined by BOS, the last context padded.
    joined = [
        t for i, d in enumerate(docs) for t in ([bos] if i else []) + model.to_tokens(d, prepend_bos=False)[0].tolist()
    ]
    contexts = [joined[i : i + 8] for i in range(0, len(joined), 8)]
    assert ds.manifest["n_contexts"] == len(contexts) and ds.manifest["n_tokens"] == len(joined) + len(contexts)
    rows = 0
    for body in contexts:
        t = torch.tensor([[bos] + body])
        with torch.no_grad():
            _, cache = model.run_with_cache(t, names_filter=SITES)
        keep = [p for p in range(t.shape[1]) if t[0, p] != bos]  # BOS (and padding) make no rows
        idx = list(range(rows, rows + len(keep)))
        # The harvest runs 3 contexts a batch, this check one: fp32 GEMMs of other shapes block their
        # sums differently (measured up to 1.4e-6 here), so equal means within the parity bar's float noise.
        torch.testing.assert_close(ds.rows(idx, SITES[0]), cache[SITES[0]][0, keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ds.rows(idx, SITES[1]), cache[SITES[1]][0, keep].flatten(1), atol=1e-5, rtol=1e-5)
        toks, pos = ds.tokens_of(idx)
        assert pos.tolist() == keep and torch.equal(toks[0, : t.shape[1]], t[0])
        rows += len(keep)
    assert len(ds) == rows == ds.manifest["n_rows"]
    assert ds.width(SITES[1]) == model.cfg.n_heads * model.cfg.d_head


def test_every_corpus_form_packs_the_same(model, tmp_path):
    docs = SENTENCES * 3
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kw = dict(context_size=8, batch_size=2, progress=False)
    a = harvest(model, docs, SITES[0], tmp_path / "a", **kw)
    b = harvest(model, tmp_path / "c.txt", SITES[0], tmp_path / "b", **kw)
    c = harvest(model, str(tmp_path / "c.jsonl"), SITES[0], tmp_path / "c", **kw)
    assert len(a) == len(b) == len(c) > 0
    assert torch.equal(a[:], b[:]) and torch.equal(a[:], c[:])
    # Token contexts as given (no packing), padding excluded through the mask.
    toks = stream(40).reshape(5, 8)
    mask = torch.ones_like(toks)
    mask[2, 5:] = 0
    d = harvest(model, toks, SITES[0], tmp_path / "d", attention_mask=mask, **kw)
    assert len(d) == 37
    # A token stream as a tensor or as a memory-mapped array on disk; a one-shot iterator of strings.
    s = stream(100)
    np.save(tmp_path / "s.npy", s.numpy().astype(np.int32))
    e = harvest(model, s, SITES[0], tmp_path / "e1", **kw)
    f = harvest(model, np.load(tmp_path / "s.npy", mmap_mode="r"), SITES[0], tmp_path / "e2", **kw)
    assert torch.equal(e[:], f[:]) and e.manifest["n_tokens"] == 100 + 15  # BOS on each of 15 contexts
    g = harvest(model, iter(docs), SITES[0], tmp_path / "g", **kw)
    assert torch.equal(g[:], a[:])
    with pytest.raises(KeyError, match="no 'body' field"):
        harvest(model, tmp_path / "c.jsonl", SITES[0], tmp_path / "x", text_key="body", **kw)


def test_positions_dtype_and_stopping_early(model, tmp_path):
    toks = stream(64).reshape(8, 8)
    calls = []
    handle = model.blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        last = harvest(
            model,
            toks,
            "blocks.0.hook_resid_post",
            tmp_path / "last",
            context_size=8,
            batch_size=4,
            positions="last",
            dtype="bfloat16",
            progress=False,
        )
    finally:
        handle.remove()
    assert not calls  # block 1 never ran: the harvest stopped after block 0
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter="blocks.0.hook_resid_post")
    assert len(last) == 8 and last[:].dtype == torch.bfloat16
    assert torch.equal(last[:], cache["blocks.0.hook_resid_post"][:, -1].to(torch.bfloat16))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, 2] = True
    mask[3, 5] = True
    chosen = harvest(
        model,
        toks,
        "blocks.0.hook_resid_post",
        tmp_path / "mask",
        context_size=8,
        batch_size=4,
        positions=mask,
        progress=False,
    )
    assert len(chosen) == 9 and chosen.tokens_of([4])[1].tolist() == [5]
    kept = harvest(
        model,
        toks,
        "blocks.0.hook_resid_post",
        tmp_path / "bos",
        context_size=8,
        batch_size=4,
        exclude_bos=False,
        progress=False,
    )
    assert len(kept) == 64


def test_interrupted_harvests_resume_to_the_same_bytes(model, tmp_path, monkeypatch):
    kw = dict(context_size=16, batch_size=2, shard_tokens=64, progress=False)
    whole = harvest(model, stream(), SITES, tmp_path / "whole", **kw)
    real_save = activations.write_safetensors
    count = {"n": 0}

    def failing(path, tensors):
        count["n"] += 1
        if count["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, tensors)

    monkeypatch.setattr(activations, "write_safetensors", failing)
    with pytest.raises(OSError, match=r"shard_00003.*disk is full.*3 complete shard.*rerun the same harvest") as e:
        harvest(model, stream(), SITES, tmp_path / "part", **kw)
    assert e.value.errno == errno.ENOSPC
    partial = ActivationDataset(tmp_path / "part")  # consistent: exactly the rows of its three shards
    assert not partial.complete and len(partial.manifest["shards"]) == 3
    assert torch.equal(partial.rows(range(len(partial)), SITES[1]), whole.rows(range(len(partial)), SITES[1]))
    assert not [f for f in os.listdir(tmp_path / "part") if "tmp" in f]
    monkeypatch.setattr(activations, "write_safetensors", real_save)
    harvest(model, stream(), SITES, tmp_path / "part", **kw)
    assert files(tmp_path / "part") == files(tmp_path / "whole")
    with pytest.raises(ValueError, match="other arguments.*context_size"):
        harvest(model, stream(), SITES, tmp_path / "part", **{**kw, "context_size": 32})


KILL_KW = dict(context_size=8, batch_size=2, shard_tokens=16, progress=False)


def _harvest_in_child(model, out):
    torch.set_num_threads(1)
    harvest(model, stream(1600), SITES, out, **KILL_KW)
    os._exit(0)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(model, tmp_path):
    """A forked child (the model already loaded, so it starts at once) is SIGKILLed at a
    random moment after it has written a shard, three times; each time the directory is
    a consistent dataset, and finishing it gives the uninterrupted run's bytes."""
    import multiprocessing

    torch.set_num_threads(1)
    out = tmp_path / "killed"
    rng = random.Random(0)
    shards_seen = [0]
    for _ in range(3):
        proc = multiprocessing.get_context("fork").Process(target=_harvest_in_child, args=(model, out))
        proc.start()
        deadline = time.time() + 60
        while time.time() < deadline and proc.exitcode is None:  # until this run has written a shard
            if (out / "manifest.json").exists():
                try:
                    if len(json.loads((out / "manifest.json").read_text())["shards"]) > shards_seen[-1]:
                        break
                except json.JSONDecodeError:  # never: the manifest is replaced atomically
                    raise
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ds = ActivationDataset(out)  # whatever the moment, a consistent dataset
        assert len(ds) == sum(e["n_rows"] for e in ds.manifest["shards"])
        if len(ds):
            ds.rows([len(ds) - 1], SITES[0])
        shards_seen.append(len(ds.manifest["shards"]))
    print("shards after each kill:", shards_seen)
    assert shards_seen[1] < shards_seen[2] < shards_seen[3] < 100, shards_seen  # each run got further, none finished
    harvest(model, stream(1600), SITES, out, **KILL_KW)
    harvest(model, stream(1600), SITES, tmp_path / "whole", **KILL_KW)
    assert files(out) == files(tmp_path / "whole")


def test_shards_are_safetensors_and_writing_them_holds_no_memory(model, tmp_path):
    """Shards load with safetensors itself; and writing shards of new sizes creates no
    ctypes types (safetensors' own writer makes one per byte size, kept for the life of
    the process: a long harvest's memory grew with its number of shards)."""
    import ctypes
    import gc

    from safetensors.torch import load_file

    def array_types() -> int:
        meta = type(ctypes.c_ubyte * 1)  # the class of every ctypes array type
        return sum(1 for o in gc.get_objects() if type(o) is meta)

    def positions(seed):
        return torch.rand(64, 16, generator=torch.Generator().manual_seed(seed)) < 0.5  # rows differ per shard

    kw = dict(context_size=16, batch_size=2, shard_tokens=64, dtype="bfloat16", progress=False)
    ds = harvest(model, stream(640), SITES, tmp_path / "a", positions=positions(0), **kw)
    sizes = set()
    start = 0
    for entry in ds.manifest["shards"]:
        loaded = load_file(str(tmp_path / "a" / entry["file"]))
        rows = range(start, start + entry["n_rows"])
        start += entry["n_rows"]
        for site in SITES:
            assert torch.equal(loaded[site], ds.rows(rows, site))
        assert loaded["tokens"].shape == (entry["n_contexts"], 16) and loaded["token_mask"].dtype == torch.bool
        sizes.add(entry["n_rows"])
    assert len(sizes) > 3
    before = array_types()
    harvest(model, stream(640), SITES, tmp_path / "b", positions=positions(1), **kw)
    assert array_types() == before


def test_reading_batches_and_bad_datasets(model, tmp_path):
    ds = harvest(
        model, stream(200), SITES, tmp_path / "h", context_size=10, batch_size=2, shard_tokens=40, progress=False
    )
    ordered = torch.cat(list(ds.batches(SITES[0], batch_size=7)))
    assert torch.equal(ordered, ds.rows(range(len(ds)), SITES[0]))
    shuffled = torch.cat(list(ds.batches(SITES[0], batch_size=7, shuffle=True, seed=1)))
    assert not torch.equal(shuffled, ordered)
    assert torch.equal(shuffled[shuffled[:, 0].argsort()], ordered[ordered[:, 0].argsort()])  # each row once
    assert all(len(b) == 7 for b in ds.batches(SITES[0], 7, shuffle=True, drop_last=True))
    ds.check_model(model)
    other = HookedTransformer.from_pretrained(str(model.cfg.model_name))
    with pytest.raises(ValueError, match="processing"):
        ds.check_model(other)
    with pytest.raises(ValueError, match="another model"):
        harvest(other, stream(200), SITES, tmp_path / "h", context_size=10, batch_size=2, shard_tokens=40)
    with pytest.raises(KeyError, match="closest: blocks.0.hook_resid_post"):
        ds.rows([0], "blocks.0.hook_resid_pots")
    with pytest.raises(UnknownHookError, match="Closest"):
        harvest(model, stream(), "blocks.0.hook_resid_pots", tmp_path / "x")
    shard = tmp_path / "h" / ds.manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt.*rerun harvest"):
        ActivationDataset(tmp_path / "h")
    with pytest.warns(UserWarning, match="damaged"):
        again = harvest(
            model, stream(200), SITES, tmp_path / "h", context_size=10, batch_size=2, shard_tokens=40, progress=False
        )
    assert torch.equal(again.rows(range(len(again)), SITES[0]), ordered)


def test_cli_harvest(ckpt, tmp_path, capsys):
    from transformer_hooks.cli import main

    (tmp_path / "c.txt").write_text("\n\n".join(SENTENCES * 4))
    code = main(
        [
            "harvest",
            "--model",
            str(ckpt),
            "--no-processing",
            "--data",
            str(tmp_path / "c.txt"),
            "--sites",
            "blocks.*.hook_resid_post",
            "--out",
            str(tmp_path / "h"),
            "--context-size",
            "8",
        ]
    )
    assert code == 0 and "rows of blocks.0.hook_resid_post, blocks.1.hook_resid_post" in capsys.readouterr().out
    ds = ActivationDataset(tmp_path / "h")
    assert ds.complete and ds.sites == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert np.isfinite(ds.rows(range(len(ds)), "blocks.1.hook_resid_post").numpy()).all()


def test_cli_sae_eval_matches_the_function(ckpt, model, tmp_path, capsys):
    from transformer_hooks.cli import main
    from transformer_hooks.sae import SAE, evaluate_sae

    (tmp_path / "c.txt").write_text("\n\n".join(SENTENCES * 3))
    sae = SAE.for_model(model, "blocks.1.hook_resid_post", d_sae=32, architecture="topk", k=4)
    sae.save_model(tmp_path / "sae")
    code = main(
        [
            "sae-eval",
            "--model",
            str(ckpt),
            "--no-processing",
            "--sae",
            str(tmp_path / "sae"),
            "--data",
            str(tmp_path / "c.txt"),
            "--context-size",
            "8",
            "--max-tokens",
            "40",
            "--skip-first",
            "--json",
        ]
    )
    assert code == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    contexts = list(activations._contexts(model, tmp_path / "c.txt", 8, True, "text", None))[:5]
    tokens = torch.stack([t for t, _ in contexts])
    mask = torch.stack([m for _, m in contexts]).long()
    expected = evaluate_sae(model, sae, tokens, attention_mask=mask, positions=slice(1, None))
    assert got["n_tokens"] == expected.n_tokens == 5 * 7
    assert got["ce_loss_recovered_vs_mean"] == pytest.approx(expected.ce_loss_recovered_vs_mean, rel=1e-5)
    assert got["l0"] == pytest.approx(4.0)
    assert (
        main(["sae-eval", "--model", str(ckpt), "--sae", str(tmp_path / "nothing"), "--data", str(tmp_path / "c.txt")])
        == 2
    )
    assert "cfg.json" in capsys.readouterr().err
