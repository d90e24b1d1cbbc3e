"""Loading: resolve a name, build the model on the meta device, stream tensors in.

    name/path --resolution.py--> Checkpoint (HF dir, converted dir, or .gguf)
    config    --weights_conversion/<family>.py--> ModelConfig
    tensors   --> one group at a time (weights_conversion/groups.py: embeddings, final
                  norm + unembedding, then each block): read into a fresh buffer,
                  convert to canonical shapes, process in float32 (processing.py), cast,
                  and become the model's parameters (build.py)

so memory peaks near one copy of the weights plus one group's temporaries. A failure at
any point (missing, corrupt or mis-shaped tensors) raises before a model is returned.

Readers (weights_conversion/sources.py): safetensors (single file or sharded), ``.bin``
only through ``torch.load(weights_only=True)``, a transformers model in memory; GGUF
through ``weights_conversion/gguf.py``; converted checkpoints (the format is
weights_conversion/converted.py, written by ``python -m weights_conversion``) hold
canonical tensors and skip conversion.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

import weights_conversion
from weights_conversion import UnsupportedArchitectureError  # noqa: F401  (re-exported for users)
from weights_conversion.converted import (  # noqa: F401  (re-exported: the format's names)
    BOS_RULE_VERSION,
    CONVERTED_CONFIG,
    CONVERTED_FORMAT_VERSION,
    CONVERTED_WEIGHTS,
    converted_config,
    converted_groups,
)
from weights_conversion.groups import Group  # noqa: F401
from weights_conversion.sources import (  # noqa: F401  (re-exported: the readers and checkpoint errors)
    SAFETENSORS_DTYPES,
    CorruptCheckpointError,
    MissingWeightsError,
    SafetensorsFile,
    TensorSource,
    WeightShapeError,
    in_memory_source,
    safetensors_source,
    tensor_source,
    torch_bin_source,
)

from ..config import ModelConfig
from ..dtypes import as_dtype  # noqa: F401
from ..model import HookedTransformer
from ..processing import REWRITE_EMBEDDINGS, STEPS, ProcessingOptions, steps_for
from ..resolution import Checkpoint, resolve_checkpoint
from ..tokens import PaddingSide, default_prepend_bos
from .build import build_and_fill, build_on_meta, finish, materialize  # noqa: F401

# Buffers some HF checkpoints store that are not weights (causal masks, rotary tables).
IGNORED_HF_TENSORS = re.compile(
    r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
    r"rotary_emb\.inv_freq|\.attn\.IGNORE|\.attn\.mask|\.attn\.rotary_sin|\.attn\.rotary_cos)$"
)


# Entry point ----------------------------------------------------------------------
def load_model(
    name_or_path: str | Path,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    device: Any = None,
    dtype: torch.dtype | str = torch.float32,
    tokenizer: Any = None,
    hf_model: Any = None,
    default_prepend_bos: bool | None = None,
    default_padding_side: PaddingSide | None = None,
    torch_dtype: torch.dtype | str | None = None,
    move_to_device: bool = True,
    refactor_factored_attn_matrices: bool = False,
    device_map: Any = None,
    max_memory: Any = None,
    n_devices: int | None = None,
    offload: str | None = None,
    offload_dir: Any = None,
    pipeline_ranks: int | None = None,
    pipeline_timeout: Any = None,
    compile: bool | dict[str, Any] = False,
) -> HookedTransformer:
    """Load a preset, HF repo id, HF directory, converted directory or .gguf file (see
    resolution.py), with the weight processing the flags ask for (see processing.py).

    TransformerLens's options: ``hf_model`` converts a transformers model already in memory
    (``name_or_path`` then only names it; pass ``tokenizer`` for strings);
    ``default_prepend_bos`` and ``default_padding_side`` override the defaults;
    ``torch_dtype`` is ``dtype``; ``move_to_device=False`` keeps the weights on the CPU.

    BOS: text prompts start with BOS by the rule of ``tokens.default_prepend_bos``: when the
    checkpoint's own tokenizer adds it, or when BOS is EOS (GPT-2, GPT-Neo); not for SmolLM2,
    Qwen or Pythia. A GGUF file's tokenizer adds BOS as its ``tokenizer.ggml.add_bos_token``
    says (llama.cpp copies it from the HF tokenizer), and a converted directory stores the
    answer, so the GGUF, HF and converted copies of one model agree. ``default_prepend_bos``
    overrides it; with no tokenizer, the family's default (TransformerLens 3.9's) stays.

    ``compile=True`` (or a dict of ``torch.compile`` keyword arguments) returns the model
    after ``model.compile(...)``: the forward runs compiled, hooks still fire (see
    ``HookedTransformer.compile``).

    Size (see placement.py and offload.py): ``device_map`` ("auto", "balanced" or a dict
    {group: device}), ``max_memory`` ({device: bytes or "20GiB"}) and ``n_devices`` place
    whole blocks over devices, each tensor read straight to its device, and record the
    placement in ``model.cfg.device_map``; ``offload="cpu"|"disk"`` (with ``offload_dir``
    for disk) keeps block weights off ``device`` and brings each block in as it runs.

    Layer ranges across processes (see pipeline.py): ``pipeline_ranks=k`` under ``torchrun``
    with k processes: each rank reads and holds only its contiguous range of blocks (the
    first also the embeddings, the last the final norm and unembedding), on its device
    (``device``, default: its GPU under NCCL, else the CPU); ``model.cfg.pipeline_map``
    records {group: rank}. Every rank runs the same calls; rank 0 gets the output and the
    whole cache. ``pipeline_timeout`` (seconds or a timedelta; default 30 minutes) bounds
    each wait for another rank.
    """
    if default_padding_side not in (None, "left", "right"):
        raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}")
    if torch_dtype is not None:
        dtype = torch_dtype
    options = ProcessingOptions(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    size = dict(
        device_map=device_map,
        max_memory=max_memory,
        n_devices=n_devices,
        offload=offload,
        offload_dir=offload_dir,
        pipeline_ranks=pipeline_ranks,
        pipeline_timeout=pipeline_timeout,
    )
    model = _load(
        name_or_path,
        options,
        device=device if move_to_device else "cpu",
        dtype=dtype,
        tokenizer=tokenizer,
        hf_model=hf_model,
        size=size,
    )
    if default_prepend_bos is not None:
        model.cfg = model.cfg.replace(default_prepend_bos=default_prepend_bos)
    if default_padding_side is not None and model.tokenizer is not None:
        model.set_tokenizer(model.tokenizer, default_padding_side)
    if compile is not False:
        model.compile(**(compile if isinstance(compile, dict) else {}))
    return model


def _load(
    name_or_path: str | Path,
    options: ProcessingOptions,
    *,
    device: Any,
    dtype: torch.dtype | str,
    tokenizer: Any,
    hf_model: Any,
    size: dict[str, Any],
) -> HookedTransformer:
    dtype = as_dtype(dtype)
    if hf_model is not None:
        hf_config, source = in_memory_source(hf_model)
        make_tokenizer = lambda: None  # noqa: E731
        where = "hf_model.config"
    else:
        ckpt = resolve_checkpoint(name_or_path)
        if ckpt.kind == "converted":
            return _load_converted(ckpt, options, device, dtype, tokenizer, size)
        if ckpt.kind == "gguf":
            from weights_conversion.gguf import read_gguf

            assert ckpt.gguf_file is not None  # a gguf checkpoint names its file
            hf_config, source, make_tokenizer = read_gguf(ckpt.gguf_file)
            where = f"the metadata of {ckpt.gguf_file}"
        else:
            assert ckpt.config is not None  # an HF directory has its config.json
            hf_config, source = ckpt.config, tensor_source(ckpt.weight_files)
            where = str(ckpt.directory / "config.json")
            make_tokenizer = lambda: _hf_tokenizer(ckpt.directory)  # noqa: E731

    family = weights_conversion.family_for(hf_config)
    cfg = weights_conversion.config_from_hf(hf_config, where).replace(model_name=str(name_or_path))
    if tokenizer is None:
        tokenizer = make_tokenizer()
    if tokenizer is not None:  # without one, the family's default (TransformerLens 3.9's) stays
        cfg = cfg.replace(default_prepend_bos=default_prepend_bos(tokenizer, cfg))

    groups = weights_conversion.convert_groups(cfg, source, family)
    model = build_and_fill(
        cfg,
        options,
        groups,
        tokenizer,
        device,
        dtype,
        desc=f"loading {Path(str(name_or_path)).name}",
        tied=cfg.tie_word_embeddings,
        **size,
    )
    if model._stage is None:  # a stage reads only its own blocks' tensors
        _warn_unused(source, cfg)
    return model


def processed_copy(model: HookedTransformer, options: ProcessingOptions) -> HookedTransformer:
    """``model`` with the processing ``options`` ask for (``model`` itself if there is none
    left to apply), built as a load is. Unprocessed tensors may be shared with ``model``:
    this serves ``process_weights_``, which drops the old modules."""
    if not steps_for(model.cfg, options):
        return model
    if model._stage is not None:
        raise ValueError(
            "this model is split over processes (pipeline_ranks) and holds only some blocks' weights: "
            "load it with the processing you want instead (from_pretrained's fold_ln, center_* flags)"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {name: p.detach() for name, p in params.items()}
    frozen = {name for name, p in params.items() if not p.requires_grad}
    tied = model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr()
    placed = model.cfg.device_map
    new = build_and_fill(
        model.cfg,
        options,
        [("weights", "", lambda: dict(weights))],
        model.tokenizer,
        device=None if placed else model.device,
        dtype=model.dtype,
        desc="processing",
        tied=tied,
        device_map=placed,
    )
    for name, param in new.named_parameters(remove_duplicate=False):
        param.requires_grad_(name not in frozen)
    new.train(model.training)
    return new


def _warn_unused(source: TensorSource, cfg: ModelConfig) -> None:
    unused = {n for n in source.names() - source.used if not IGNORED_HF_TENSORS.search(n)}
    if cfg.tie_word_embeddings:
        unused.discard("lm_head.weight")
    if unused:
        shown = ", ".join(sorted(unused)[:20])
        warnings.warn(f"{len(unused)} tensor(s) in {source.where} were not used: {shown}", stacklevel=3)


def _hf_tokenizer(directory: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((directory / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


# Converted checkpoints (weights_conversion/converted.py) ----------------------------
def _load_converted(
    ckpt: Checkpoint, options: ProcessingOptions, device: Any, dtype: torch.dtype, tokenizer: Any, size: dict[str, Any]
) -> HookedTransformer:
    """Canonical tensors under their parameter names: no conversion; processing that the
    checkpoint does not have yet is applied on the way in."""
    assert ckpt.config is not None  # a converted checkpoint has its config
    cfg = converted_config(ckpt.directory, ckpt.config)
    unprocessed = cfg.replace(processing=(), normalization_type=cfg.unfolded_normalization_type)
    wanted = steps_for(unprocessed, options)
    if wanted[: len(cfg.processing)] != cfg.processing:
        asked = {step: step in wanted for step in STEPS}
        raise ValueError(
            f"{ckpt.directory} was converted with processing {list(cfg.processing)}, which cannot be undone, "
            f"and this load asks for {list(wanted)} ({asked}). Load it with the processing it has "
            f"(e.g. from_pretrained(path) for the defaults), or convert the original checkpoint again with "
            f"`python -m weights_conversion SRC DST --no-processing`."
        )

    source = tensor_source(ckpt.weight_files)
    stored_rule = ckpt.config.get("bos_rule") == BOS_RULE_VERSION  # cfg holds the rule's answer for its tokenizer
    if tokenizer is not None or not stored_rule:
        tokenizer = _hf_tokenizer(ckpt.directory) if tokenizer is None else tokenizer
        if tokenizer is not None:  # a tokenizer passed in, or a file converted before the rule: decide now
            cfg = cfg.replace(default_prepend_bos=default_prepend_bos(tokenizer, cfg))
    else:
        tokenizer = _hf_tokenizer(ckpt.directory)
    # A tied unembedding is stored once, as W_E; processing that rewrites it needs its own copy.
    stored_tied = cfg.tie_word_embeddings and "unembed.W_U" not in source.names()
    # the last rank of a split model holds the unembedding without the embeddings: its own copy
    split = (size.get("pipeline_ranks") or 1) > 1
    untie = stored_tied and (split or bool(set(steps_for(cfg, options)) & REWRITE_EMBEDDINGS))
    names = [name for name, _ in build_on_meta(cfg).named_parameters()]
    groups = converted_groups(cfg.n_layers, names, source, stored_tied, untie)
    model = build_and_fill(
        cfg, options, groups, tokenizer, device, dtype, desc=f"loading {ckpt.directory.name}", tied=stored_tied, **size
    )
    if model._stage is None:
        _warn_unused(source, cfg)
    return model
