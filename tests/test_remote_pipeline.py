"""Serving a model split over processes: `torchrun --nproc-per-node 2 -m transformer_hooks serve
--pipeline-ranks 2`, rank 0 serves and rank 1 follows; forwards with sites and interventions on
both ranks' blocks equal the local run bit for bit, concurrent requests still batch, every other
job (patch sweeps, attribution patching, DLA, the logit lens, generate, params) gives the local
result, and a bad or failing job answers 400 and leaves every rank serving the next."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from checkpoints import VOCAB, save_checkpoint  # noqa: E402
from ranks import free_port  # noqa: E402
from tokenizers_util import add_tokenizer  # noqa: E402

from transformer_hooks import HookedTransformer, remote  # noqa: E402
from transformer_hooks.analysis.dla import direct_logit_attribution  # noqa: E402
from transformer_hooks.analysis.lens import logit_lens  # noqa: E402
from transformer_hooks.interventions import patching  # noqa: E402
from transformer_hooks.interventions.steering import steering  # noqa: E402
from transformer_hooks.remote import jobs, server  # noqa: E402
from transformer_hooks.scale.distributed import logit_diff_metric  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "pipeline-token-0123456789abcdef"
P, Q = "The capital of France is", "The capital of Italy is"


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("remote_pipeline")
    path, _ = save_checkpoint("gpt2", d)
    add_tokenizer(path, VOCAB)
    (d / "tokens.txt").write_text(f"{TOKEN}\n")
    port = free_port()
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args += ["-m", "transformer_hooks", "serve", "--pipeline-ranks", "2", "--model", str(path)]
    args += ["--tokens", str(d / "tokens.txt"), "--port", str(port), "--threads", "1", "--batch-window-ms", "20"]
    log = d / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        local = HookedTransformer.from_pretrained(str(path))
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, local, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_split_model_serves_forwards_equal_to_local(served):
    url, local, _ = served
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_scale"]
    v = torch.randn(48, generator=torch.Generator().manual_seed(0))
    hooks = [
        remote.add("blocks.0.hook_resid_mid", v, pos=-1),  # rank 0's block
        remote.zero("blocks.1.attn.hook_z", head=1),  # rank 1's block
        remote.patch("blocks.1.hook_resid_pre", from_prompt=0, prompts=[1]),
    ]
    tokens = local.to_tokens([P, Q])

    def h_add(act, hook):
        act = act.clone()
        act[:, -1] = act[:, -1] + v
        return act

    def h_zero(act, hook):
        act = act.clone()
        act[:, :, 1] = 0
        return act

    # Prompt 0 is edited (the add), so the patch reads its clean copy: its activation with no hooks.
    clean = local.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")[1]["blocks.1.hook_resid_pre"]

    def h_patch(act, hook):
        act = act.clone()
        act[1] = clean[0]
        return act

    edits = [("blocks.0.hook_resid_mid", h_add), ("blocks.1.attn.hook_z", h_zero), ("blocks.1.hook_resid_pre", h_patch)]
    with local.hooks(fwd_hooks=edits):
        want_logits, want = local.run_with_cache(tokens, names_filter=names)

    results: dict[int, tuple] = {}

    def one(i: int) -> None:
        with remote.RemoteModel(url, token=TOKEN, timeout=60) as m:
            results[i] = m.run_with_cache([P, Q], names_filter=names, fwd_hooks=hooks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for logits, cache in results.values():
        assert torch.equal(logits, want_logits)
        assert all(torch.equal(cache[n], want[n]) for n in names)
    health = httpx.get(f"{url}/health").json()
    assert health["forwards"] < health["batched_requests"] == 4 and health["hooks_attached"] == 0


def close(got, want):
    """Equal within 1e-6: a product with a weight held on rank 0 (a contiguous copy, where one
    process has a transposed view) may round differently."""
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_split_model_serves_every_job_equal_to_local(served):
    url, local, _ = served
    answer, contrast = local.to_single_token(" Paris"), local.to_single_token(" Rome")
    corrupted, clean = local.to_tokens(Q), local.to_tokens(P)
    clean_cache = local.run_with_cache(clean)[1]
    metric = logit_diff_metric(answer, contrast)
    with remote.RemoteModel(url, token=TOKEN, timeout=60) as m:
        for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"):
            want = getattr(patching, name)(local, corrupted, clean_cache, metric, progress=False)
            assert torch.equal(getattr(m, name)(Q, P, remote.logit_diff(" Paris", " Rome")), want), name
        want = patching.get_act_patch_block_every(
            local, corrupted, clean_cache, metric, progress=False, metric_positions=-1
        )
        assert torch.equal(
            m.patching_sweep("get_act_patch_block_every", Q, P, remote.logit_diff(answer, contrast), -1), want
        )
        for method in ("atp", "atp*"):
            want = patching.get_attr_patch_attn_head_q_all_pos(local, corrupted, clean_cache, metric, method=method)
            got = m.get_attr_patch_attn_head_q_all_pos(Q, P, remote.logit_diff(" Paris", " Rome"), method=method)
            assert torch.equal(got, want), method

        d, dl = (
            m.direct_logit_attribution(P, " Paris", " London"),
            direct_logit_attribution(local, P, " Paris", " London"),
        )
        for f in ("str_tokens", "pos", "accumulated_labels", "logit_diff", "answer_logit", "contrast_logit"):
            assert getattr(d, f) == getattr(dl, f), f
        for f in ("attn", "mlp", "accumulated"):
            assert torch.equal(getattr(d, f), getattr(dl, f)), f
        close(d.heads, dl.heads)  # through rank 0's copy of W_O

        lens, lens_local = m.logit_lens(P, pos_slice=-1, top_k=3), logit_lens(local, P, pos_slice=-1, top_k=3)
        assert lens.labels == lens_local.labels and torch.equal(lens.top_tokens, lens_local.top_tokens)
        assert torch.equal(lens.top_probs, lens_local.top_probs)

        v = torch.randn(48, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            plain = local.generate(P, max_new_tokens=6, do_sample=False, verbose=False)
            with steering(local, "blocks.1.hook_resid_pre", v, 4.0):  # rank 1's block
                steered = local.generate(P, max_new_tokens=6, do_sample=False, verbose=False)
            torch.manual_seed(5)
            sampled = local.generate(clean, max_new_tokens=6, do_sample=True, verbose=False)
        assert m.generate(P, 6) == plain
        assert m.generate(P, 6, steering=[remote.steer("blocks.1.hook_resid_pre", v, 4.0)]) == steered
        assert torch.equal(m.generate(clean, 6, do_sample=True, seed=5), sampled)

        # params: every rank's weights, exactly (a params job's copies are dropped on rank 0 after it).
        want = dict(local.named_parameters())
        for _ in range(2):
            got = m.parameters(["blocks.*.attn.W_Q", "unembed.W_U", "ln_final.*"])
            assert sorted(got) == sorted(
                n for n in want if n.endswith("attn.W_Q") or n.startswith(("unembed.W_U", "ln_final."))
            )
            assert all(torch.equal(got[n], want[n]) for n in got)
        # The client's cache reads the DLA weights through params.
        _, cache = m.run_with_cache(P)
        local_cache = local.run_with_cache(P)[1]
        heads = cache.logit_attrs(cache.stack_head_results(-1, pos_slice=-1), " Paris", " London", pos_slice=-1)
        heads_local = local_cache.logit_attrs(
            local_cache.stack_head_results(-1, pos_slice=-1), " Paris", " London", pos_slice=-1
        )
        close(heads, heads_local)
    # Rank 0 keeps what DLA and the lens read of rank 1's part (W_O, the unembedding, norms), and
    # none of the weights params sent (W_Q, W_out, ...): a params job's copies go when it ends.
    kept = [n for n in want if not n.startswith(("blocks.0.", "embed.", "pos_embed."))]
    kept = [n for n in kept if n.startswith(("unembed.", "ln_final.")) or n.endswith(("attn.W_O", ".w", ".b"))]
    assert "blocks.1.attn.W_O" in kept and "unembed.W_U" in kept
    held = httpx.get(f"{url}/health").json()["held_weight_bytes"]
    assert held == sum(want[n].numel() * want[n].element_size() for n in kept)


def test_split_model_failing_jobs_leave_it_serving(served):
    url, local, log = served
    with remote.RemoteModel(url, token=TOKEN, timeout=60) as m:
        # Rejected on rank 0 before any rank runs them: the metric reads a position the sweep
        # does not unembed (rank 0 alone would fail mid-sweep), a sweep/parameter/lens site unknown.
        with pytest.raises(remote.RemoteBadRequest, match="outside metric_positions"):
            m.patching_sweep("get_act_patch_resid_pre", Q, P, remote.logit_diff(" Paris", " Rome"), metric_positions=-2)
        with pytest.raises(remote.RemoteBadRequest, match="out of range"):
            m.patching_sweep("get_act_patch_resid_pre", Q, P, remote.logit(" Paris", pos=40))
        with pytest.raises(remote.RemoteBadRequest, match="unknown sweep"):
            m.patching_sweep("get_act_patch_nothing", Q, P, remote.logit_diff(" Paris", " Rome"))
        with pytest.raises(remote.RemoteBadRequest, match="no parameter 'blocks.1.attn.W_X'"):
            m.parameters(["blocks.1.attn.W_X"])
        with pytest.raises(remote.RemoteBadRequest, match="unknown lens site"):
            m.logit_lens(P, sites=["resid_nowhere"])
        with pytest.raises(remote.RemoteBadRequest, match="same token"):
            m.direct_logit_attribution(P, " Paris", " Paris")
        # Fails on every rank alike after the broadcast (the context is 64 positions): the
        # followers log it and follow the next job.
        with pytest.raises(remote.RemoteBadRequest, match="exceeds this model's context"):
            m.generate(P, 80)
        with torch.no_grad():
            want = local.generate(Q, max_new_tokens=4, do_sample=False, verbose=False)
        assert m.generate(Q, 4) == want
        logits = m.run_with_hooks(Q)
        assert torch.equal(logits, local(local.to_tokens(Q)))
    # Only the generate reached the followers (and failed there too); the rest never left rank 0.
    failures = [line for line in log.read_text().splitlines() if "follower:" in line]
    assert len(failures) == 1 and "generate failed" in failures[0] and "exceeds this model's context" in failures[0]


def test_split_job_runs_to_the_end_when_its_client_leaves(served):
    """One process stops a job at the next block once its client has gone; split over processes,
    rank 0 runs it to the end (the followers run it too), so it is not stopped."""
    _, local, _ = served
    tokens = local.to_tokens(P)

    class Followers:  # stands for pipeline.Leader: what it would broadcast
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def send(self, message: dict) -> None:
            self.sent.append(message)

    for leader in (None, Followers()):
        worker = server.Worker(local, 0.0, 8, leader)
        loop = asyncio.new_event_loop()
        try:
            work = server.Work(None, None, loop, loop.create_future(), "patch")

            def job(model, work=work):
                work.cancelled.set()  # the client goes away while the job runs
                return model(tokens)

            work.job = job
            worker.submit(work)
            if leader is None:
                with pytest.raises(jobs.Cancelled):
                    loop.run_until_complete(asyncio.wait_for(work.future, 30))
            else:
                assert torch.equal(loop.run_until_complete(asyncio.wait_for(work.future, 30)), local(tokens))
        finally:
            worker.stop()
            worker.thread.join(30)
            loop.close()
    assert leader.sent == [{"kind": "stop"}]
