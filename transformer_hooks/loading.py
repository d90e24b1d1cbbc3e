"""Loading: resolve a name, build the model on the meta device, stream tensors in.

    name/path --resolution.py--> Checkpoint (HF dir, converted dir, or .gguf)
    config    --weights_conversion/<family>.py--> ModelConfig
    tensors   --> one group at a time (embeddings, each block, final): read (memory-mapped
                  safetensors), convert to canonical shapes, process in float32
                  (processing.py), cast, and copy into the model's parameters

so memory peaks near one copy of the weights plus one block's temporaries. A failure
at any point (missing, corrupt or mis-shaped tensors) raises before a model is returned.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import weights_conversion
from weights_conversion import UnsupportedArchitectureError  # noqa: F401  (re-exported for users)

from .config import ModelConfig
from .model import HookedTransformer
from .resolution import Checkpoint, resolve_checkpoint

CONVERTED_CONFIG = "transformer_hooks_config.json"
CONVERTED_WEIGHTS = "model.safetensors"
# Buffers some HF checkpoints store that are not weights (causal masks, rotary tables).
IGNORED_HF_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
                                r"rotary_emb\.inv_freq)$")


class MissingWeightsError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is prose
        return str(self.args[0])


class CorruptCheckpointError(ValueError):
    pass


class WeightShapeError(ValueError):
    pass


# Reading tensors ------------------------------------------------------------------
class TensorSource:
    """Named tensors of a checkpoint, read on demand; remembers which were read."""

    def __init__(self, names: dict[str, Callable[[], torch.Tensor]], where: str) -> None:
        self._readers = names
        self.where = where
        self.used: set[str] = set()

    def names(self) -> set[str]:
        return set(self._readers)

    def __call__(self, name: str) -> torch.Tensor:
        reader = self._readers.get(name)
        if reader is None:
            # Old hub checkpoints drop the base-model prefix ("h.0..." instead of "transformer.h.0...").
            short = name.split(".", 1)[1] if "." in name else name
            reader, name = self._readers.get(short), short
        if reader is None:
            raise KeyError(name)
        self.used.add(name)
        return reader()


def _safetensors_source(files: tuple[Path, ...]) -> TensorSource:
    from safetensors import SafetensorError, safe_open

    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")  # memory-mapped; reads a tensor when asked
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupt; "
                                         f"download or convert it again.") from e

        def reader(name: str, handle=handle, file=file) -> torch.Tensor:
            try:
                return handle.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types
                raise CorruptCheckpointError(f"cannot read tensor {name!r} from {file}: {e}. The file is "
                                             f"truncated or corrupt; download or convert it again.") from e

        for key in keys:
            readers[key] = lambda key=key, reader=reader: reader(key)
    return TensorSource(readers, ", ".join(str(f) for f in files))


def _torch_bin_source(files: tuple[Path, ...]) -> TensorSource:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:  # weights_only: no pickled code runs
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CorruptCheckpointError(f"cannot read {file}: {e}") from e
    return TensorSource({k: (lambda t=t: t) for k, t in tensors.items()}, ", ".join(map(str, files)))


def tensor_source(ckpt: Checkpoint) -> TensorSource:
    if all(f.suffix == ".safetensors" for f in ckpt.weight_files):
        return _safetensors_source(ckpt.weight_files)
    return _torch_bin_source(ckpt.weight_files)


# Building -------------------------------------------------------------------------
def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def build_on_meta(cfg: ModelConfig, tokenizer: Any = None) -> HookedTransformer:
    with torch.device("meta"):
        return HookedTransformer(cfg, tokenizer)


def materialize(model: HookedTransformer, groups: Iterator[tuple[str, Callable[[], dict]]], *,
                device: Any, dtype: torch.dtype, process: Callable[[str, dict], dict] | None = None,
                n_groups: int | None = None, desc: str = "loading", skip: frozenset[str] = frozenset()) -> None:
    """Fill a meta-built model group by group. Lists every missing tensor before failing.

    ``skip``: parameters filled otherwise (a tied ``unembed.W_U`` becomes a view of ``W_E``).
    """
    missing: list[str] = []
    expected = {name for name, _ in model.named_parameters()} - skip
    filled: set[str] = set()
    start = time.monotonic()
    bar = tqdm(total=n_groups, desc=desc, unit="group", delay=1.0, leave=False)
    try:
        for prefix, thunk in groups:
            try:
                group = {prefix + k: v for k, v in thunk().items()}
            except KeyError as e:
                missing.append(str(e.args[0]))
                continue
            if process is not None:
                group = process(prefix, {k: v.float() for k, v in group.items()})
            for name, tensor in group.items():
                if name in skip:
                    continue
                _assign(model, name, tensor, device, dtype)
                filled.add(name)
            del group
            bar.update(1)
    finally:
        bar.close()
    if missing:
        raise MissingWeightsError(f"the checkpoint is missing {len(missing)} tensor(s) this model needs: "
                                  f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
                                  f"Is it complete, and of the architecture its config.json names?")
    unfilled = expected - filled
    if unfilled:
        raise MissingWeightsError(f"no weights were provided for: {', '.join(sorted(unfilled))}")
    model._load_seconds = time.monotonic() - start


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, device: Any, dtype: torch.dtype) -> None:
    module_name, _, param_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        old = module._parameters[param_name]
    except (AttributeError, KeyError) as e:
        raise WeightShapeError(f"converted tensor {name!r} has no parameter in the model") from e
    if tuple(old.shape) != tuple(tensor.shape):
        raise WeightShapeError(f"{name}: the checkpoint gives shape {tuple(tensor.shape)}, the config implies "
                               f"{tuple(old.shape)}; the config does not match the weights")
    # empty_like keeps the parameter's strides: the layout F.linear reads without a copy.
    new = torch.empty_like(old, device=device or "cpu", dtype=dtype)
    new.copy_(tensor)
    module._parameters[param_name] = nn.Parameter(new, requires_grad=old.requires_grad)


def _finish(model: HookedTransformer, device: Any) -> HookedTransformer:
    # Non-persistent buffers (rotary frequencies) are recomputed, not loaded.
    if hasattr(model, "rotary"):
        from .components.rotary import inverse_frequencies

        cfg = model.cfg
        model.rotary.inv_freq = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling).to(device or "cpu")
    model.eval()
    return model


# Entry point ----------------------------------------------------------------------
def load_model(name_or_path: str | Path, *, fold_ln: bool = True, center_writing_weights: bool = True,
               center_unembed: bool = True, fold_value_biases: bool = True, device: Any = None,
               dtype: torch.dtype | str = torch.float32, tokenizer: Any = None) -> HookedTransformer:
    dtype = _as_dtype(dtype)
    ckpt = resolve_checkpoint(name_or_path)
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    if ckpt.kind == "converted":
        return _load_converted(ckpt, flags, device, dtype, tokenizer)
    if ckpt.kind == "gguf":
        from weights_conversion.gguf import read_gguf

        hf_config, source, make_tokenizer = read_gguf(ckpt.gguf_file)
    else:
        hf_config, source = ckpt.config, tensor_source(ckpt)
        make_tokenizer = lambda: _hf_tokenizer(ckpt.directory)  # noqa: E731

    family = weights_conversion.family_for(hf_config)
    cfg = family.config_from_hf(hf_config).replace(model_name=str(name_or_path))
    if tokenizer is None:
        tokenizer = make_tokenizer()
    if tokenizer is not None and getattr(tokenizer, "add_bos_token", True) is False:
        cfg = cfg.replace(default_prepend_bos=False)

    process = None
    if any(flags.values()):
        from . import processing

        options = processing.ProcessingOptions(**flags)
        process = lambda prefix, group: processing.process_group(cfg, group, options)  # noqa: E731
        model_cfg = processing.processed_config(cfg, options)
    else:
        model_cfg = cfg
    model = build_on_meta(model_cfg, tokenizer)
    tied = cfg.tie_word_embeddings and "unembed.W_U" not in _processed_names(model_cfg)
    materialize(model, weights_conversion.convert_groups(cfg, source, family), device=device, dtype=dtype,
                process=process, n_groups=cfg.n_layers + 2, desc=f"loading {Path(str(name_or_path)).name}",
                skip=frozenset({"unembed.W_U"}) if tied else frozenset())
    if tied:
        model.tie_embeddings()
    _warn_unused(source, cfg)
    return _finish(model, device)


def _processed_names(cfg: ModelConfig) -> set[str]:
    """Canonical tensors that processing rewrites (so they can no longer share memory)."""
    touched = {"fold_ln": "unembed.W_U", "center_unembed": "unembed.W_U"}
    return {touched[p] for p in cfg.processing if p in touched}


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


def _load_converted(ckpt: Checkpoint, flags: dict, device: Any, dtype: torch.dtype, tokenizer: Any
                    ) -> HookedTransformer:
    meta = ckpt.config
    cfg = ModelConfig.from_dict(meta["model_config"])
    source = tensor_source(ckpt)
    if tokenizer is None:
        tokenizer = _hf_tokenizer(ckpt.directory)
    model = build_on_meta(cfg, tokenizer)
    tied = cfg.tie_word_embeddings and "unembed.W_U" not in source.names()
    skip = frozenset({"unembed.W_U"}) if tied else frozenset()
    names = [n for n, _ in model.named_parameters() if n not in skip]
    groups = iter([("", lambda: {n: source(n) for n in names})])
    materialize(model, groups, device=device, dtype=dtype, n_groups=1, desc=f"loading {ckpt.directory.name}",
                skip=skip)
    if tied:
        model.tie_embeddings()
    return _finish(model, device)


def read_converted_config(directory: Path) -> dict:
    return json.loads((directory / CONVERTED_CONFIG).read_text())
