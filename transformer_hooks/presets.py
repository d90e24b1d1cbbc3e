"""Named checkpoints: TransformerLens-style short names -> Hugging Face repo ids.

Users coming from TransformerLens type `from_pretrained("gpt2")` or `"pythia-70m"`; this
table keeps those names working. It is a convenience, not an allow-list: any HF repo id
or local directory of a supported family loads too (see `resolution.py`).

Lookup is case-insensitive, and the last component of a repo id ("Llama-3.2-1B",
"SmolLM2-135M-Instruct") is accepted as a name as well, since that is what people copy
from the hub page.
"""

from __future__ import annotations

import difflib
from typing import Any

_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_SMOLLM2_SIZES = {"135m": "135M", "360m": "360M", "1.7b": "1.7B"}
_QWEN2_SIZES = {"0.5b": "0.5B", "1.5b": "1.5B", "7b": "7B"}
_QWEN25_SIZES = {"0.5b": "0.5B", "1.5b": "1.5B", "3b": "3B", "7b": "7B", "14b": "14B"}
_QWEN3_SIZES = {"0.6b": "0.6B", "1.7b": "1.7B", "4b": "4B", "8b": "8B", "14b": "14B"}

PRESETS: dict[str, str] = {
    # GPT-2
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    # GPT-Neo (the size aliases are TransformerLens's)
    "gpt-neo-125m": "EleutherAI/gpt-neo-125M",
    "gpt-neo-small": "EleutherAI/gpt-neo-125M",
    "gpt-neo-1.3b": "EleutherAI/gpt-neo-1.3B",
    "gpt-neo-medium": "EleutherAI/gpt-neo-1.3B",
    "gpt-neo-2.7b": "EleutherAI/gpt-neo-2.7B",
    "gpt-neo-large": "EleutherAI/gpt-neo-2.7B",
    # Pythia (GPT-NeoX), standard and deduplicated-data runs
    **{f"pythia-{size}": f"EleutherAI/pythia-{size}" for size in _PYTHIA_SIZES},
    **{f"pythia-{size}-deduped": f"EleutherAI/pythia-{size}-deduped" for size in _PYTHIA_SIZES},
    # Llama 2
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    # Llama 3.1 / 3.2
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    # SmolLM2 (Llama architecture); smollm2-135m-instruct is the embedded default model
    **{f"smollm2-{size}": f"HuggingFaceTB/SmolLM2-{hf}" for size, hf in _SMOLLM2_SIZES.items()},
    **{f"smollm2-{size}-instruct": f"HuggingFaceTB/SmolLM2-{hf}-Instruct" for size, hf in _SMOLLM2_SIZES.items()},
    # Mistral
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-nemo-base-2407": "mistralai/Mistral-Nemo-Base-2407",
    # Qwen 2 / 2.5 / 3 (base and instruct; Qwen 3's unsuffixed repos are the post-trained ones)
    **{f"qwen2-{size}": f"Qwen/Qwen2-{hf}" for size, hf in _QWEN2_SIZES.items()},
    **{f"qwen2-{size}-instruct": f"Qwen/Qwen2-{hf}-Instruct" for size, hf in _QWEN2_SIZES.items()},
    **{f"qwen2.5-{size}": f"Qwen/Qwen2.5-{hf}" for size, hf in _QWEN25_SIZES.items()},
    **{f"qwen2.5-{size}-instruct": f"Qwen/Qwen2.5-{hf}-Instruct" for size, hf in _QWEN25_SIZES.items()},
    **{f"qwen3-{size}": f"Qwen/Qwen3-{hf}" for size, hf in _QWEN3_SIZES.items()},
    **{f"qwen3-{size}-base": f"Qwen/Qwen3-{hf}-Base" for size, hf in _QWEN3_SIZES.items()},
    # Gemma 1 / 2 / 3 (Gemma 3 4B and up are multimodal: their language model loads)
    **{f"gemma-{size}{it}": f"google/gemma-{size}{it}" for size in ("2b", "7b") for it in ("", "-it")},
    **{f"gemma-2-{size}{it}": f"google/gemma-2-{size}{it}" for size in ("2b", "9b", "27b") for it in ("", "-it")},
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
    "gemma-3-1b-pt": "google/gemma-3-1b-pt",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    **{
        f"gemma-3-{size}-{kind}": f"google/gemma-3-{size}-{kind}"
        for size in ("4b", "12b", "27b")
        for kind in ("pt", "it")
    },
    # OLMo 2
    "olmo-2-1b": "allenai/OLMo-2-0425-1B",
    "olmo-2-1b-instruct": "allenai/OLMo-2-0425-1B-Instruct",
    "olmo-2-7b": "allenai/OLMo-2-1124-7B",
    "olmo-2-7b-instruct": "allenai/OLMo-2-1124-7B-Instruct",
    "olmo-2-13b": "allenai/OLMo-2-1124-13B",
    "olmo-2-13b-instruct": "allenai/OLMo-2-1124-13B-Instruct",
}

# TransformerLens's toy models (its own format: config.json in HookedTransformerConfig's keys and a
# .pth state dict). They load from a local directory (weights_conversion/transformer_lens.py); the
# names are known so that an error can say where their files go.
_TL_WIDTHS = {1: 512, 2: 512, 3: 512, 4: 512, 6: 768, 8: 1024, 10: 1280, 12: 1536}
TRANSFORMER_LENS_TOY_MODELS: dict[str, str] = {
    **{f"attn-only-{n}l": f"NeelNanda/Attn_Only_{n}L512W_C4_Code" for n in (1, 2, 3, 4)},
    **{f"gelu-{n}l": f"NeelNanda/GELU_{n}L512W_C4_Code" for n in (1, 2, 3, 4)},
    **{f"solu-{n}l": f"NeelNanda/SoLU_{n}L{w}W_C4_Code" for n, w in _TL_WIDTHS.items()},
    "attn-only-2l-demo": "NeelNanda/Attn-Only-2L512W-Shortformer-6B-big-lr",
    "redwood_attn_2l": "ArthurConmy/redwood_attn_2l",
}

# "llama-3.2-1b" and "Llama-3.2-1B" (the repo id's last component) both name a checkpoint.
_REPO_BASENAMES: dict[str, str] = {repo_id.rsplit("/", 1)[-1].lower(): repo_id for repo_id in PRESETS.values()}


def preset_repo_id(name: str) -> str | None:
    """The HF repo id for a preset name or a preset repo's last path component, else None."""
    key = name.strip().lower()
    return PRESETS.get(key) or _REPO_BASENAMES.get(key)


def closest_presets(name: str, n: int = 5) -> list[str]:
    """Up to `n` preset names that look like `name`, best first (for "did you mean" errors)."""
    return difflib.get_close_matches(name.strip().lower(), list(PRESETS), n=n, cutoff=0.5)


# Published configs (each model's config.json on the hub, as HF dicts), so a plan for
# them needs no download. Parameter counts their model cards give: GPT-2 124M,
# Pythia-2.8B 2.78e9, Llama-3.2-1B 1.24e9, Llama-3.1-8B 8.03e9, Llama-3.1-70B 70.6e9.
_LLAMA3 = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
    attention_bias=False,
    mlp_bias=False,
)
_LLAMA31_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        model_type="gpt2",
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
        n_ctx=1024,
        vocab_size=50257,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    ),
    "pythia-2.8b": dict(
        model_type="gpt_neox",
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=10240,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling=dict(_LLAMA31_ROPE, factor=32.0),
    ),
    "llama-3.1-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "llama-3.1-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling=_LLAMA31_ROPE,
    ),
}
# GPT-2 and Pythia at their other published sizes: the configs above with other widths, depths
# and (Pythia 6.9B, 12B) vocabulary paddings; each model's parameter count is checked against
# its name in tests/test_plan.py. The deduplicated-data Pythia runs share their architecture.
_GPT2_SIZES = {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
PUBLISHED_CONFIGS.update(
    {name: dict(PUBLISHED_CONFIGS["gpt2"], n_embd=d, n_layer=n, n_head=h) for name, (d, n, h) in _GPT2_SIZES.items()}
)
_PYTHIA_SHAPES = {  # (hidden_size, num_hidden_layers, num_attention_heads, vocab_size)
    "14m": (128, 6, 4, 50304),
    "31m": (256, 6, 8, 50304),
    "70m": (512, 6, 8, 50304),
    "160m": (768, 12, 12, 50304),
    "410m": (1024, 24, 16, 50304),
    "1b": (2048, 16, 8, 50304),
    "1.4b": (2048, 24, 16, 50304),
    "6.9b": (4096, 32, 32, 50432),
    "12b": (5120, 36, 40, 50688),
}
PUBLISHED_CONFIGS.update(
    {
        f"pythia-{size}{deduped}": dict(
            PUBLISHED_CONFIGS["pythia-2.8b"],
            hidden_size=d,
            num_hidden_layers=n,
            num_attention_heads=h,
            intermediate_size=4 * d,
            vocab_size=v,
        )
        for size, (d, n, h, v) in _PYTHIA_SHAPES.items()
        for deduped in ("", "-deduped")
    }
)
PUBLISHED_CONFIGS["pythia-2.8b-deduped"] = PUBLISHED_CONFIGS["pythia-2.8b"]

# SmolLM2 (Llama architecture; 135M checked against the embedded GGUF's metadata in tests/test_plan.py).
_SMOLLM2 = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    vocab_size=49152,
    bos_token_id=1,
    eos_token_id=2,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
)
_SMOLLM2_SHAPES = {  # (hidden_size, intermediate_size, layers, heads, kv heads, rope_theta)
    "135m": (576, 1536, 30, 9, 3, 100000.0),
    "360m": (960, 2560, 32, 15, 5, 100000.0),
    "1.7b": (2048, 8192, 24, 32, 32, 130000.0),
}
PUBLISHED_CONFIGS.update(
    {
        f"smollm2-{size}{instruct}": dict(
            _SMOLLM2,
            hidden_size=d,
            intermediate_size=m,
            num_hidden_layers=n,
            num_attention_heads=h,
            num_key_value_heads=kv,
            rope_theta=theta,
        )
        for size, (d, m, n, h, kv, theta) in _SMOLLM2_SHAPES.items()
        for instruct in ("", "-instruct")
    }
)

# The other presets' configs: each family's shared keys, then each size's shape. Parameter counts
# are checked against the model cards' figures in tests/test_plan.py.
_GPT_NEO = dict(
    model_type="gpt_neo",
    vocab_size=50257,
    max_position_embeddings=2048,
    window_size=256,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
    tie_word_embeddings=True,
)
for _size, (_d, _n, _h) in {"125m": (768, 12, 12), "1.3b": (2048, 24, 16), "2.7b": (2560, 32, 20)}.items():
    PUBLISHED_CONFIGS[f"gpt-neo-{_size}"] = dict(
        _GPT_NEO, hidden_size=_d, num_layers=_n, num_heads=_h, attention_types=[[["global", "local"], _n // 2]]
    )
_LLAMA2 = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    vocab_size=32000,
    bos_token_id=1,
    eos_token_id=2,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)
for _size, (_d, _m, _n) in {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40)}.items():
    for _chat in ("", "-chat"):
        PUBLISHED_CONFIGS[f"llama-2-{_size}{_chat}"] = dict(
            _LLAMA2,
            hidden_size=_d,
            intermediate_size=_m,
            num_hidden_layers=_n,
            num_attention_heads=_n,
            num_key_value_heads=_n,
        )
_LLAMA3_INSTRUCT_EOS = [128001, 128008, 128009]
for _base in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b"):
    PUBLISHED_CONFIGS[f"{_base}-instruct"] = dict(PUBLISHED_CONFIGS[_base], eos_token_id=_LLAMA3_INSTRUCT_EOS)
PUBLISHED_CONFIGS["llama-3.2-3b"] = dict(
    PUBLISHED_CONFIGS["llama-3.2-1b"], hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128
)
PUBLISHED_CONFIGS["llama-3.2-3b-instruct"] = dict(PUBLISHED_CONFIGS["llama-3.2-3b"], eos_token_id=_LLAMA3_INSTRUCT_EOS)
_MISTRAL = dict(
    model_type="mistral",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
PUBLISHED_CONFIGS["mistral-7b"] = dict(_MISTRAL, vocab_size=32000, rope_theta=10000.0, sliding_window=4096)
PUBLISHED_CONFIGS["mistral-7b-instruct"] = PUBLISHED_CONFIGS["mistral-7b"]
PUBLISHED_CONFIGS["mistral-7b-v0.3"] = dict(_MISTRAL, vocab_size=32768, rope_theta=1e6, sliding_window=None)
PUBLISHED_CONFIGS["mistral-7b-instruct-v0.3"] = PUBLISHED_CONFIGS["mistral-7b-v0.3"]
PUBLISHED_CONFIGS["mistral-nemo-base-2407"] = dict(
    _MISTRAL,
    hidden_size=5120,
    num_hidden_layers=40,
    head_dim=128,
    vocab_size=131072,
    max_position_embeddings=128000,
    rope_theta=1e6,
    sliding_window=None,
)
_QWEN = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151643,
    use_sliding_window=False,
)
_QWEN2_SHAPES = {  # (hidden_size, intermediate_size, layers, heads, kv heads)
    "0.5b": (896, 4864, 24, 14, 2),
    "1.5b": (1536, 8960, 28, 12, 2),
    "3b": (2048, 11008, 36, 16, 2),
    "7b": (3584, 18944, 28, 28, 4),
    "14b": (5120, 13824, 48, 40, 8),
}
for _family, _sizes in (("qwen2", _QWEN2_SIZES), ("qwen2.5", _QWEN25_SIZES)):
    for _size in _sizes:
        _d, _m, _n, _h, _kv = _QWEN2_SHAPES[_size]
        _big = _size in ("7b", "14b")  # untied, with a padded vocabulary
        for _instruct in ("", "-instruct"):
            PUBLISHED_CONFIGS[f"{_family}-{_size}{_instruct}"] = dict(
                _QWEN,
                model_type="qwen2",
                hidden_size=_d,
                intermediate_size=_m,
                num_hidden_layers=_n,
                num_attention_heads=_h,
                num_key_value_heads=_kv,
                vocab_size=152064 if _big else 151936,
                tie_word_embeddings=not _big,
                eos_token_id=151645 if _instruct else 151643,
            )
_QWEN3_SHAPES = {  # (hidden_size, intermediate_size, layers, heads, kv heads); head_dim 128
    "0.6b": (1024, 3072, 28, 16, 8),
    "1.7b": (2048, 6144, 28, 16, 8),
    "4b": (2560, 9728, 36, 32, 8),
    "8b": (4096, 12288, 36, 32, 8),
    "14b": (5120, 17408, 40, 40, 8),
}
for _size, (_d, _m, _n, _h, _kv) in _QWEN3_SHAPES.items():
    for _base in ("", "-base"):  # the unsuffixed repos are the post-trained models
        PUBLISHED_CONFIGS[f"qwen3-{_size}{_base}"] = dict(
            _QWEN,
            model_type="qwen3",
            hidden_size=_d,
            intermediate_size=_m,
            num_hidden_layers=_n,
            num_attention_heads=_h,
            num_key_value_heads=_kv,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=32768 if _base else 40960,
            attention_bias=False,
            tie_word_embeddings=_size in ("0.6b", "1.7b", "4b"),
            eos_token_id=151643 if _base else 151645,
        )
_GEMMA = dict(
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=8192,
    vocab_size=256000,
    head_dim=256,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=True,
)
_GEMMA_SHAPES = {  # (model_type, hidden_size, intermediate_size, layers, heads, kv heads, head_dim)
    "gemma-2b": ("gemma", 2048, 16384, 18, 8, 1, 256),
    "gemma-7b": ("gemma", 3072, 24576, 28, 16, 16, 256),
    "gemma-2-2b": ("gemma2", 2304, 9216, 26, 8, 4, 256),
    "gemma-2-9b": ("gemma2", 3584, 14336, 42, 16, 8, 256),
    "gemma-2-27b": ("gemma2", 4608, 36864, 46, 32, 16, 128),
}
for _name, (_type, _d, _m, _n, _h, _kv, _dh) in _GEMMA_SHAPES.items():
    _later = dict(
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=144 if _name == "gemma-2-27b" else 256,
    )
    for _it in ("", "-it"):
        PUBLISHED_CONFIGS[_name + _it] = dict(
            _GEMMA,
            **(_later if _type == "gemma2" else {}),
            model_type=_type,
            hidden_size=_d,
            intermediate_size=_m,
            num_hidden_layers=_n,
            num_attention_heads=_h,
            num_key_value_heads=_kv,
            head_dim=_dh,
        )
_GEMMA3 = dict(
    _GEMMA,
    model_type="gemma3_text",
    vocab_size=262144,
    rope_theta=1e6,
    rope_local_base_freq=10000.0,
    sliding_window=512,
    sliding_window_pattern=6,
    query_pre_attn_scalar=256,
    max_position_embeddings=32768,
)
for _name, (_d, _m, _n) in {"gemma-3-270m": (640, 2048, 18), "gemma-3-1b": (1152, 6912, 26)}.items():
    for _kind in ("", "-it") if _name.endswith("270m") else ("-pt", "-it"):
        PUBLISHED_CONFIGS[_name + _kind] = dict(
            _GEMMA3,
            hidden_size=_d,
            intermediate_size=_m,
            num_hidden_layers=_n,
            num_attention_heads=4,
            num_key_value_heads=1,
        )
_SIGLIP_SO400M = dict(  # Gemma 3's vision tower (the checkpoints carry it; plan counts it among their parameters)
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)
_GEMMA3_MULTIMODAL = {  # text_config: (hidden_size, intermediate_size, layers, heads, kv heads, head_dim)
    "4b": (2560, 10240, 34, 8, 4, 256),
    "12b": (3840, 15360, 48, 16, 8, 256),
    "27b": (5376, 21504, 62, 32, 16, 128),
}
for _size, (_d, _m, _n, _h, _kv, _dh) in _GEMMA3_MULTIMODAL.items():
    for _kind in ("-pt", "-it"):  # multimodal: this library loads the language model (text_config)
        PUBLISHED_CONFIGS[f"gemma-3-{_size}{_kind}"] = dict(
            model_type="gemma3",
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
            mm_tokens_per_image=256,
            vision_config=_SIGLIP_SO400M,
            text_config=dict(
                model_type="gemma3_text",
                hidden_size=_d,
                intermediate_size=_m,
                num_hidden_layers=_n,
                num_attention_heads=_h,
                num_key_value_heads=_kv,
                head_dim=_dh,
                query_pre_attn_scalar=168 if _size == "27b" else 256,
                sliding_window=1024,
                rope_scaling={"rope_type": "linear", "factor": 8.0},
                vocab_size=262208,
            ),
        )
_OLMO2 = dict(
    model_type="olmo2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    max_position_embeddings=4096,
    vocab_size=100352,
    eos_token_id=100257,
    pad_token_id=100277,
    attention_bias=False,
    tie_word_embeddings=False,
)
for _size, (_d, _m, _n) in {"1b": (2048, 8192, 16), "7b": (4096, 11008, 32), "13b": (5120, 13824, 40)}.items():
    for _instruct in ("", "-instruct"):
        PUBLISHED_CONFIGS[f"olmo-2-{_size}{_instruct}"] = dict(
            _OLMO2,
            hidden_size=_d,
            intermediate_size=_m,
            num_hidden_layers=_n,
            num_attention_heads=_n,
            num_key_value_heads=_n,
        )

# Repo ids Meta published these models under before renaming them.
_OLD_REPO_IDS = {
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
}


def published_config(name: str) -> dict[str, Any] | None:
    """The published HF config (a copy) of a preset name, its repo id or the repo's last
    component, if this table has it; else None."""
    key = name.strip().lower()
    if key in PUBLISHED_CONFIGS:
        return dict(PUBLISHED_CONFIGS[key])
    repo_id = (preset_repo_id(key) or key).lower()
    for preset, published in PUBLISHED_CONFIGS.items():
        if (PRESETS.get(preset) or "").lower() == repo_id:
            return dict(published)
    old = _OLD_REPO_IDS.get(key)
    return dict(PUBLISHED_CONFIGS[old]) if old is not None else None
