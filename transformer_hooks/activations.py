"""Old import path: activation datasets live in ``transformer_hooks.scale`` (harvest.py,
dataset.py, corpus.py, shards.py)."""

from .scale.dataset import ActivationDataset
from .scale.harvest import add_harvest_arguments, harvest, run_harvest
from .scale.shards import DTYPES, FORMAT, MANIFEST

__all__ = ["DTYPES", "FORMAT", "MANIFEST", "ActivationDataset", "add_harvest_arguments", "harvest", "run_harvest"]
