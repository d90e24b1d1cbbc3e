"""Workflows at scale: several processes, many prompts, large models.

- ``process_group``: starting and checking a torch.distributed process group (low: no model).
- ``distributed``: data-parallel work over prompts (sweeps, caches, harvests) under ``torchrun``.

Import the module that defines a name (``transformer_hooks.scale.distributed``); this package
imports none of them, so importing one does not import the others.
"""
