"""Workflows at scale: several processes, many prompts, large models, activation datasets.

- ``process_group``: starting and checking a torch.distributed process group (low: no model).
- ``distributed``: data-parallel work over prompts (sweeps, caches, harvests) under ``torchrun``.
- ``plan``: the memory a model needs per device, before loading it (a dry run of loading's placement).
- ``corpus``, ``shards``, ``harvest``, ``dataset``: activation datasets (the corpus as
  contexts; shard and manifest files; the harvest to disk; reading it back).
- ``resume``: what a resumed run checks (the resume key) and the refusal naming what changed.

Import the module that defines a name (``transformer_hooks.scale.distributed``); this package
imports none of them, so importing one does not import the others.
"""
