"""``harvest``: store sites' activations over a corpus as a dataset directory (resumable;
data-parallel under ``torchrun --nproc-per-node N``, the N ranks sharing the corpus)."""

from __future__ import annotations

import argparse
import datetime

from ..scale.harvest import harvest
from ..scale.process_group import DEFAULT_TIMEOUT, barrier, init_distributed, local_device
from ..scale.shards import DTYPES
from .common import add_model_arguments, load_from_args

NAME = "harvest"
SUMMARY = "store sites' activations over a corpus (resumable; data-parallel under torchrun)"
EXAMPLE = "python -m transformer_hooks harvest --data corpus.txt --sites blocks.3.hook_resid_post --out acts/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``harvest``'s options on the subcommand's parser ``p``."""
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="a text file (documents separated by blank lines) or .jsonl file")
    p.add_argument("--text-key", default="text", help="the field holding the text in a .jsonl file")
    p.add_argument("--sites", nargs="+", required=True, help="hook names or globs, e.g. blocks.3.hook_resid_post")
    p.add_argument("--out", required=True, help="the dataset directory (rerun with the same arguments to resume)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (BOS included)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--positions", choices=["all", "last"], default="all", help="which positions to store")
    p.add_argument("--keep-bos", action="store_true", help="keep BOS tokens' activations (left out by default)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored activations")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens of context per shard")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="harvest exactly this many tokens of contexts, the last context cut short (default: the whole corpus)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        help="under torchrun: seconds a rank that finished waits for the others before failing",
    )


def run(args: argparse.Namespace) -> int:
    """Harvest; under torchrun every rank runs this and rank 0 prints the summary. ``args``: the parsed command line;
    returns the exit status.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=args.timeout)
    rank, world = init_distributed(timeout=timeout)
    try:
        model = load_from_args(args, device=args.device if args.device or world == 1 else local_device())
        ds = harvest(
            model,
            args.data,
            args.sites,
            args.out,
            context_size=args.context_size,
            batch_size=args.batch_size,
            positions=args.positions,
            exclude_bos=not args.keep_bos,
            dtype=args.dtype,
            shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens,
            text_key=args.text_key,
            timeout=timeout,
        )
        if rank == 0 and ds is not None:  # (a split model: None on the other ranks)
            print(
                f"{ds.path}: {len(ds)} rows of {', '.join(ds.sites)} from {ds.manifest['n_tokens']} tokens in "
                f"{len(ds.manifest['shards'])} shard(s)" + (f" over {world} processes" if world > 1 else "")
            )
        if world > 1:
            barrier(timeout)  # no rank tears the group down while another still uses it
        return 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
