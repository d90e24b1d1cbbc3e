"""Logging SAE training to an experiment tracker: Weights & Biases (``log_to_wandb=True``,
``wandb_project``, ``wandb_entity``, ``run_name``, as SAELens names them) or TensorBoard
(``tensorboard_dir``: a ``torch.utils.tensorboard.SummaryWriter`` writing there). Off by
default; under ``torchrun`` only rank 0 logs. Asked for and not installed: an ImportError
that says what to install, before training starts.

Every ``log_every`` steps (and at the last) the metrics of the whole global batch, by
SAELens's names: ``losses/overall_loss``, ``losses/mse_loss``, ``metrics/l0`` (mean active
features a row), ``sparsity/dead_features`` (count), ``details/current_learning_rate`` and
``details/n_training_tokens`` (rows trained on so far).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def _require(module: str, flag: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{flag} needs the {package!r} package, which is not installed ({e}): pip install {package}, "
            f"or train without {flag}"
        ) from None


class Tracker:
    """The trackers asked for (none by default); ``log`` and ``close`` do nothing without one.

    Args:
        log_to_wandb: log to Weights & Biases (SAELens's name).
        wandb_project: its project.
        wandb_entity: its entity (user or team).
        run_name: the run's name.
        tensorboard_dir: log to TensorBoard (a ``SummaryWriter``) in this directory.
        config: the run's settings, recorded by wandb.
        active: start the runs (rank 0); other ranks only check the packages.
    """

    def __init__(
        self,
        *,
        log_to_wandb: bool = False,
        wandb_project: str = "transformer_hooks_sae",
        wandb_entity: str | None = None,
        run_name: str | None = None,
        tensorboard_dir: str | Path | None = None,
        config: dict[str, Any] | None = None,
        active: bool = True,
    ) -> None:
        """Import what is asked for (on every rank: a missing package fails them all alike);
        start the runs only if ``active`` (rank 0)."""
        self.wandb: Any = None
        self.writer: Any = None
        wandb = _require("wandb", "log_to_wandb=True", "wandb") if log_to_wandb else None
        board = (
            _require("torch.utils.tensorboard", "tensorboard_dir=...", "tensorboard")
            if tensorboard_dir is not None
            else None
        )
        if not active:
            return
        if wandb is not None:
            wandb.init(project=wandb_project, entity=wandb_entity, name=run_name, config=config)
            self.wandb = wandb
        if board is not None:
            self.writer = board.SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` (name -> value) at training step ``step`` to every tracker."""
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        """Finish the wandb run and close the TensorBoard writer."""
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.close()
