"""GGUF files (llama.cpp's format), read and dequantized by transformers' GGUF utilities
and the ``gguf`` package; the tensors come out under HF names (with llama.cpp's q/k row
permutation undone), so the family converters take them from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch


def read_gguf(path: Path) -> tuple[dict, Callable[[str], torch.Tensor], Callable[[], Any]]:
    """(HF config dict, tensor source by HF name, tokenizer factory) for a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from transformer_hooks.loading import CorruptCheckpointError, TensorSource

    try:
        meta = load_gguf_checkpoint(str(path))
        hf_config = dict(meta["config"])
        # transformers maps GGUF tensor names by walking an HF model of this config; on the
        # meta device it costs no memory.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CorruptCheckpointError(f"cannot read GGUF file {path}: {e}") from e
    source = TensorSource({k: (lambda t=t: t) for k, t in tensors.items()}, str(path))

    def tokenizer() -> Any:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.add_bos_token = bool(meta.get("tokenizer_config", {}).get("add_bos_token", True))
        return tok

    return hf_config, source, tokenizer
