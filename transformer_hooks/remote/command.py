"""The ``serve`` command's work (its options are in ``cli/serve.py``): load a model and serve it
(``server.py``) with uvicorn.

    python -m transformer_hooks serve --model PATH --tokens tokens.txt [--host 127.0.0.1] [--port 8000]
    torchrun --nproc-per-node 2 -m transformer_hooks serve --pipeline-ranks 2 --model PATH --tokens tokens.txt

The server's packages (starlette, uvicorn) are imported only when the command runs, so the
rest of the command line works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["cmd_serve"]


def cmd_serve(args: argparse.Namespace) -> int:
    """The ``serve`` command: load ``args.model`` and serve it over HTTP until stopped.

    Args:
        args: the parsed ``serve`` options (model, tokens file, limits, host, port, placement).

    Returns:
        The exit status (0). Under torchrun with ``--pipeline-ranks``, ranks other than 0 follow
        rank 0's forwards and return when it stops.
    """
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
