"""Serving a model split over processes: `torchrun --nproc-per-node 2 -m transformer_hooks serve
--pipeline-ranks 2`, rank 0 serves and rank 1 follows; forwards with sites and interventions on
both ranks' blocks equal the local run bit for bit, concurrent requests still batch, and the jobs
that need one process answer 400 naming why."""

from __future__ import annotations

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
        yield url, local
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_split_model_serves_forwards_equal_to_local(served):
    url, local = served
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

    with remote.RemoteModel(url, token=TOKEN) as m:
        with pytest.raises(remote.RemoteBadRequest, match="split over processes"):
            m.get_act_patch_resid_pre(Q, P, remote.logit_diff(" Paris", " Rome"))
