"""Remote serving: requests/s and latency for 1, 4 and 16 concurrent clients, against one local
forward per request, and the gain from batching.

    python benchmarks/serve.py                    # a random GPT-2 (6 layers, d_model 512), built here
    python benchmarks/serve.py --model PATH       # any model the serve command loads
    python benchmarks/serve.py --quick            # fewer requests

Every request is one prompt of ``--pos`` token ids with its own steering vector added at one
site, returning one site's activation (no logits), as an intervention experiment sends. The
server runs on 127.0.0.1 twice: batching on (the default), and off (``--max-batch-rows 1``,
one request per forward). "local" is the same request as one forward in this process
(``run_with_cache`` with the hook), one after another. Clients are threads of this process,
each with its own ``RemoteModel``, sending their requests one after another.
"""

from __future__ import annotations

import argparse
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


def clients_run(url: str, n_clients: int, n_requests: int, tokens: torch.Tensor, site: str, out: str) -> dict:
    models = [remote.RemoteModel(url, token=TOKEN, timeout=600) for _ in range(n_clients)]
    d_model = models[0].cfg.d_model
    vectors = [torch.randn(d_model, generator=torch.Generator().manual_seed(i)) for i in range(n_clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def client(i: int) -> None:
        m = models[i]
        barrier.wait()
        for _ in range(n_requests):
            start = time.perf_counter()
            m.run_with_cache(tokens, names_filter=[out], fwd_hooks=[remote.add(site, vectors[i])], return_type=None)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    health = models[0].health()
    for m in models:
        m.close()
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p90": latencies[int(0.9 * (len(latencies) - 1))],
        "per_forward": health["batched_requests"] / max(health["forwards"], 1),
    }


def local_run(model_path: str, n_requests: int, tokens: torch.Tensor, site: str, out: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = HookedTransformer.from_pretrained(model_path)
    vector = torch.randn(model.cfg.d_model)

    def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act + vector

    latencies = []
    with torch.no_grad():
        for i in range(n_requests + 2):
            start = time.perf_counter()
            with model.hooks(fwd_hooks=[(site, hook)]):
                model.run_with_cache(tokens, names_filter=[out], return_type=None)
            if i >= 2:  # warm-up
                latencies.append(time.perf_counter() - start)
    return {"rps": len(latencies) / sum(latencies), "p50": statistics.median(latencies), "p90": sorted(latencies)[-2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: a random GPT-2 built here)")
    parser.add_argument("--pos", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--d-model", type=int, default=512, help="width of the random GPT-2 (default: 512)")
    parser.add_argument("--layers", type=int, default=6, help="blocks of the random GPT-2 (default: 6)")
    parser.add_argument("--requests", type=int, default=24, help="requests per client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of local)")
    parser.add_argument("--quick", action="store_true")
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
                    rows.append((what, c, clients_run(server.url, c, n if c > 1 else n * 2, tokens, site, out)))
            finally:
                server.stop()
    print(f"\n{'':34} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'req/forward':>11}")
    for what, c, r in rows:
        per = f"{r['per_forward']:.1f}" if "per_forward" in r else "1"
        print(f"{what:34} {c:7d} {r['rps']:8.1f} {1000 * r['p50']:8.1f} {1000 * r['p90']:8.1f} {per:>11}")
    batched = {c: r["rps"] for what, c, r in rows if what == "server, batched"}
    single = {c: r["rps"] for what, c, r in rows if what == "server, one request per forward"}
    print(f"\nbatching gain at 16 clients: {batched[16] / single[16]:.2f}x (goal: >= 3x)")
    print(f"batched server at 16 clients vs local one forward per request: {batched[16] / rows[0][2]['rps']:.2f}x")


if __name__ == "__main__":
    main()
