"""``sae-train``: train an SAE on a harvested dataset (streamed; resumable with
``--checkpoint-dir``; data-parallel under ``torchrun --nproc-per-node N``, ``--batch-size``
per rank)."""

from __future__ import annotations

import argparse

from ..sae.stream import DEFAULT_WINDOW
from ..sae.training import ARCHITECTURES_TRAINED, DECODERS, train_sae
from ..scale.dataset import ActivationDataset
from ..scale.process_group import init_distributed

NAME = "sae-train"
SUMMARY = "train an SAE on a harvested dataset, streamed and resumable (torchrun: data-parallel)"
EXAMPLE = (
    "python -m transformer_hooks sae-train --dataset acts/ --site blocks.3.hook_resid_post --d-sae 4096 "
    "--architecture topk --k 32 --out my_sae/"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``sae-train``'s options (``train_sae``'s, by their names) on the subcommand's parser ``p``."""
    p.add_argument("--dataset", required=True, help="a dataset directory written by harvest")
    p.add_argument("--site", default=None, help="the site to train on (default: the dataset's only site)")
    p.add_argument("--d-sae", type=int, required=True, help="number of features")
    p.add_argument("--architecture", choices=ARCHITECTURES_TRAINED, default="standard", help="the recipe")
    p.add_argument(
        "--k", type=int, default=None, help="active features per token, required by topk and batchtopk (default: none)"
    )
    p.add_argument("--out", required=True, help="the SAE directory written at the end (SAELens's layout)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument(
        "--batch-size", type=int, default=256, help="rows per step per rank (global batch: this x world size)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--l1-coefficient", type=float, default=1e-3, help="the L1 penalty (standard)")
    p.add_argument("--l0-coefficient", type=float, default=1e-3, help="the L0 penalty (jumprelu)")
    p.add_argument("--decoder", choices=DECODERS, default="norm_weighted", help="decoder rows' norms (standard)")
    p.add_argument("--l1-warm-up-steps", type=int, default=0, help="steps over which the L1/L0 penalty rises from 0")
    p.add_argument("--lr-warm-up-steps", type=int, default=0, help="steps over which the learning rate rises from 0")
    p.add_argument("--dead-window", type=int, default=50, help="steps without firing after which a feature is dead")
    p.add_argument(
        "--resample-every",
        type=int,
        default=None,
        help="resample dead features every this many steps, standard only (default: never)",
    )
    p.add_argument("--ghost-grads", action="store_true", help="ghost gradients for dead features (standard)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the initialisation and the row order")
    p.add_argument(
        "--shuffle-window", type=int, default=DEFAULT_WINDOW, help="rows of consecutive shards shuffled together"
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="checkpoint here; rerun the same command to resume (default: no checkpoints)",
    )
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-to-wandb", action="store_true", help="log to Weights & Biases (needs wandb)")
    p.add_argument("--wandb-project", default="transformer_hooks_sae", help="the wandb project")
    p.add_argument("--wandb-entity", default=None, help="the wandb entity (default: yours)")
    p.add_argument("--run-name", default=None, help="the wandb run's name (default: wandb's)")
    p.add_argument(
        "--tensorboard-dir",
        default=None,
        help="log to TensorBoard event files here, needs tensorboard (default: no TensorBoard)",
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between logged metrics")


def run(args: argparse.Namespace) -> int:
    """Train; under torchrun every rank runs this, rank 0 writes ``--out`` and prints the summary.
    ``args``: the parsed command line; returns the exit status."""
    import torch.distributed as dist

    rank, world = init_distributed()
    try:
        sae = train_sae(
            ActivationDataset(args.dataset),
            args.site,
            args.d_sae,
            args.architecture,
            k=args.k,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            l1_coefficient=args.l1_coefficient,
            l0_coefficient=args.l0_coefficient,
            decoder=args.decoder,
            l1_warm_up_steps=args.l1_warm_up_steps,
            lr_warm_up_steps=args.lr_warm_up_steps,
            dead_window=args.dead_window,
            resample_every=args.resample_every,
            ghost_grads=args.ghost_grads,
            seed=args.seed,
            shuffle_window=args.shuffle_window,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            log_to_wandb=args.log_to_wandb,
            wandb_project=args.wandb_project,
            wandb_entity=args.wandb_entity,
            run_name=args.run_name,
            tensorboard_dir=args.tensorboard_dir,
            log_every=args.log_every,
            save_to=args.out,
            progress=not args.quiet,
        )
        if rank == 0:
            log = sae.training_log
            print(
                f"{args.out}: {sae.cfg.architecture} SAE of {sae.cfg.d_sae} features on {sae.cfg.hook_name}; "
                f"{len(log)} steps of {args.batch_size * world} rows"
                + (f" over {world} processes" if world > 1 else "")
                + (f"; loss {log[0]:.4g} -> {log[-1]:.4g}" if log else "")
            )
        return 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
