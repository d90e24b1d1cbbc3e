"""Tiny random HF checkpoints, built from configs and saved locally (no network).

Weights are scaled up from HF's 0.02-std init so logits are of order one: a parity
tolerance on near-zero logits would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 101

# name -> (config class, kwargs). Together these turn on every quirk the converters read.
CONFIGS: dict[str, tuple[type, dict]] = {
    "gpt2": (GPT2Config, dict(n_embd=48, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied-inverse-layer": (
        GPT2Config,
        dict(
            n_embd=48,
            n_layer=3,
            n_head=3,
            n_positions=64,
            n_inner=80,
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
            activation_function="gelu",
        ),
    ),
    "gpt2-unscaled": (
        GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, scale_attn_weights=False, activation_function="relu"),
    ),
    "gpt-neo-local": (
        GPTNeoConfig,
        dict(
            hidden_size=48,
            num_layers=4,
            num_heads=4,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 2]],
            window_size=5,
        ),
    ),
    "gpt-neo-untied": (
        GPTNeoConfig,
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=64,
            attention_types=[[["local", "global"], 1]],
            window_size=3,
            intermediate_size=72,
            tie_word_embeddings=False,
        ),
    ),
    "pythia": (
        GPTNeoXConfig,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            rotary_pct=0.25,
            rotary_emb_base=10000,
        ),
    ),
    "neox-sequential-full-rotary": (
        GPTNeoXConfig,
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=64,
            max_position_embeddings=64,
            use_parallel_residual=False,
            rotary_pct=1.0,
            rotary_emb_base=500.0,
            tie_word_embeddings=True,
        ),
    ),
    "neox-linear-rope": (
        GPTNeoXConfig,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            rotary_pct=0.5,
            rope_scaling={"type": "linear", "factor": 2.0},
        ),
    ),
    "llama-gqa": (
        LlamaConfig,
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=80,
            max_position_embeddings=128,
        ),
    ),
    "llama-head-dim-bias": (
        LlamaConfig,
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            intermediate_size=64,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500.0,
            tie_word_embeddings=True,
        ),
    ),
    "llama3-rope-scaling": (
        LlamaConfig,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=96,
            max_position_embeddings=256,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
}

# The newer families (tests/test_families.py), each turning on every quirk its converter
# reads; windows are shorter than the test sequences, so that they matter.
WINDOW = 5
_SMALL = dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, max_position_embeddings=128)

FAMILY_CONFIGS: dict[str, tuple[type, dict]] = {
    "mistral": (
        MistralConfig,
        dict(_SMALL, num_attention_heads=6, num_key_value_heads=2, sliding_window=WINDOW, rope_theta=1000.0),
    ),
    "qwen2-windowed-untied": (
        Qwen2Config,
        dict(
            _SMALL,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        ),
    ),
    "qwen2-tied": (Qwen2Config, dict(_SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3": (
        Qwen3Config,
        dict(
            _SMALL,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "gemma": (GemmaConfig, dict(_SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_act="gelu")),
    "gemma2": (
        Gemma2Config,
        dict(
            _SMALL,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        dict(
            _SMALL,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            sliding_window_pattern=2,
            final_logit_softcapping=6.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        ),
    ),
    "olmo2": (
        Olmo2Config,
        dict(
            _SMALL,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
}

FAMILY_OF = {"gpt2": "gpt2", "gpt-neo": "gpt_neo", "pythia": "gpt_neox", "neox": "gpt_neox", "llama": "llama"}


def make_hf_model(name: str, seed: int = 0, scale: float = 8.0, **overrides):
    cls, kwargs = {**CONFIGS, **FAMILY_CONFIGS}[name]
    config = cls(vocab_size=VOCAB, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    return scale_weights(AutoModelForCausalLM.from_config(config), scale)


def scale_weights(model: torch.nn.Module, scale: float = 8.0) -> torch.nn.Module:
    """Matrices x scale, biases ~ N(0, 0.3), norm weights ~ 1 + N(0, 0.3); eval mode."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(scale)
            elif pname.endswith("bias"):
                p.normal_(0, 0.3)
            else:  # norm weights: around one, not all equal
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def save_checkpoint(name: str, directory: Path, seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    model = make_hf_model(name, seed, **overrides)
    path = Path(directory) / name
    model.save_pretrained(path)
    return path, model
