"""Qwen 2 / 2.5: Llama's layout with biases on q, k and v (not on o), and optional
sliding-window attention on the upper layers.

Quirks read from the config: ``use_sliding_window``, ``sliding_window`` and
``max_window_layers`` (layers ``>= max_window_layers`` are windowed), or transformers 5's
``layer_types``; ``tie_word_embeddings`` (the small models tie, the large ones do not);
Llama's GQA and rotary settings.
"""

from __future__ import annotations

from transformer_hooks.config import ModelConfig

from . import llama
from .common import layer_windows
from .llama import convert_block, convert_embeddings, convert_final  # noqa: F401  (biases read when present)

MODEL_TYPES = ("qwen2",)


def qwen_windows(hf: dict) -> tuple[int | None, ...]:
    """The per-layer windows of the HF config ``hf``, as HF reads them: no window at all unless
    ``use_sliding_window``; then layers from ``max_window_layers`` up."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    n_layers, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
    implied = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)]
    return layer_windows({**hf, "sliding_window": window}, implied)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of an HF config dict ``hf`` of this family (its quirks as ``ModelConfig`` fields)."""
    return llama.config_from_hf(hf).replace(
        attn_windows=qwen_windows(hf),
        n_ctx=hf.get("max_position_embeddings", 32768),
        original_architecture="Qwen2ForCausalLM",
        default_prepend_bos=False,  # TransformerLens 3.9's default for this architecture
    )
