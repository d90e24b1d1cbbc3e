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

_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_SMOLLM2_SIZES = {"135m": "135M", "360m": "360M", "1.7b": "1.7B"}

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
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    # SmolLM2 (Llama architecture); smollm2-135m-instruct is the embedded default model
    **{f"smollm2-{size}": f"HuggingFaceTB/SmolLM2-{hf}" for size, hf in _SMOLLM2_SIZES.items()},
    **{
        f"smollm2-{size}-instruct": f"HuggingFaceTB/SmolLM2-{hf}-Instruct"
        for size, hf in _SMOLLM2_SIZES.items()
    },
}

# "llama-3.2-1b" and "Llama-3.2-1B" (the repo id's last component) both name a checkpoint.
_REPO_BASENAMES: dict[str, str] = {
    repo_id.rsplit("/", 1)[-1].lower(): repo_id for repo_id in PRESETS.values()
}


def preset_repo_id(name: str) -> str | None:
    """The HF repo id for a preset name or a preset repo's last path component, else None."""
    key = name.strip().lower()
    return PRESETS.get(key) or _REPO_BASENAMES.get(key)


def closest_presets(name: str, n: int = 5) -> list[str]:
    """Up to `n` preset names that look like `name`, best first (for "did you mean" errors)."""
    return difflib.get_close_matches(name.strip().lower(), list(PRESETS), n=n, cutoff=0.5)
