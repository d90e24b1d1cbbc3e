"""The converted-checkpoint format: written by ``python -m weights_conversion``, read by
``transformer_hooks.loading``. A directory holding:

- ``model.safetensors``: canonical tensors under the model's parameter names
  (``blocks.0.attn.W_Q`` [head, d_model, d_head], ...), contiguous; a tied unembedding
  is stored only if processing made it differ from ``W_E.T``;
- ``transformer_hooks_config.json``: ``{"format_version": 1, "model_config": ...,
  "source": ..., "bos_rule": 1}``; the ModelConfig's ``processing`` says which weight
  processing the tensors have, its ``default_prepend_bos`` what the BOS rule decided for the
  source's tokenizer (``bos_rule``);
- the tokenizer's files (``tokenizer.save_pretrained``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from transformer_hooks.config import ModelConfig

from .groups import Group, load_order
from .sources import TensorSource, write_safetensors

CONVERTED_CONFIG = "transformer_hooks_config.json"
CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_FORMAT_VERSION = 1
# ``"bos_rule": 1`` in the metadata: the stored ``default_prepend_bos`` is the BOS rule's answer
# for the source's own tokenizer (transformer_hooks.tokens.default_prepend_bos), kept as is on
# load (a GGUF source's tokenizer, saved as HF files, need not say the same); files without it
# were converted under the older architecture table and are decided again from their tokenizer.
BOS_RULE_VERSION = 1


def canonical_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's parameters by name; a tied ``unembed.W_U`` only if it differs from ``W_E.T``."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    if model.cfg.tie_word_embeddings and torch.equal(tensors["unembed.W_U"], tensors["embed.W_E"].T):
        del tensors["unembed.W_U"]  # the loader ties it again
    return tensors


def write_converted(
    directory: Path,
    model: Any,
    source: Any = None,
    write_tensors: Callable[[Path, dict[str, torch.Tensor]], None] = write_safetensors,
) -> None:
    """Write ``model`` (a ``HookedTransformer``) into the existing, empty ``directory``: its
    tensors (with ``write_tensors``), its config and ``source`` (what it was loaded from), its tokenizer."""
    write_tensors(directory / CONVERTED_WEIGHTS, canonical_tensors(model))
    config = {
        "format_version": CONVERTED_FORMAT_VERSION,
        "model_config": model.cfg.to_dict(),
        "source": source,
        "bos_rule": BOS_RULE_VERSION,
    }
    (directory / CONVERTED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))


def converted_config(directory: Path, meta: dict) -> ModelConfig:
    """The ModelConfig in a converted checkpoint's metadata ``meta``, if this format version reads it.
    Missing or malformed metadata is a ``ValueError`` naming the file (in ``directory``) and the field."""
    where = Path(directory) / CONVERTED_CONFIG
    if not isinstance(meta, dict):
        raise ValueError(f"{where} should hold a JSON object, found {type(meta).__name__}. Convert the model again.")
    if meta.get("format_version") != CONVERTED_FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {meta.get('format_version')!r}; "
            f"this transformer_hooks reads version {CONVERTED_FORMAT_VERSION}. Convert the model again."
        )
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise ValueError(
            f"{where} has no 'model_config' object (found {model_config!r}): the ModelConfig fields of the "
            f"converted model. Convert the model again."
        )
    try:
        return ModelConfig.from_dict(model_config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: model_config is malformed: {error}. Convert the model again.") from None


def converted_groups(n_layers: int, names: Iterable[str], source: TensorSource, tied: bool, untie: bool) -> list[Group]:
    """The groups of a converted checkpoint of ``n_layers`` blocks, in ``load_order``, under
    canonical names, each read from ``source``.

    ``names``: the model's parameter names; ``tied``: the file has no ``unembed.W_U``;
    ``untie``: give the final group ``W_E.T`` as W_U.
    """
    names = list(names)

    def group(prefixes: tuple[str, ...]) -> Callable[[], dict[str, torch.Tensor]]:
        wanted = [n for n in names if n.startswith(prefixes) and not (tied and n == "unembed.W_U")]

        def read() -> dict[str, torch.Tensor]:
            tensors = {n: source(n) for n in wanted}
            if untie and "unembed." in prefixes:
                tensors["unembed.W_U"] = source("embed.W_E").T
            return tensors

        return read

    return [(part.label, "", group(part.prefixes)) for part in load_order(n_layers)]
