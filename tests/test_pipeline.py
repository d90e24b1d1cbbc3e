"""Layer ranges across processes (loading/pipeline.py): two gloo processes, each holding
one block of a two-block model, give the logits, loss and every cached site one process
gives; a hook on the second rank's block fires there and edits the output as in one
process; each rank holds only its own groups' weights; bad layouts and a dead rank fail
with clear errors."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, run_ranks

from transformer_hooks import HookedTransformer
from transformer_hooks.loading.pipeline import PipelineError, pipeline_map
from transformer_hooks.loading.placement import PlacementError

TOKENS = torch.tensor([[3, 17, 42, 8, 99, 5, 23], [1, 64, 2, 77, 31, 0, 12]])
# (checkpoint, processed): Llama with the default processing; GPT-2 unprocessed, so its
# tied unembedding is W_E.T on the last rank, which holds no embeddings; and GPT-2 as a
# converted checkpoint (weights_conversion), which stores the tied W_U only as W_E.
MODELS = [("llama-gqa", True), ("gpt2", False), ("gpt2-converted", False)]
EDITED = "blocks.1.attn.hook_z"  # a site of block 1, which rank 1 owns


def _load(path: str, processed: bool, **kwargs) -> HookedTransformer:
    load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    return load(path, **kwargs)


def _zero_head_0(z: torch.Tensor, hook) -> torch.Tensor:
    z = z.clone()
    z[:, :, 0] = 0.0
    return z


def _run(model: HookedTransformer, fired: list[str]) -> dict:
    """What each test compares, from one process or from rank 0 (None elsewhere)."""

    def edit(z: torch.Tensor, hook) -> torch.Tensor:
        fired.append(hook.name)
        return _zero_head_0(z, hook)

    logits = model(TOKENS)
    both = model(TOKENS, return_type="both")
    _, cache = model.run_with_cache(TOKENS)
    _, expansions = model.run_with_cache(TOKENS, names_filter=["blocks.1.attn.hook_result", "hook_embed"])
    edited = model.run_with_hooks(TOKENS, fwd_hooks=[(EDITED, edit)])
    if logits is None:
        assert both is None and cache is None and expansions is None and edited is None
        return {}
    return {
        "logits": logits,
        "loss": both[1],
        "cache": {k: cache[k] for k in cache.keys()},
        "expansions": {k: expansions[k] for k in expansions.keys()},
        "edited": edited,
    }


def _worker(rank: int, world: int, port: int, paths: list[str], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    import transformer_hooks.loading as loading

    sources = []
    opened = loading.tensor_source
    loading.tensor_source = lambda files: sources.append(opened(files)) or sources[-1]  # which tensors are read
    try:
        results = {}
        for path, (name, processed) in zip(paths, MODELS, strict=True):
            model = _load(path, processed, pipeline_ranks=world)
            read = sorted(sources.pop().used)
            fired: list[str] = []
            results[name] = {
                **_run(model, fired),
                "fired": fired,
                "pipeline_map": model.placement.pipeline_map,
                "real": sorted(n for n, p in model.named_parameters() if not p.is_meta),
                "meta": sorted(n for n, p in model.named_parameters() if p.is_meta),
                "bytes": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
                "read": read,
            }
        torch.save(results, f"{out}.rank{rank}")
    finally:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(hf_checkpoint, tmp_path):
    from safetensors import safe_open

    from weights_conversion.__main__ import convert

    converted = convert(hf_checkpoint("gpt2")[0], tmp_path / "gpt2-converted", processing=False)
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        assert "unembed.W_U" not in f.keys()  # stored once, as embed.W_E
    paths = [str(hf_checkpoint("llama-gqa")[0]), str(hf_checkpoint("gpt2")[0]), str(converted)]
    out = str(tmp_path / "pipe")
    mp.spawn(_worker, args=(2, free_port(), paths, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        for path, (name, processed) in zip(paths, MODELS, strict=True):
            one = _load(path, processed)
            fired: list[str] = []
            ref = _run(one, fired)
            got, other = ranks[0][name], ranks[1][name]
            assert one.placement.pipeline_map is None
            assert (
                got["pipeline_map"] == other["pipeline_map"] == {"embed": 0, "blocks.0": 0, "blocks.1": 1, "final": 1}
            )

            # rank 0 returns everything; rank 1 returned None for each call (checked in _run)
            torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-6)
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-6)
            assert list(got["cache"]) == list(ref["cache"])  # every site, in the forward's order
            for site, act in ref["cache"].items():
                torch.testing.assert_close(got["cache"][site], act, rtol=0, atol=1e-6, msg=site)
            assert got["expansions"].keys() == ref["expansions"].keys() == {"blocks.1.attn.hook_result", "hook_embed"}
            for site, act in ref["expansions"].items():
                torch.testing.assert_close(got["expansions"][site], act, rtol=0, atol=1e-6, msg=site)

            # the hook fired on rank 1 only, and its edit changes the logits as in one process
            assert fired == [EDITED] and other["fired"] == [EDITED] and got["fired"] == []
            assert not torch.allclose(ref["edited"], ref["logits"])
            torch.testing.assert_close(got["edited"], ref["edited"], rtol=0, atol=1e-6)

            # each rank holds its own groups' weights and nothing else
            names = [n for n, _ in one.named_parameters()]
            first = [n for n in names if n.startswith(("embed.", "pos_embed.", "blocks.0."))]
            last = [n for n in names if n.startswith(("blocks.1.", "ln_final.", "unembed."))]
            assert sorted(first) == got["real"] and sorted(last) == got["meta"]
            assert sorted(last) == other["real"] and sorted(first) == other["meta"]
            total = sum(p.numel() * p.element_size() for p in one.parameters())
            assert got["bytes"] + other["bytes"] == total
            # ... and read only its own blocks' tensors from the checkpoint
            assert any(".0." in n for n in got["read"]) and not any(".1." in n for n in got["read"])
            assert any(".1." in n for n in other["read"]) and not any(".0." in n for n in other["read"])
    finally:
        torch.set_num_threads(threads)


def _dying_worker(rank: int, port: int, path: str, out: str, hang: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    model = HookedTransformer.from_pretrained(path, pipeline_ranks=2, pipeline_timeout=3 if hang else 30)

    def die(act: torch.Tensor, hook) -> None:
        if hang:
            time.sleep(8)  # hangs far longer than the timeout, then goes
        os._exit(3)  # a hard death in the middle of the forward: no exception, no goodbye

    started = time.monotonic()
    try:
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_mid", die)])
        outcome = "returned"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    Path(f"{out}.rank{rank}").write_text(json.dumps([outcome, time.monotonic() - started]))


@pytest.mark.parametrize("hang", [False, True], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_mid_forward_fails_the_others(hf_checkpoint, tmp_path, hang):
    path = str(hf_checkpoint("llama-gqa")[0])
    out = str(tmp_path / "dead")
    port = free_port()
    codes = run_ranks(_dying_worker, lambda r: (r, port, path, out, hang))
    assert codes[1] == 3
    outcome, seconds = json.loads(Path(out + ".rank0").read_text())
    assert outcome.startswith("RankFailedError") and "with rank 1 failed" in outcome, outcome
    assert "No output was returned" in outcome
    if hang:  # noticed when the 3 s timeout ran out, while rank 1 still slept
        assert "within 0:00:03" in outcome and 2.5 < seconds < 10, (outcome, seconds)
    else:  # noticed at once: its connection closed (the timeout is 30 s)
        assert seconds < 15


# Bad layouts, refused before any weight is read -----------------------------------------------
def test_pipeline_map_is_contiguous_and_balanced():
    assert pipeline_map(5, 2) == {
        "embed": 0,
        "blocks.0": 0,
        "blocks.1": 0,
        "blocks.2": 1,
        "blocks.3": 1,
        "blocks.4": 1,
        "final": 1,
    }
    layout = pipeline_map(7, 3)
    ranks = [layout[f"blocks.{L}"] for L in range(7)]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2} and layout["final"] == 2


def test_bad_pipelines_have_clear_errors(hf_checkpoint, monkeypatch):
    import torch.distributed as dist

    path = str(hf_checkpoint("llama-gqa")[0])
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        PipelineError, match=r"torch.distributed, which is not initialised: launch with `torchrun --nproc-per-node 2"
    ):
        HookedTransformer.from_pretrained(path, pipeline_ranks=2)
    with pytest.raises(PipelineError, match="pipeline_ranks=3 is more than this model's 2 blocks"):
        HookedTransformer.from_pretrained(path, pipeline_ranks=3)
    with pytest.raises(PipelineError, match="pipeline_ranks must be a positive int"):
        HookedTransformer.from_pretrained(path, pipeline_ranks=0)
    with pytest.raises(PlacementError, match="does not combine with device_map"):
        HookedTransformer.from_pretrained(path, pipeline_ranks=2, device_map={"": "cpu"})
    assert (
        HookedTransformer.from_pretrained(path, pipeline_ranks=1).placement.pipeline_map is None
    )  # one stage: nothing to split

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(PipelineError, match=r"pipeline_ranks=2, but the process group has 1 rank\(s\)"):
            HookedTransformer.from_pretrained(path, pipeline_ranks=2)
    finally:
        dist.destroy_process_group()


SCRIPT = """
import sys, torch, torch.distributed as dist
from transformer_hooks import HookedTransformer
torch.set_num_threads(1)
model = HookedTransformer.from_pretrained(sys.argv[1], pipeline_ranks=2)  # joins torchrun's group itself
logits, cache = model.run_with_cache(torch.tensor(%s), names_filter="*hook_resid_post")
if dist.get_rank() == 0:
    torch.save({"logits": logits, "cache": dict(cache.items())}, sys.argv[2])
else:
    assert logits is None and cache is None
dist.barrier()
dist.destroy_process_group()
"""


def test_under_torchrun(hf_checkpoint, tmp_path):
    path = str(hf_checkpoint("llama-gqa")[0])
    script = tmp_path / "run.py"
    script.write_text(SCRIPT % TOKENS.tolist())
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
        + [path, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    one = HookedTransformer.from_pretrained(path)
    logits, cache = one.run_with_cache(TOKENS, names_filter="*hook_resid_post")
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-6)
    assert list(got["cache"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for site, act in got["cache"].items():
        torch.testing.assert_close(act, cache[site], rtol=0, atol=1e-6)


def _generate_worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = HookedTransformer.from_pretrained(path, pipeline_ranks=world)
        greedy = model.generate(TOKENS, max_new_tokens=5, do_sample=False, verbose=False)
        torch.manual_seed(1000 + rank)  # different on each rank: the generation gives every rank rank 0's
        sampled = model.generate(TOKENS, max_new_tokens=5, do_sample=True, temperature=2.0, verbose=False)
        torch.save({"greedy": greedy, "sampled": sampled}, f"{out}.rank{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_generate_on_two_ranks_equals_one_process(hf_checkpoint, tmp_path):
    """generate with a KV cache per rank: every rank returns the tokens one process generates,
    greedy and sampled (rank 0's random state)."""
    path = str(hf_checkpoint("llama-gqa")[0])
    out = str(tmp_path / "gen")
    port = free_port()
    assert run_ranks(_generate_worker, lambda rank: (rank, 2, port, path, out), world=2, timeout=180) == [0, 0]
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    one = HookedTransformer.from_pretrained(path)
    greedy = one.generate(TOKENS, max_new_tokens=5, do_sample=False, verbose=False)
    torch.manual_seed(1000)  # rank 0's seed
    sampled = one.generate(TOKENS, max_new_tokens=5, do_sample=True, temperature=2.0, verbose=False)
    for got in ranks:
        assert torch.equal(got["greedy"], greedy)
        assert torch.equal(got["sampled"], sampled)
