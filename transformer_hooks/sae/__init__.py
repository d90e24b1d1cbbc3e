"""Sparse autoencoders (SAEs) on a hook site: load every common format, splice, steer, train, evaluate.

- ``core``: the ``SAE`` module (SAELens's architectures standard / gated / jumprelu / topk /
  batchtopk, its normalisations, hook_z SAEs over concatenated heads) and the files it
  reads: SAELens directories, Gemma Scope ``params.npz``, Llama Scope directories.
- ``formats``: the files: SAELens directories, Gemma Scope ``params.npz``, Llama Scope
  directories, read with every field checked.
- ``splice``: ``splice_sae`` (features cached as ``<site>.hook_sae_acts_post``),
  ``steer_with_feature``, ``check_sae_fits`` / ``check_sae_processing``, ``evaluate_sae``.
- ``training``: ``train_sae`` with the published recipes, on one process or data-parallel
  under ``torchrun``; ``checkpoint`` (its resumable checkpoints), ``stream`` (the rows of
  each batch, a dataset streamed shard by shard), ``data_parallel`` (the ranks' collective
  steps), ``tracking`` (wandb / TensorBoard).
- ``features``: a feature's top-activating contexts from a harvested dataset, as HTML.
"""

from .core import (
    ARCHITECTURES,
    NORMALIZATIONS,
    PROCESSING_STEPS,
    SAE,
    SAEConfig,
    load_gemma_scope,
    load_llama_scope,
    site_width,
)
from .features import FeatureContext, feature_contexts_html, top_activations
from .formats import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from .splice import (
    SAEEvaluation,
    check_sae_fits,
    check_sae_processing,
    evaluate_sae,
    feature_direction,
    sae_splice_hook,
    sites_changed_by,
    splice_sae,
    steer_with_feature,
)
from .training import train_sae

__all__ = [
    "ARCHITECTURES",
    "NORMALIZATIONS",
    "PROCESSING_STEPS",
    "SAE",
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SAEConfig",
    "SAEEvaluation",
    "check_sae_fits",
    "check_sae_processing",
    "evaluate_sae",
    "feature_direction",
    "load_gemma_scope",
    "load_llama_scope",
    "sae_splice_hook",
    "site_width",
    "sites_changed_by",
    "splice_sae",
    "steer_with_feature",
    "train_sae",
    "FeatureContext",
    "feature_contexts_html",
    "top_activations",
]
