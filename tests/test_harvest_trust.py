"""Issue 27: a harvest trusted with a week of work. A resume continues only the same run
(the resume key: weights, tokenizer, corpus, masks, options) and otherwise refuses, naming
what changed; the files it reads never escape the dataset; it deletes nothing it did not
write; one harvest holds a directory at a time; sizes and damaged files give clear errors."""

import errno
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers_util import SENTENCES, add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.activations import ActivationDataset, harvest
from transformer_hooks.scale import harvest as scale_harvest
from transformer_hooks.scale.shards import holding

SITE = "blocks.0.hook_resid_post"
KW = dict(context_size=8, batch_size=2, shard_tokens=16, progress=False)


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    path, _ = hf_checkpoint("llama-gqa")
    return add_tokenizer(path, VOCAB)


@pytest.fixture(scope="module")
def model(ckpt, one_thread):
    return HookedTransformer.from_pretrained_no_processing(str(ckpt))


def stream(n=200, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@contextmanager
def deadline(seconds=60):
    """Fail instead of hanging (main spun forever on some of these inputs)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def interrupted(model, corpus, out, after=1, **kw):
    """A harvest stopped by a full disk after ``after`` shards: an incomplete dataset to resume."""
    real = scale_harvest.write_safetensors
    count = {"n": 0}

    def failing(path, tensors):
        count["n"] += 1
        if count["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    scale_harvest.write_safetensors = failing
    try:
        with pytest.raises(OSError, match="disk is full"):
            harvest(model, corpus, SITE, out, **{**KW, **kw})
    finally:
        scale_harvest.write_safetensors = real
    ds = ActivationDataset(out)
    assert not ds.complete and len(ds.manifest["shards"]) == after


# 1. A resume mixes no runs ------------------------------------------------------------------
def test_resume_refuses_other_weights_at_the_same_name(model, tmp_path):
    interrupted(model, stream(), tmp_path / "h")
    w = next(model.blocks[0].parameters())
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-3)  # the checkpoint replaced: same name, same processing, other weights
    try:
        with pytest.raises(ValueError, match=r"(?s)mix two runs.*weights: was .*start over: delete"):
            harvest(model, stream(), SITE, tmp_path / "h", **KW)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    ds = harvest(model, stream(), SITE, tmp_path / "h", **KW)  # the same weights again: it continues
    assert ds.complete


def test_resume_refuses_another_attention_mask(model, tmp_path):
    contexts = stream(160).reshape(20, 8)
    mask = torch.ones(20, 8, dtype=torch.bool)
    interrupted(model, contexts, tmp_path / "h", attention_mask=mask)
    other = mask.clone()
    other[5:, 6:] = False
    with pytest.raises(ValueError, match=r"(?s)attention_mask: was"):
        harvest(model, contexts, SITE, tmp_path / "h", attention_mask=other, **KW)


def test_resume_refuses_another_positions_mask_or_an_unnamed_function(model, tmp_path):
    mask = torch.rand(25, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    interrupted(model, stream(), tmp_path / "m", positions=mask)
    with pytest.raises(ValueError, match=r"(?s)positions: was"):
        harvest(model, stream(), SITE, tmp_path / "m", positions=~mask, **KW)

    def every_other(tokens):
        return torch.arange(tokens.shape[1]).expand_as(tokens) % 2 == 0

    interrupted(model, stream(), tmp_path / "f", positions=every_other)
    with pytest.raises(ValueError, match=r"(?s)positions: was .*unnamed positions function.*resume_name="):
        harvest(model, stream(), SITE, tmp_path / "f", positions=every_other, **KW)
    interrupted(model, stream(), tmp_path / "n", positions=every_other, resume_name="even positions")
    assert harvest(model, stream(), SITE, tmp_path / "n", positions=every_other, resume_name="even positions", **KW)


def test_a_one_shot_stream_resumes_only_when_named(model, tmp_path):
    docs = SENTENCES * 8
    interrupted(model, iter(docs), tmp_path / "s")
    with pytest.raises(ValueError, match=r"(?s)corpus: was .*one-shot iterable.*resume_name="):
        harvest(model, iter(docs[::-1]), SITE, tmp_path / "s", **KW)
    interrupted(model, iter(docs), tmp_path / "named", resume_name="sentences v1")
    with pytest.raises(ValueError, match=r"corpus: was \"named sentences v1\", now \"named sentences v2\""):
        harvest(model, iter(docs), SITE, tmp_path / "named", resume_name="sentences v2", **KW)
    whole = harvest(model, list(docs), SITE, tmp_path / "whole", **KW)
    resumed = harvest(model, iter(docs), SITE, tmp_path / "named", resume_name="sentences v1", **KW)
    assert torch.equal(resumed.rows(range(len(resumed))), whole.rows(range(len(whole))))


def test_a_corpus_file_is_known_by_its_content(model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(SENTENCES * 4))
    interrupted(model, corpus, tmp_path / "h")
    st_ = corpus.stat()
    text = corpus.read_text()
    corpus.write_text(text[::-1])  # same size, same mtime, other text
    os.utime(corpus, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    with pytest.raises(ValueError, match=r"(?s)corpus: was"):
        harvest(model, corpus, SITE, tmp_path / "h", **KW)


# 3. A manifest never escapes its dataset ----------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "rank_00000/../../x"])
def test_a_manifest_cannot_name_a_shard_outside_its_directory(model, tmp_path, name):
    ds = harvest(model, stream(), SITE, tmp_path / "h", **KW)
    first = tmp_path / "h" / ds.manifest["shards"][0]["file"]
    (tmp_path / "outside.safetensors").write_bytes(first.read_bytes())
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (tmp_path / "h" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"lists the shard .* outside the dataset directory"):
        ActivationDataset(tmp_path / "h")
    with pytest.raises(ValueError, match=r"outside the dataset directory"):
        harvest(model, stream(), SITE, tmp_path / "h", **KW)


# 4. A harvest deletes nothing it did not write ----------------------------------------------
def test_a_harvest_refuses_a_directory_it_does_not_own_and_keeps_the_users_files(model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "shard_notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"not empty \(shard_notes.txt\) and holds no harvest"):
        harvest(model, stream(), SITE, out, **KW)
    assert (out / "shard_notes.txt").read_text() == "my notes"
    interrupted(model, stream(), tmp_path / "h")
    for name in ("shard_notes.txt", "shard_extra.safetensors", ".shard_mine"):
        (tmp_path / "h" / name).write_text("user")
    harvest(model, stream(), SITE, tmp_path / "h", **KW)
    for name in ("shard_notes.txt", "shard_extra.safetensors", ".shard_mine"):
        assert (tmp_path / "h" / name).read_text() == "user"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        harvest(model, stream(), SITE, tmp_path / "file", **KW)


# Clear errors -------------------------------------------------------------------------------
def test_a_second_harvest_into_a_held_directory_fails(model, tmp_path):
    with holding(tmp_path / "h"):
        with pytest.raises(RuntimeError, match="another harvest holds this directory"):
            harvest(model, stream(), SITE, tmp_path / "h", **KW)
    assert harvest(model, stream(), SITE, tmp_path / "h", **KW).complete  # released


@pytest.mark.parametrize(
    "kw", [{"batch_size": 0}, {"batch_size": -1}, {"shard_tokens": 0}, {"max_tokens": 0}, {"context_size": 1}]
)
def test_sizes_are_checked_before_anything_runs(model, tmp_path, kw):
    arg = next(iter(kw))
    with deadline(), pytest.raises(ValueError, match=rf"{arg} must be an int of at least"):
        harvest(model, stream(), SITE, tmp_path / "h", **{**KW, **kw})
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("max_tokens", [1, 5, 8, 13, 40])
def test_max_tokens_harvests_exactly_that_many_tokens(model, tmp_path, max_tokens):
    ds = harvest(model, stream(), SITE, tmp_path / "h", max_tokens=max_tokens, exclude_bos=False, **KW)
    assert ds.manifest["n_tokens"] == max_tokens == len(ds)
    whole = harvest(model, stream(), SITE, tmp_path / "w", exclude_bos=False, **KW)
    assert torch.equal(ds.rows(range(len(ds))), whole.rows(range(len(ds))))  # causal: the cut changes no row


def test_tokens_of_and_rows_out_of_range_name_the_range(model, tmp_path):
    ds = harvest(model, stream(), SITE, tmp_path / "h", **KW)
    for bad in ([-1], [len(ds)], [0, len(ds) + 5]):
        with pytest.raises(IndexError, match=rf"out of range: .* holds rows 0..{len(ds) - 1}"):
            ds.tokens_of(bad)
        with pytest.raises(IndexError, match="out of range"):
            ds.rows(bad)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(ds.batches(batch_size=0))


def _damage(path: Path, data: bytes, how: str, at: int, byte: int) -> None:
    if how == "truncate":
        path.write_bytes(data[: at % len(data)])
    elif how == "header byte":
        n = int.from_bytes(data[:8], "little")
        i = 8 + at % n
        path.write_bytes(data[:i] + bytes([byte]) + data[i + 1 :])
    else:  # the length prefix
        i = at % 8
        path.write_bytes(data[:i] + bytes([byte]) + data[i + 1 :])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(how=st.sampled_from(["truncate", "header byte", "length"]), at=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_a_damaged_shard_is_named_or_read_unchanged(dataset, how, at, byte):
    """Random damage to a shard: reading either gives the same rows (a byte of padding) or a
    ValueError naming the shard; never another exception, never other rows."""
    path, rows = dataset
    shard = path / "shard_00001.safetensors"
    data = shard.read_bytes()
    try:
        _damage(shard, data, how, at, byte)
        try:
            ds = ActivationDataset(path)
            got = ds.rows(range(len(ds)))
            tokens = ds.tokens_of(range(len(ds)))
        except ValueError as e:
            assert "shard_00001.safetensors" in str(e) and "rerun harvest" in str(e)
        else:
            assert torch.equal(got, rows[0]) and torch.equal(tokens[0], rows[1])
    finally:
        shard.write_bytes(data)


@pytest.fixture(scope="module")
def dataset(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("damage") / "h"
    ds = harvest(model, stream(), SITE, path, **KW)
    return path, (ds.rows(range(len(ds))), ds.tokens_of(range(len(ds)))[0])


def _mutations():
    value = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.text(max_size=5), st.just([]), st.just({}))
    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(["format", "shards", "n_rows", "complete", "sites", "dtype"])),
        st.tuples(st.just("set"), st.sampled_from(["format", "shards", "n_rows", "complete", "sites", "dtype"]), value),
        st.tuples(st.just("entry"), st.sampled_from(["file", "bytes", "n_rows", "first_context"]), value),
        st.tuples(st.just("bytes"), st.binary(max_size=20)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutation=_mutations())
def test_an_invalid_manifest_is_named(dataset, mutation):
    """Random damage to the manifest: a ValueError naming it, or (a harmless change) a dataset
    that reads the same rows; never a KeyError, TypeError or JSONDecodeError."""
    path, rows = dataset
    manifest_path = path / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    if mutation[0] == "drop":
        del manifest[mutation[1]]
    elif mutation[0] == "set":
        manifest[mutation[1]] = mutation[2]
    elif mutation[0] == "entry":
        manifest["shards"][0][mutation[1]] = mutation[2]
    try:
        if mutation[0] == "bytes":
            manifest_path.write_bytes(mutation[1])
        else:
            manifest_path.write_text(json.dumps(manifest))
        try:
            ds = ActivationDataset(path)
            got = ds.rows(range(len(ds)))
        except (ValueError, IndexError) as e:
            assert "manifest" in str(e) or "shard" in str(e)
        else:
            assert torch.equal(got, rows[0][: len(got)])
    finally:
        manifest_path.write_text(original)


def test_a_corrupt_progress_file_is_named(model, tmp_path):
    interrupted(model, stream(), tmp_path / "h")
    (tmp_path / "h" / "manifest.json").write_text('{"format": "transformer_hooks.activations/2", "shards": [')
    with pytest.raises(ValueError, match=r"manifest .*manifest.json is invalid \(not JSON.*Delete the directory"):
        harvest(model, stream(), SITE, tmp_path / "h", **KW)


def test_a_positions_mask_of_the_wrong_shape_is_refused_before_anything_runs(model, tmp_path):
    for mask, says in (
        (
            torch.ones(25, 9, dtype=torch.bool),
            r"positions mask has shape \(25, 9\); expected \[contexts, context_size=8\]",
        ),
        (torch.ones(25, dtype=torch.bool), r"positions mask has shape \(25,\)"),
    ):
        with pytest.raises(ValueError, match=says):
            harvest(model, stream(), SITE, tmp_path / "h", positions=mask, **KW)
        assert not (tmp_path / "h" / "manifest.json").exists()
    contexts = stream(160).reshape(20, 8)
    with pytest.raises(ValueError, match="positions mask has 12 rows for 20 contexts"):
        harvest(model, contexts, SITE, tmp_path / "h", positions=torch.ones(12, 8, dtype=torch.bool), **KW)


def test_the_cli_max_tokens_harvests_exactly_that_many(ckpt, tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(SENTENCES * 10))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer_hooks",
            "harvest",
            "--model",
            str(ckpt),
            "--no-processing",
            "--data",
            str(corpus),
            "--sites",
            SITE,
            "--out",
            str(tmp_path / "h"),
            "--context-size",
            "16",
            "--max-tokens",
            "37",
            "--keep-bos",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert run.returncode == 0, run.stderr
    ds = ActivationDataset(tmp_path / "h")
    assert ds.manifest["n_tokens"] == 37 == len(ds)


def test_hostile_corpora_and_masks_are_named(model, tmp_path):
    """Found by attacking the same surface: each was an AttributeError, a bare JSONDecodeError,
    an IndexError, ``max() arg is an empty sequence``, or (float tokens) silently all zeros."""
    bad = {
        "ints": ([1, 2, 3], {}, r"document 0 of the corpus is a int, not a string"),
        "floats": (torch.rand(40), {}, r"tokens must be integer ids, got dtype torch.float32"),
        "mask": (stream(32).reshape(4, 8), {"attention_mask": torch.ones(3, 8)}, r"attention_mask has shape \(3, 8\)"),
        "no sites": (SENTENCES, {"sites": []}, r"names no hook site"),
    }
    for name, (corpus, kw, says) in bad.items():
        with pytest.raises(ValueError, match=says):
            harvest(model, corpus, kw.pop("sites", SITE), tmp_path / name, **kw, **KW)
    for name, text, says in (
        ("c.jsonl", '{"text": 5}\n', r"c.jsonl line 1: 'text' is a int, not text"),
        ("d.jsonl", "[1, 2]\n", r"d.jsonl line 1 is a JSON list, not an object"),
        ("e.jsonl", '{"text": "a"}\n{"text": "b"\n', r"e.jsonl line 2 is not JSON"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=says):
            harvest(model, tmp_path / name, SITE, tmp_path / f"out-{name}", **KW)


def test_a_manifest_that_disagrees_with_its_shards_is_named(model, tmp_path):
    ds = harvest(model, stream(), SITE, tmp_path / "h", **KW)
    assert torch.equal(ds[-1], ds[len(ds) - 1])  # negative indices count from the end
    original = (tmp_path / "h" / "manifest.json").read_text()
    for change in ({"sites": {SITE: 999}}, {"dtype": "float16"}):
        (tmp_path / "h" / "manifest.json").write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(ValueError, match=r"shard_00000.safetensors holds .* the manifest says"):
            ActivationDataset(tmp_path / "h").rows([0])
