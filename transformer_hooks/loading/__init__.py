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
from ..dtypes import SAFETENSORS_DTYPES, as_dtype  # noqa: F401  (SAFETENSORS_DTYPES: re-exported)
from ..model import HookedTransformer
from ..processing import REWRITE_EMBEDDINGS, STEPS, ProcessingOptions, processed_config, steps_for
from ..resolution import Checkpoint, resolve_checkpoint
from ..tokens import default_prepend_bos
from .build import OneDevice, build_and_fill, build_on_meta, finish, materialize  # noqa: F401
from .groups import group_of
from .modes import current_mode, execution_mode
from .options import LoadOptions
from .placement import check_compute_device
from .quantize import QuantizeError, Scheme, check_quantize, quantized_scheme

# Buffers some HF checkpoints store that are not weights (causal masks, rotary tables).
IGNORED_HF_TENSORS = re.compile(
    r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
    r"rotary_emb\.inv_freq|\.attn\.IGNORE|\.attn\.mask|\.attn\.rotary_sin|\.attn\.rotary_cos)$"
)


# Entry point ----------------------------------------------------------------------
def load_model(name_or_path: str | Path, options: LoadOptions | None = None, **kwargs: Any) -> HookedTransformer:
    """Load a preset, HF repo id, HF directory, converted directory or .gguf file (see
    resolution.py) with ``options`` (``LoadOptions``; keyword arguments replace its fields:
    ``load_model(name, fold_ln=False)``).

    BOS: text prompts start with BOS by the rule of ``tokens.default_prepend_bos``: when the
    checkpoint's own tokenizer adds it, or when BOS is EOS (GPT-2, GPT-Neo); not for SmolLM2,
    Qwen or Pythia. A GGUF file's tokenizer adds BOS as its ``tokenizer.ggml.add_bos_token``
    says (llama.cpp copies it from the HF tokenizer), and a converted directory stores the
    answer, so the GGUF, HF and converted copies of one model agree. ``default_prepend_bos``
    overrides it; with no tokenizer, the family's default (TransformerLens 3.9's) stays.

    Execution modes (at most one; see ``LoadOptions`` and ``model.placement``): placement over
    devices (placement.py: each tensor read straight to its group's device), offload
    (offload.py) and one range of blocks per process under ``torchrun`` (pipeline.py: each
    rank reads only its own groups; every rank runs the same calls, rank 0 gets the output
    and the whole cache).

    ``name_or_path``: what to load; ``**kwargs``: ``LoadOptions`` fields (listed, with their
    defaults, in ``HookedTransformer.from_pretrained``'s docstring).
    """
    opts = LoadOptions.of(options, **kwargs)
    check_compute_device(opts.device)  # before anything is read: device="cuda" without a GPU says so
    _check_quantize(opts)
    model = _load(name_or_path, opts)
    if opts.default_prepend_bos is not None:
        model.cfg = model.cfg.replace(default_prepend_bos=opts.default_prepend_bos)
    if opts.default_padding_side is not None and model.tokenizer is not None:
        model.set_tokenizer(model.tokenizer, opts.default_padding_side)
    if opts.compile is not False:
        model.compile(**(opts.compile if isinstance(opts.compile, dict) else {}))
    return model


def _load(name_or_path: str | Path, opts: LoadOptions) -> HookedTransformer:
    tokenizer = opts.tokenizer
    if opts.hf_model is not None:
        hf_config, source = in_memory_source(opts.hf_model)
        make_tokenizer = lambda: None  # noqa: E731
        where = "hf_model.config"
    else:
        ckpt = resolve_checkpoint(name_or_path)
        if ckpt.kind == "converted":
            return _load_converted(ckpt, opts)
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
    model = _build(cfg, opts, groups, tokenizer, f"loading {Path(str(name_or_path)).name}", cfg.tie_word_embeddings)
    if model.placement.kind != "pipeline":  # a stage reads only its own blocks' tensors
        _warn_unused(source, cfg)
    return model


def _build(
    cfg: ModelConfig, opts: LoadOptions, groups: list[Group], tokenizer: Any, desc: str, tied: bool
) -> HookedTransformer:
    """Build the model of ``cfg`` from ``groups`` with the processing and the mode ``opts`` ask for."""
    dtype = as_dtype(opts.dtype)
    device = check_compute_device(opts.device if opts.move_to_device else "cpu")
    processed = processed_config(cfg, opts.processing)
    mode = execution_mode(processed, opts, device, dtype)
    scheme = _check_quantize(opts, warn=False)  # load_model checked (and warned) before reading
    return build_and_fill(cfg, opts.processing, groups, tokenizer, dtype, desc, tied, mode, scheme)


def _check_quantize(opts: LoadOptions, warn: bool = True) -> Scheme | None:
    """The quantization ``opts`` ask for, checked against the device, dtype and mode."""
    if opts.quantize is None:
        return None
    if opts.offload is not None:
        raise QuantizeError(
            "quantize= does not combine with offload= (offload copies dense block weights to the device); "
            "quantized weights take 2-4x less memory: try quantize= with a device or a device_map alone"
        )
    device = opts.device if opts.move_to_device else "cpu"
    if isinstance(opts.device_map, dict) and opts.device_map:
        device = next(iter(opts.device_map.values()))
    elif opts.device_map is not None and opts.max_memory:
        device = next(iter(opts.max_memory))
    elif opts.n_devices is not None:
        device = "cuda"
    return check_quantize(opts.quantize, device, as_dtype(opts.dtype), warn=warn)


def processed_copy(model: HookedTransformer, options: ProcessingOptions) -> HookedTransformer:
    """``model`` with the processing ``options`` ask for (``model`` itself if there is none
    left to apply), built as a load is. Unprocessed tensors may be shared with ``model``:
    this serves ``process_weights_``, which drops the old modules."""
    if not steps_for(model.cfg, options):
        return model
    if quantized_scheme(model) is not None:
        raise QuantizeError(
            "this model's weights are quantized, and processing them would quantize them a second time: "
            "load it with the processing you want instead (from_pretrained(..., quantize=..., fold_ln=...))"
        )
    mode = current_mode(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    # Split over processes, each rank processes the groups it holds (every step works within a
    # group: embeddings, a block, or final norm + unembedding) and the others stay meta.
    weights = {name: p.detach() for name, p in params.items() if mode.reads(group_of(name))}
    frozen = {name for name, p in params.items() if not p.requires_grad}
    tied = model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr()
    groups: list[Group] = [("weights", "", lambda: dict(weights))]
    new = build_and_fill(model.cfg, options, groups, model.tokenizer, model.dtype, "processing", tied, mode)
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
def _load_converted(ckpt: Checkpoint, opts: LoadOptions) -> HookedTransformer:
    """Canonical tensors under their parameter names: no conversion; processing that the
    checkpoint does not have yet is applied on the way in."""
    assert ckpt.config is not None  # a converted checkpoint has its config
    options = opts.processing
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
    tokenizer = opts.tokenizer
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
    split = (opts.pipeline_ranks or 1) > 1
    untie = stored_tied and (split or bool(set(steps_for(cfg, options)) & REWRITE_EMBEDDINGS))
    names = [name for name, _ in build_on_meta(cfg).named_parameters()]
    groups = converted_groups(cfg.n_layers, names, source, stored_tied, untie)
    model = _build(cfg, opts, groups, tokenizer, f"loading {ckpt.directory.name}", stored_tied)
    if model.placement.kind != "pipeline":
        _warn_unused(source, cfg)
    return model
