"""The ``serve`` command: load a model and serve it (``server.py``) with uvicorn.

    python -m transformer_hooks serve --model PATH --tokens tokens.txt [--host 127.0.0.1] [--port 8000]
    torchrun --nproc-per-node 2 -m transformer_hooks serve --pipeline-ranks 2 --model PATH --tokens tokens.txt

The server's packages (starlette, uvicorn) are imported only when the command runs, so the
rest of the command line works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_serve_parser", "cmd_serve"]


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP to many researchers (interventions as data, batched)")
    p.add_argument("--model", required=True, help="preset, HF repo id, local directory or .gguf file")
    p.add_argument("--tokens", required=True, help="file of bearer tokens, one per line, with optional limits")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--device-map", default=None, help="'auto' to spread the blocks over the devices")
    p.add_argument("--no-processing", action="store_true", help="load the weights unprocessed (no fold_ln etc.)")
    p.add_argument("--max-tokens", type=int, default=8192, help="default per-token limit: tokens per request")
    p.add_argument("--max-concurrent", type=int, default=8, help="default per-token limit: requests in flight")
    p.add_argument(
        "--max-response-bytes", type=int, default=256 * 2**20, help="default per-token limit: bytes one answer returns"
    )
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="largest request body read (default 64 MiB)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default: 600)")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="how long to wait for requests to batch with")
    p.add_argument("--max-batch-rows", type=int, default=64, help="most prompts in one batched forward")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--pipeline-ranks",
        type=int,
        default=None,
        help="under torchrun: split the model over this many processes; rank 0 serves, the others follow",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.pipeline_ranks is None:
        raise ValueError(
            f"serve runs under torchrun ({world} processes) only to split a model over them: pass "
            f"--pipeline-ranks {world} (rank 0 serves, the others follow), or serve from one process"
        )
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serve needs the server packages: pip install 'transformer_hooks[serve]'") from None
    import torch

    from ..model import HookedTransformer
    from .server import Limits, Server, make_app, read_tokens

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens = read_tokens(args.tokens, Limits(args.max_tokens, args.max_concurrent, args.max_response_bytes))
    options: dict[str, Any] = {"dtype": args.dtype, "device": args.device}
    if args.device_map is not None:
        options["device_map"] = args.device_map
    if args.pipeline_ranks is not None:
        options["pipeline_ranks"] = args.pipeline_ranks
    load = HookedTransformer.from_pretrained_no_processing if args.no_processing else HookedTransformer.from_pretrained
    model = load(args.model, **options)
    model.eval()
    leader = None
    if args.pipeline_ranks is not None:
        import torch.distributed as dist

        from .pipeline import Leader, follow

        if dist.get_rank() != 0:
            follow(model)  # until rank 0 stops
            return 0
        leader = Leader(model.device)
    server = Server(
        model,
        tokens,
        max_body_bytes=args.max_body_bytes,
        timeout=args.timeout,
        batch_window=args.batch_window_ms / 1000,
        max_batch_rows=args.max_batch_rows,
        model_name=args.model,
        leader=leader,
    )
    print(f"serving {args.model} on http://{args.host}:{args.port} ({len(tokens.entries)} token(s))", flush=True)
    uvicorn.run(make_app(server), host=args.host, port=args.port, log_level="warning")
    return 0
