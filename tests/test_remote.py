"""Remote serving (transformer_hooks.remote): a real server process on 127.0.0.1, a tiny random
GPT-2 with the tiny tokenizer, and a client; every answer equal to the local run, bit for bit.

One server runs for the module (starting it is most of the time); the restart test stops and
restarts it last. The batching test also checks, in process, that a batched forward gives each
request exactly what it gets alone.
"""

from __future__ import annotations

import json
import os
import socket
import struct
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
from transformer_hooks.interventions.patching.ablation import ablation_value  # noqa: E402
from transformer_hooks.interventions.steering import steering  # noqa: E402
from transformer_hooks.remote import jobs  # noqa: E402
from transformer_hooks.remote.schema import Intervention, RunRequest, encode_tensors  # noqa: E402
from transformer_hooks.scale.distributed import logit_diff_metric  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"  # max_tokens=12
CAROL = "carol-token-0123456789abcdef"  # max_concurrent=1, max_response_bytes=40000
P = "The capital of France is"
Q = "The capital of Italy is"
MAX_BODY = 200_000


class Served:
    """The server process of the module, restartable on the same port."""

    def __init__(self, checkpoint: Path, tokens: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "transformer_hooks",
            "serve",
            "--model",
            str(checkpoint),
            "--tokens",
            str(tokens),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            "1",
            "--max-body-bytes",
            str(MAX_BODY),
            "--batch-window-ms",
            "20",
        ]
        self.log = tokens.parent / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.launch()
        self.wait_up()

    def launch(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_up(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    path, _ = save_checkpoint("gpt2", d)
    add_tokenizer(path, VOCAB)
    tokens = d / "tokens.txt"
    tokens.write_text(
        f"# test tokens\n{ALICE} name=alice\n{BOB} name=bob max_tokens=12\n"
        f"{CAROL} name=carol max_concurrent=1 max_response_bytes=40000\n"
    )
    return path, tokens


@pytest.fixture(scope="module")
def started(checkpoint, one_thread):
    """(server, local model): the server process starts while the local model loads."""
    s = Served(*checkpoint)
    s.launch()
    try:
        model = HookedTransformer.from_pretrained(str(checkpoint[0]))
        s.wait_up()
        yield s, model
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def local(started):
    return started[1]


@pytest.fixture(scope="module")
def client(server):
    with remote.RemoteModel(server.url, token=ALICE, timeout=60) as c:
        yield c


def equal(a, b):
    return a.shape == b.shape and torch.equal(a, b)


# Equality with local runs -----------------------------------------------------------------------
def test_info_tokens_and_cache_with_dla(client, local):
    assert client.cfg.to_dict() == local.cfg.to_dict()
    assert client.hook_names == list(local.hook_dict)
    assert equal(client.to_tokens([P, "The capital"]), local.to_tokens([P, "The capital"]))
    assert client.to_str_tokens(P) == local.to_str_tokens(P)
    names = ["hook_embed", "hook_pos_embed", "blocks.*.hook_resid_*", "blocks.*.hook_*_out", "blocks.*.attn.hook_z"]
    names += ["ln_final.hook_scale"]
    logits, cache = client.run_with_cache(P, names_filter=names)
    local_logits, local_cache = local.run_with_cache(P, names_filter=names)
    assert equal(logits, local_logits)
    assert sorted(cache.keys()) == sorted(local_cache.keys())
    assert all(equal(cache[k], local_cache[k]) for k in local_cache.keys())

    # The cache's DLA methods work on the client (weights fetched once, laid out as the server's).
    def dla(c):
        heads = c.logit_attrs(c.stack_head_results(-1, pos_slice=-1), " Paris", " London", pos_slice=-1)
        return heads, c.decompose_resid(-1, pos_slice=-1), c.accumulated_resid(-1, apply_ln=True, pos_slice=-1)

    for got, want in zip(dla(cache), dla(local_cache), strict=True):
        assert equal(got, want)


def test_every_intervention_equals_local_hooks(client, local):
    """set, add, steer, scale, zero, mean_ablate and patch, with position and head selectors and
    prompt selections, against hand-written local hooks doing the same."""
    prompts = [P, Q, "The capital of Spain is"]
    tokens = local.to_tokens(prompts)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(48, generator=g)
    zv = torch.randn(12, generator=g)
    z, resid0, resid1, mlp = (
        "blocks.0.attn.hook_z",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_mlp_out",
    )
    hooks = [
        remote.add(resid0, v, coeff=2.0, pos=[1, 2], prompts=[0]),
        remote.set_value(z, zv, pos=-1, head=[1, 3]),
        remote.scale(z, 0.5, head=0, prompts=[1, 2]),
        remote.patch(resid1, from_prompt=0, prompts=[1], pos=-1),
        remote.mean_ablate(mlp, pos=[0, 3]),
        remote.zero("blocks.1.attn.hook_z", head=2),
        remote.steer("blocks.1.hook_resid_post", v, 3.0, prompts=[2]),
    ]
    got = client.run_with_hooks(prompts, fwd_hooks=hooks)

    _, clean = local.run_with_cache(tokens, names_filter=[resid1, mlp])

    def h_add(act, hook):
        act = act.clone()
        act[0, [1, 2]] = act[0, [1, 2]] + 2.0 * v
        return act

    def h_z(act, hook):
        act = act.clone()
        act[:, -1, [1, 3]] = zv
        act[1:, :, 0] = act[1:, :, 0] * 0.5
        return act

    def h_patch(act, hook):
        act = act.clone()
        act[1, -1] = clean[resid1][0, -1]  # prompt 0 is edited (the add), so its clean value
        return act

    def h_mean(act, hook):
        act = act.clone()
        mean = ablation_value(local, mlp, "mean", tokens, reference=clean[mlp])
        act[:, [0, 3]] = mean[:, [0, 3]]
        return act

    def h_zero(act, hook):
        act = act.clone()
        act[:, :, 2] = 0
        return act

    def h_steer(act, hook):
        act = act.clone()
        act[2] = act[2] + 3.0 * v
        return act

    want = local.run_with_hooks(
        tokens,
        fwd_hooks=[
            (resid0, h_add),
            (z, h_z),
            (resid1, h_patch),
            (mlp, h_mean),
            ("blocks.1.attn.hook_z", h_zero),
            ("blocks.1.hook_resid_post", h_steer),
        ],
    )
    assert equal(got, want)
    # A patch from an unedited prompt reads its row of the same forward.
    got = client.run_with_hooks([P, Q], fwd_hooks=[remote.patch(resid1, from_prompt=1, prompts=[0])])
    t2 = local.to_tokens([P, Q])
    clean2 = local.run_with_cache(t2, names_filter=resid1)[1][resid1]

    def h_patch2(act, hook):
        act = act.clone()
        act[0] = clean2[1]
        return act

    assert equal(got, local.run_with_hooks(t2, fwd_hooks=[(resid1, h_patch2)]))


def test_jobs_equal_local(client, local):
    answer, contrast = local.to_single_token(" Paris"), local.to_single_token(" Rome")
    corrupted, clean = local.to_tokens(Q), local.to_tokens(P)
    clean_cache = local.run_with_cache(clean)[1]
    metric = logit_diff_metric(answer, contrast)
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"):
        want = getattr(patching, name)(local, corrupted, clean_cache, metric, progress=False)
        assert equal(getattr(client, name)(Q, P, remote.logit_diff(" Paris", " Rome")), want), name
    want = patching.get_act_patch_block_every(
        local, corrupted, clean_cache, metric, progress=False, metric_positions=-1
    )
    got = client.patching_sweep("get_act_patch_block_every", Q, P, remote.logit_diff(answer, contrast), -1)
    assert equal(got, want)
    for method in ("atp", "atp*"):
        want = patching.get_attr_patch_attn_head_q_all_pos(local, corrupted, clean_cache, metric, method=method)
        got = client.get_attr_patch_attn_head_q_all_pos(Q, P, remote.logit_diff(" Paris", " Rome"), method=method)
        assert equal(got, want), method

    d, dl = (
        client.direct_logit_attribution(P, " Paris", " London"),
        direct_logit_attribution(local, P, " Paris", " London"),
    )
    for f in ("str_tokens", "pos", "logit_diff", "embed", "constant", "accumulated_labels"):
        assert getattr(d, f) == getattr(dl, f), f
    for f in ("heads", "attn", "mlp", "accumulated"):
        assert equal(getattr(d, f), getattr(dl, f)), f

    lens, lens_local = client.logit_lens(P, pos_slice=-1, top_k=3), logit_lens(local, P, pos_slice=-1, top_k=3)
    assert lens.labels == lens_local.labels
    assert equal(lens.top_tokens, lens_local.top_tokens) and equal(lens.top_probs, lens_local.top_probs)

    v = torch.randn(48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = local.generate(P, max_new_tokens=6, do_sample=False, verbose=False)
        with steering(local, "blocks.0.hook_resid_post", v, 4.0):
            steered = local.generate(P, max_new_tokens=6, do_sample=False, verbose=False)
        torch.manual_seed(5)
        sampled = local.generate(clean, max_new_tokens=6, do_sample=True, verbose=False)
    assert client.generate(P, 6) == plain
    assert client.generate(P, 6, steering=[remote.steer("blocks.0.hook_resid_post", v, 4.0)]) == steered
    assert equal(client.generate(clean, 6, do_sample=True, seed=5), sampled)


# Batching -----------------------------------------------------------------------------------------
def test_batched_forward_is_bit_identical_to_alone(local):
    """In process: requests of one length and padding kind share a forward, each gets its own bits."""
    g = torch.Generator().manual_seed(3)
    reqs = [
        RunRequest(
            tokens=torch.randint(0, VOCAB, (1 + i % 3, 9), generator=g).tolist(),
            sites=["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"],
            interventions=[Intervention(site="blocks.0.hook_resid_post", op="add", tensor="v", pos=i % 9)]
            + ([Intervention(site="blocks.1.hook_resid_pre", op="patch", from_prompt=0)] if i % 3 else []),
            tensors=encode_tensors({"v": torch.randn(48, generator=g)}),
        )
        for i in range(6)
    ]
    prepared = [jobs.prepare_run(local, r) for r in reqs]
    together = jobs.run_batch(local, prepared)
    for p, got in zip(prepared, together, strict=True):
        alone = jobs.run_batch(local, [p])[0]
        assert got.keys() == alone.keys() and all(torch.equal(got[k], alone[k]) for k in got)


def test_concurrent_clients_with_different_interventions(server, local):
    """8 clients at once, each its own intervention; each answer equals its local run, and the server
    batched some of them."""
    before = server.health()
    g = torch.Generator().manual_seed(4)
    vectors = [torch.randn(48, generator=g) for _ in range(8)]
    tokens = local.to_tokens([P, Q])
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        try:
            with remote.RemoteModel(server.url, token=ALICE, timeout=60) as c:
                barrier.wait()
                results[i] = c.run_with_hooks(
                    tokens, fwd_hooks=[remote.add(f"blocks.{i % 2}.hook_resid_mid", vectors[i])]
                )
        except BaseException as e:  # noqa: BLE001  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(8):

        def h(act, hook, v=vectors[i]):
            return act + v

        assert equal(results[i], local.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{i % 2}.hook_resid_mid", h)])), i
    after = server.health()
    assert after["batched_requests"] - before["batched_requests"] == 8
    assert after["forwards"] - before["forwards"] < 8, "no request shared a forward"
    assert after["hooks_attached"] == 0


# Refusals ---------------------------------------------------------------------------------------
def test_tokens_refused_before_anything_runs(server):
    before = server.health()["forwards"]
    with pytest.raises(remote.RemoteAuthError):
        remote.RemoteModel(server.url, token="wrong-token-0123456789abcdef")
    body = {"prompts": [P], "sites": ["blocks.0.hook_resid_pre"]}
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": ALICE}):
        r = httpx.post(f"{server.url}/v1/run", json=body, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"]
    # 401 comes before the body is read: an oversized body with no token is a 401, not a 413.
    r = httpx.post(f"{server.url}/v1/run", content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 401
    assert server.health()["forwards"] == before


def test_bad_bodies_and_requests(server, client):
    auth = {"Authorization": f"Bearer {ALICE}"}
    url = f"{server.url}/v1/run"
    r = httpx.post(url, content=b'{"prompts": ["a"', headers=auth)
    assert r.status_code == 400 and "bad JSON" in r.json()["error"]
    r = httpx.post(url, content=b"x" * (MAX_BODY + 1), headers=auth)
    assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes"

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b" " * 10_000

    r = httpx.post(url, content=chunks(), headers=auth)
    assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes"
    r = httpx.post(url, json={"prompts": [P], "code": "__import__('os')"}, headers=auth)
    assert r.status_code == 400 and "code" in r.json()["error"]
    r = httpx.post(url, json={"prompts": [P], "tokens": [[1, 2]]}, headers=auth)
    assert r.status_code == 400 and "exactly one" in r.json()["error"]

    with pytest.raises(remote.RemoteBadRequest, match="blocks.9.hook_resid_pre"):
        client.run_with_cache(P, names_filter=["blocks.9.hook_resid_pre"])
    with pytest.raises(remote.RemoteBadRequest, match=r"wrong shape.*\[7\]"):
        client.run_with_hooks(P, fwd_hooks=[remote.add("blocks.0.hook_resid_pre", torch.ones(7))])
    with pytest.raises(remote.RemoteBadRequest, match="bad selector: position 99"):
        client.run_with_hooks(P, fwd_hooks=[remote.zero("blocks.0.hook_resid_pre", pos=99)])
    with pytest.raises(remote.RemoteBadRequest, match="bad selector.*no head axis"):
        client.run_with_hooks(P, fwd_hooks=[remote.zero("blocks.0.hook_resid_pre", head=0)])
    with pytest.raises(remote.RemoteBadRequest, match="bad selector: from_prompt 3"):
        client.run_with_hooks([P, Q], fwd_hooks=[remote.patch("blocks.0.hook_resid_pre", from_prompt=3)])
    with pytest.raises(remote.RemoteBadRequest, match="unknown sweep"):
        client.patching_sweep("__class__", Q, P, remote.logit_diff(3, 4))
    with pytest.raises(TypeError, match="declarative"):
        client.run_with_hooks(P, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: a)])
    assert server.health()["hooks_attached"] == 0


@pytest.mark.parametrize(
    "site",
    [
        "__import__('os').system('true')",
        "../../../etc/passwd",
        "blocks.0.hook_resid_pre\x00",
        "blocks.{0}.hook_resid_pre",
        "ｂｌｏｃｋｓ.0.hook_resid_pre",
        "blocks.0.hook_resid_pre; DROP TABLE",
        "\u202eerp_diser_kooh.0.skcolb",
    ],
)
def test_hostile_site_names_answer_400(client, site):
    with pytest.raises(remote.RemoteBadRequest, match="no hook point"):
        client.run_with_cache(P, names_filter=[site])
    with pytest.raises(remote.RemoteBadRequest, match="no hook point"):
        client.run_with_hooks(P, fwd_hooks=[remote.zero(site)])


def test_hostile_prompts_run_or_answer_400(client, local):
    for prompt in ["\x00\x01", "<s></s><unk>", "\u202e" + P, "{{7*7}} ${jndi:ldap://x}", "' OR 1=1 --"]:
        assert equal(client(prompt), local(prompt))
    with pytest.raises(remote.RemoteBadRequest):
        client(torch.tensor([[1, VOCAB + 5]]))  # a token id past the vocabulary
    too_long = "x" * 100_001
    with pytest.raises(remote.RemoteBadRequest, match="prompts"):
        client(too_long)


def test_limits_are_named(server):
    with remote.RemoteModel(server.url, token=BOB) as bob:
        bob(P)  # 6 tokens: within max_tokens=12
        with pytest.raises(remote.RemoteLimitError, match="max_tokens=12") as e:
            bob([P, Q, P])
        assert e.value.limit == "max_tokens" and e.value.status == 413
    with remote.RemoteModel(server.url, token=CAROL) as carol:
        with pytest.raises(remote.RemoteLimitError, match="max_response_bytes=40000") as e:
            carol.run_with_cache(P)  # every site
        assert e.value.limit == "max_response_bytes"
        carol.run_with_cache(P, names_filter="blocks.0.hook_resid_pre", return_type=None)

        slow = _abandoned_request(server, CAROL)
        try:
            _wait_for(lambda: server.health()["running"] == "patch")
            with pytest.raises(remote.RemoteLimitError, match="max_concurrent") as e:
                carol(P)
            assert e.value.limit == "max_concurrent" and e.value.status == 429
        finally:
            slow.close()
    _wait_for(lambda: server.health()["hooks_attached"] == 0)


def _abandoned_request(server, token):
    """A raw connection sending a long sweep (about 10 s alone); the caller closes it mid-request.
    Closed with SO_LINGER 0 it resets, as the connection of a killed client process does."""
    t = (torch.arange(3, 43)[None] % VOCAB).tolist()
    body = json.dumps(
        {
            "sweep": "get_act_patch_attn_head_pattern_dest_src_pos",
            "clean": {"tokens": t},
            "corrupted": {"tokens": t[::-1]},
            "metric": {"name": "logit_diff", "answer": 3, "contrast": 4},
        }
    ).encode()
    head = (
        f"POST /v1/patch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(head.encode() + body)
    return sock


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _answered_at_once_and_clean(server, client, local):
    """The next request is answered at once (the abandoned sweep stopped), and nothing is left."""
    start = time.monotonic()
    assert equal(client(P), local(P))
    assert time.monotonic() - start < 5, "the abandoned sweep ran on"
    health = server.health()
    assert health["hooks_attached"] == 0 and health["queue"] == 0


def test_timeout_and_killed_client_leave_nothing(server, client, local):
    """A sweep takes about 10 s here; a timed-out or abandoned one stops at its next block, so the
    next request is answered at once, and no hook is left."""
    t = torch.arange(3, 43)[None] % VOCAB
    start = time.monotonic()
    with pytest.raises(remote.RemoteTimeout, match="timeout"):
        client._post(
            "patch",
            {
                "sweep": "get_act_patch_attn_head_pattern_dest_src_pos",
                "clean": {"tokens": t.flip(-1).tolist()},
                "corrupted": {"tokens": t.tolist()},
                "metric": {"name": "logit_diff", "answer": 3, "contrast": 4},
                "timeout": 0.5,
            },
        )
    assert equal(client(P), local(P))
    assert time.monotonic() - start < 5, "the timed-out sweep ran on"

    slow = _abandoned_request(server, ALICE)
    _wait_for(lambda: server.health()["running"] == "patch")
    slow.close()  # as a killed client's connection: reset mid-request
    _answered_at_once_and_clean(server, client, local)


def test_client_process_killed_mid_request_leaves_nothing(server, client, local):
    """A client process (RemoteModel in its own interpreter) killed with SIGKILL while its sweep
    runs: the kernel closes its connection, the server stops the sweep at its next block."""
    script = f"""
import torch
from transformer_hooks import remote
t = (torch.arange(3, 43)[None] % {VOCAB})
with remote.RemoteModel({server.url!r}, token={ALICE!r}, timeout=600) as c:
    c._post("patch", {{"sweep": "get_act_patch_attn_head_pattern_dest_src_pos",
        "clean": {{"tokens": t.tolist()}}, "corrupted": {{"tokens": t.flip(-1).tolist()}},
        "metric": {{"name": "logit_diff", "answer": 3, "contrast": 4}}}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        _wait_for(lambda: server.health()["running"] == "patch", timeout=60)
    finally:
        proc.kill()
        proc.wait(10)
    _answered_at_once_and_clean(server, client, local)


def test_server_down_and_restarted(server, client, local):
    server.stop()
    with pytest.raises(remote.RemoteUnavailable, match="cannot reach"):
        client(P)
    with pytest.raises(remote.RemoteUnavailable):
        remote.RemoteModel(server.url, token=ALICE)
    server.start()
    assert equal(client(P), local(P))  # the same client object, after the restart


# The command and its tokens file (no server) ------------------------------------------------------
def test_serve_refuses_torchrun_and_bad_tokens_files(tmp_path, monkeypatch, capsys):
    from transformer_hooks.cli import main
    from transformer_hooks.remote.server import Limits, read_tokens

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{ALICE}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--model", "unused", "--tokens", str(tokens)]) == 2
    assert "torchrun" in capsys.readouterr().err
    for text, message in [
        ("short\n", "at least 16 characters"),
        (f"{ALICE} max_tokens=many\n", "whole number"),
        (f"{ALICE} admin=yes\n", "unknown option 'admin'"),
        ("# only a comment\n", "no token"),
    ]:
        tokens.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_tokens(tokens, Limits())
    tokens.write_text(f"{ALICE} name=a max_concurrent=3  # a comment\n{BOB}\n")
    table = read_tokens(tokens, Limits(max_tokens=7))
    assert table.find(ALICE).limits.max_concurrent == 3 and table.find(BOB).limits.max_tokens == 7
    assert table.find("x" * 30) is None and table.find("") is None
