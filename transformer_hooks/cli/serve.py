"""``serve``: serve a model over HTTP to many researchers (``transformer_hooks.remote``)."""

from __future__ import annotations

import argparse

from ..remote.command import cmd_serve

NAME = "serve"
SUMMARY = "serve a model over HTTP to many researchers (interventions as data, batched; needs the serve extra)"
EXAMPLE = "python -m transformer_hooks serve --model gpt2 --tokens tokens.txt --port 8000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``serve``'s options on the subcommand's parser ``p``."""
    p.add_argument("--model", required=True, help="preset, HF repo id, local directory or .gguf file")
    p.add_argument("--tokens", required=True, help="file of bearer tokens, one per line, with optional limits")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    p.add_argument(
        "--device-map", default=None, help="'auto' to spread the blocks over the devices (default: one device)"
    )
    p.add_argument("--no-processing", action="store_true", help="load the weights unprocessed (no fold_ln etc.)")
    p.add_argument("--max-tokens", type=int, default=8192, help="default per-token limit: tokens per request")
    p.add_argument("--max-concurrent", type=int, default=8, help="default per-token limit: requests in flight")
    p.add_argument(
        "--max-response-bytes", type=int, default=256 * 2**20, help="default per-token limit: bytes one answer returns"
    )
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="largest request body read")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="how long to wait for requests to batch with")
    p.add_argument("--max-batch-rows", type=int, default=64, help="most prompts in one batched forward")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument(
        "--pipeline-ranks",
        type=int,
        default=None,
        help="under torchrun: split the model over this many processes; rank 0 serves, the others follow "
        "(default: one process)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until stopped. ``args``: the parsed command line; returns the exit status."""
    return cmd_serve(args)
