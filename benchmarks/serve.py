"""Remote serving: requests/s and latency for 1, 4 and 16 concurrent clients, against one local
forward per request, and the gain from batching.

    python benchmarks/serve.py                    # a random GPT-2 (24 layers, d_model 128), built here
    python benchmarks/serve.py --model PATH       # any model the serve command loads
    python benchmarks/serve.py --quick            # fewer requests

Every request is one prompt of ``--pos`` token ids with its own steering vector added at one
site, returning one site's activation (no logits), as an intervention experiment sends. The
server runs on 127.0.0.1 twice: batching on (the default), and off (``--max-batch-rows 1``,
one request per forward). "local" is the same request as one forward in this process
(``run_with_cache`` with the hook), one after another. Clients are threads of this process,
each with its own ``RemoteModel``, sending their requests one after another.

The default model is narrow and deep: most of its forward is the fixed cost of running 24
blocks, as a large model's forward on a GPU at a small batch is mostly fixed cost; that is
where batching pays. On CPU a wide model's forward is compute-bound (its matmuls grow with
the batch), and batching gains less (try ``--d-model 512 --layers 6 --pos 32``).

"CPU ms/req" is the server process's CPU time per request. On a shared machine the wall-clock
figures move with the other processes' load (a process with more runnable threads gets more
of the cores); CPU per request does not, so the batching gain is printed both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from transformer_hooks import HookedTransformer, remote
from transformer_hooks.remote.schema import encode_tensors

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "benchmark-token-0123456789abcdef"


def random_checkpoint(directory: Path, d_model: int, n_layers: int) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=1000, n_embd=d_model, n_layer=n_layers, n_head=8, n_positions=256)
    torch.manual_seed(0)
    path = directory / "gpt2-random"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, tokens: Path, threads: int, batch_rows: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "transformer_hooks", "serve", "--model", model, "--tokens", str(tokens)]
        args += ["--port", str(self.port), "--threads", str(threads), "--max-batch-rows", str(batch_rows)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("the server did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clients_run(
    server: Server, n_clients: int, n_requests: int, tokens: torch.Tensor, site: str, out: str, raw: bool
) -> dict:
    """``n_clients`` threads sending ``n_requests`` each, one after another. ``raw``: each sends a
    body encoded once, as a load generator does (a RemoteModel per thread spends client CPU on
    every request, and with 16 threads on a busy machine the clients, not the server, set the pace)."""
    url = server.url
    models = [remote.RemoteModel(url, token=TOKEN, timeout=600) for _ in range(n_clients)]
    d_model = models[0].cfg.d_model
    vectors = [torch.randn(d_model, generator=torch.Generator().manual_seed(i)) for i in range(n_clients)]
    bodies = [
        json.dumps(
            {
                "tokens": tokens.tolist(),
                "sites": [out],
                "interventions": [remote.add(site, v).spec("v")],
                "tensors": encode_tensors({"v": v}),
                "return_logits": False,
            }
        ).encode()
        for v in vectors
    ]
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def client(i: int) -> None:
        m = models[i]
        barrier.wait()
        for _ in range(n_requests):
            start = time.perf_counter()
            if raw:
                r = m._client.post("/v1/run", content=bodies[i], headers={"Content-Type": "application/json"})
                assert r.status_code == 200, r.text
            else:
                m.run_with_cache(tokens, names_filter=[out], fwd_hooks=[remote.add(site, vectors[i])], return_type=None)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    before = models[0].health()
    barrier.wait()
    start, cpu = time.perf_counter(), cpu_seconds(server.proc.pid)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = cpu_seconds(server.proc.pid) - cpu
    after = models[0].health()
    for m in models:
        m.close()
    latencies.sort()
    forwards = after["forwards"] - before["forwards"]
    return {
        "rps": len(latencies) / wall,
        "cpu": cpu / len(latencies),
        "p50": statistics.median(latencies),
        "p90": latencies[int(0.9 * (len(latencies) - 1))],
        "per_forward": (after["batched_requests"] - before["batched_requests"]) / max(forwards, 1),
    }


def local_run(model_path: str, n_requests: int, tokens: torch.Tensor, site: str, out: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = HookedTransformer.from_pretrained(model_path)
    vector = torch.randn(model.cfg.d_model)

    def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act + vector

    latencies, cpu = [], 0.0
    with torch.no_grad():
        for i in range(n_requests + 2):
            start, cpu_start = time.perf_counter(), time.process_time()
            with model.hooks(fwd_hooks=[(site, hook)]):
                model.run_with_cache(tokens, names_filter=[out], return_type=None)
            if i >= 2:  # warm-up
                latencies.append(time.perf_counter() - start)
                cpu += time.process_time() - cpu_start
    return {
        "rps": len(latencies) / sum(latencies),
        "cpu": cpu / len(latencies),
        "p50": statistics.median(latencies),
        "p90": sorted(latencies)[-2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: a random GPT-2 built here)")
    parser.add_argument("--pos", type=int, default=16, help="tokens per prompt")
    parser.add_argument("--d-model", type=int, default=128, help="width of the random GPT-2 (default: 128)")
    parser.add_argument("--layers", type=int, default=24, help="blocks of the random GPT-2 (default: 24)")
    parser.add_argument("--requests", type=int, default=24, help="requests per client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of local)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--remote-client", action="store_true", help="clients call RemoteModel (default: pre-encoded bodies)"
    )
    args = parser.parse_args()
    n = 8 if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_checkpoint(Path(tmp), args.d_model, args.layers))
        tokens_file = Path(tmp) / "tokens.txt"
        tokens_file.write_text(f"{TOKEN} max_concurrent=64\n")
        tokens = torch.arange(args.pos)[None] % 100 + 1
        site, out = "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"  # any model has 4 blocks
        rows = [("local, one forward per request", 1, local_run(model, n * 4, tokens, site, out, args.threads))]
        for batching in (True, False):
            server = Server(model, tokens_file, args.threads, 64 if batching else 1)
            try:
                for c in (1, 4, 16):
                    what = "server, batched" if batching else "server, one request per forward"
                    n_requests = n if c > 1 else n * 2
                    rows.append(
                        (what, c, clients_run(server, c, n_requests, tokens, site, out, not args.remote_client))
                    )
            finally:
                server.stop()
    head = f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'CPU ms/req':>10} {'req/forward':>11}"
    print(f"\n{'':34} {head}")
    for what, c, r in rows:
        per = f"{r['per_forward']:.1f}" if "per_forward" in r else "1"
        times = f"{1000 * r['p50']:8.1f} {1000 * r['p90']:8.1f} {1000 * r['cpu']:10.2f}"
        print(f"{what:34} {c:7d} {r['rps']:8.1f} {times} {per:>11}")
    batched = {c: r for what, c, r in rows if what == "server, batched"}
    single = {c: r for what, c, r in rows if what == "server, one request per forward"}
    local = rows[0][2]
    print(f"\nbatching gain at 16 clients, requests/s: {batched[16]['rps'] / single[16]['rps']:.2f}x (goal: >= 3x)")
    print(f"batching gain at 16 clients, server CPU per request: {single[16]['cpu'] / batched[16]['cpu']:.2f}x")
    print(f"batched server at 16 clients vs local one forward per request: {batched[16]['rps'] / local['rps']:.2f}x")
    print(f"server CPU per request, batched at 16 clients vs local: {batched[16]['cpu'] / local['cpu']:.2f}x")


if __name__ == "__main__":
    main()
