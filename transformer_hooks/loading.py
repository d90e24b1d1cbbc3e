"""Loading: resolve a name, build the model on the meta device, stream tensors in.

    name/path --resolution.py--> Checkpoint (HF dir, converted dir, or .gguf)
    config    --weights_conversion/<family>.py--> ModelConfig
    tensors   --> one group at a time (embeddings, final norm + unembedding, then each
                  block): read into a fresh buffer, convert to canonical shapes, process
                  in float32 (processing.py), cast, and become the model's parameters

so memory peaks near one copy of the weights plus one group's temporaries. The large
groups (embeddings, unembedding) go first, while the model is still empty, so their
temporaries never stack on top of a full model. A failure at any point (missing,
corrupt or mis-shaped tensors) raises before a model is returned.

Readers: safetensors (single file or sharded) through ``SafetensorsFile`` below;
``.bin`` only through ``torch.load(weights_only=True)`` (no pickled code runs; the
memory-mapped file stays resident while loading, so about two copies at the peak);
GGUF through ``weights_conversion/gguf.py``; converted checkpoints (written by
``python -m weights_conversion``) hold canonical tensors and skip conversion.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import torch
from torch import nn
from tqdm.auto import tqdm

import weights_conversion
from weights_conversion import UnsupportedArchitectureError  # noqa: F401  (re-exported for users)

from .config import ModelConfig
from .memory import return_freed_memory
from .model import HookedTransformer
from .resolution import CONVERTED_CONFIG, Checkpoint, resolve_checkpoint

CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_FORMAT_VERSION = 1
# Buffers some HF checkpoints store that are not weights (causal masks, rotary tables).
IGNORED_HF_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
                                r"rotary_emb\.inv_freq)$")

# (label for messages, name prefix, thunk returning {name relative to prefix: tensor})
Group = tuple[str, str, Callable[[], dict[str, torch.Tensor]]]


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
        key = name
        if key not in self._readers:
            # Old hub checkpoints drop the base-model prefix ("h.0..." instead of "transformer.h.0...").
            key = name.split(".", 1)[1] if "." in name else name
        if key not in self._readers:
            raise KeyError(name)
        self.used.add(key)
        return self._readers[key]()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One ``.safetensors`` file: the header is read and checked against the file size
    up front; each tensor is then read into a fresh buffer of its own.

    Why not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor
    was read from stays in this process's resident set while the handle lives, so a
    streaming load would peak at the file *plus* the model. A plain read goes through
    the kernel's page cache (not our RSS), and the buffer it fills can become the
    parameter itself. The format is an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the data.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    self._corrupt(f"its header claims {n} bytes but the file has only {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self._corrupt(str(e))
        if not isinstance(header, dict):
            self._corrupt("its header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        for name, entry in header.items():
            self.entries[name] = self._check_entry(name, entry, size - self.data_start)

    def _check_entry(self, name: str, entry: Any, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
        try:
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"])
            begin, end = entry["data_offsets"]
            numel = int(torch.Size(shape).numel())
        except (KeyError, TypeError, ValueError):
            self._corrupt(f"its header entry for {name!r} is malformed: {entry!r}")
        if end - begin != numel * dtype.itemsize or begin < 0:
            self._corrupt(f"tensor {name!r} of shape {shape} ({entry['dtype']}) has {end - begin} bytes of data")
        if end > data_size:
            self._corrupt(f"tensor {name!r} ends at byte {end} of the data but the file holds only {data_size}")
        return dtype, shape, begin, end

    def _corrupt(self, why: str) -> NoReturn:
        raise CorruptCheckpointError(f"cannot read {self.path}: {why}. The file is truncated or corrupt; "
                                     f"download or convert it again.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                while done < len(view):  # a read may return less than asked (over 2 GB on Linux)
                    got = f.readinto(view[done:])
                    if not got:
                        self._corrupt(f"tensor {name!r} is cut short (the file shrank while loading?)")
                    done += got
        except OSError as e:
            self._corrupt(f"reading tensor {name!r} failed: {e}")
        return buffer.view(dtype).reshape(shape)


def _safetensors_source(files: tuple[Path, ...]) -> TensorSource:
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        handle = SafetensorsFile(file)
        for key in handle.keys():
            readers.setdefault(key, lambda key=key, handle=handle: handle.read(key))
    return TensorSource(readers, ", ".join(str(f) for f in files))


def _torch_bin_source(files: tuple[Path, ...]) -> TensorSource:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:  # weights_only: no pickled code runs
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CorruptCheckpointError(f"cannot read {file}: {e}. Only plain tensors are loaded from .bin "
                                         f"files (weights_only=True); prefer safetensors.") from e
    # A clone per tensor: parameters must not alias the memory-mapped file (the loader may
    # adopt a tensor as a parameter without copying it).
    return TensorSource({k: (lambda t=t: t.clone()) for k, t in tensors.items()}, ", ".join(map(str, files)))


def _in_memory_source(hf_model: Any) -> tuple[dict, TensorSource]:
    """The config and tensors of a transformers model in memory. Each tensor is copied as
    it is converted, so the new model never shares memory with ``hf_model``."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"hf_model must be a transformers model (with .config and .state_dict()), "
                        f"got {type(hf_model).__name__}")
    state = hf_model.state_dict()
    readers = {name: (lambda t=t: t.detach().to("cpu", copy=True)) for name, t in state.items()}
    return config.to_dict(), TensorSource(readers, f"the {type(hf_model).__name__} passed as hf_model")


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


def materialize(model: HookedTransformer, groups: Iterable[Group], *, device: Any, dtype: torch.dtype,
                process: Callable[[dict], dict] | None = None, n_groups: int | None = None,
                desc: str = "loading", skip: frozenset[str] = frozenset()) -> None:
    """Fill a meta-built model group by group; lists every missing tensor before failing.

    ``process`` takes and returns ``{full name: float32 tensor}`` for one group.
    ``skip``: parameters filled otherwise (a tied ``unembed.W_U`` becomes a view of ``W_E``).
    """
    missing: list[str] = []
    expected = {name for name, _ in model.named_parameters()} - skip
    filled: set[str] = set()
    adopted: set[int] = set()
    bar = tqdm(total=n_groups, desc=desc, unit="group", delay=1.0, leave=False)
    try:
        for label, prefix, thunk in groups:
            group = _read_group(label, prefix, thunk, missing)
            if group is None:
                continue
            if process is not None:
                group = _process_group(label, process, group)
            for name in list(group):
                if name not in skip:
                    _assign(model, name, group.pop(name), device, dtype, adopted)
                    filled.add(name)
            del group
            # glibc would keep the group's freed temporaries, and the next group's tensors rarely fit
            # the holes, so the resident set would grow by one group's temporaries per group
            # (measured: +60 MB on GPT-2 small).
            return_freed_memory()
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


def _read_group(label: str, prefix: str, thunk: Callable[[], dict], missing: list[str]) -> dict | None:
    """{full name: tensor} of one group, or None (and the missing name noted) if a tensor is missing."""
    try:
        return {prefix + k: v for k, v in thunk().items()}
    except KeyError as e:
        missing.append(str(e.args[0]))
        return None
    except (RuntimeError, ValueError) as e:  # a reshape in a converter: the config does not fit the tensors
        if isinstance(e, (CorruptCheckpointError, WeightShapeError)):
            raise
        raise WeightShapeError(f"{label}: the checkpoint's tensors do not fit its config ({e}); "
                               f"the config does not match the weights") from e


def _process_group(label: str, process: Callable[[dict], dict], group: dict) -> dict:
    for name in group:
        group[name] = group[name].float()  # processing runs in float32; a no-op for float32 tensors
    try:
        return process(group)
    except RuntimeError as e:  # broadcasting a norm weight of the wrong width
        raise WeightShapeError(f"{label}: the checkpoint's tensors do not fit its config ({e}); "
                               f"the config does not match the weights") from e


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, device: Any, dtype: torch.dtype,
            adopted: set[int]) -> None:
    module_name, _, param_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        old = module._parameters[param_name]
    except (AttributeError, KeyError) as e:
        raise WeightShapeError(f"converted tensor {name!r} has no parameter in the model") from e
    if tuple(old.shape) != tuple(tensor.shape):
        raise WeightShapeError(f"{name}: the checkpoint gives shape {tuple(tensor.shape)}, the config implies "
                               f"{tuple(old.shape)}; the config does not match the weights")
    device = torch.device(device or "cpu")
    if _can_adopt(tensor, old, device, dtype, adopted):
        new = tensor  # a fresh buffer already laid out as the parameter: no copy
    else:
        # The parameter's strides are the layout F.linear reads without a copy.
        new = torch.empty_strided(old.shape, old.stride(), dtype=dtype, device=device)
        new.copy_(tensor)
    adopted.add(new.untyped_storage().data_ptr())
    module._parameters[param_name] = nn.Parameter(new, requires_grad=old.requires_grad)


def _can_adopt(tensor: torch.Tensor, old: torch.Tensor, device: torch.device, dtype: torch.dtype,
               adopted: set[int]) -> bool:
    """Whether ``tensor`` can be the parameter as it is: right dtype, device and strides,
    and sole owner of its memory (not a slice of a memory-mapped file, not a view of a
    buffer another parameter uses)."""
    storage = tensor.untyped_storage()
    return (tensor.dtype == dtype and tensor.device == device and tensor.stride() == old.stride()
            and tensor.storage_offset() == 0 and storage.nbytes() == tensor.numel() * tensor.element_size()
            and storage.data_ptr() not in adopted)


def _finish(model: HookedTransformer, device: Any) -> HookedTransformer:
    # Non-persistent buffers (rotary frequencies) are recomputed, not loaded.
    for name in ("rotary", "rotary_local"):
        if hasattr(model, name):
            getattr(model, name).inv_freq = getattr(model, name).frequencies().to(device or "cpu")
    model._note_device()
    model.eval()
    return model


def _big_groups_first(groups: list[Group]) -> list[Group]:
    """Embeddings, then final norm + unembedding, then the blocks: the two big groups'
    temporaries are alive while the model is still nearly empty."""
    return [groups[0], groups[-1], *groups[1:-1]]


# Entry point ----------------------------------------------------------------------
def load_model(name_or_path: str | Path, *, fold_ln: bool = True, center_writing_weights: bool = True,
               center_unembed: bool = True, fold_value_biases: bool = True, device: Any = None,
               dtype: torch.dtype | str = torch.float32, tokenizer: Any = None, hf_model: Any = None,
               default_prepend_bos: bool | None = None, default_padding_side: str | None = None,
               torch_dtype: torch.dtype | str | None = None, move_to_device: bool = True,
               refactor_factored_attn_matrices: bool = False) -> HookedTransformer:
    """Load a preset, HF repo id, HF directory, converted directory or .gguf file (see
    resolution.py), with the weight processing the flags ask for (see processing.py).

    TransformerLens's options: ``hf_model`` converts a transformers model already in memory
    (``name_or_path`` then only names it; pass ``tokenizer`` for strings);
    ``default_prepend_bos`` and ``default_padding_side`` override the tokenizer's defaults;
    ``torch_dtype`` is ``dtype``; ``move_to_device=False`` keeps the weights on the CPU.
    """
    if default_padding_side not in (None, "left", "right"):
        raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
    if torch_dtype is not None:
        dtype = torch_dtype
    from .processing import ProcessingOptions

    options = ProcessingOptions(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    model = _load(name_or_path, options, device=device if move_to_device else "cpu", dtype=dtype,
                  tokenizer=tokenizer, hf_model=hf_model)
    if default_prepend_bos is not None:
        model.cfg = model.cfg.replace(default_prepend_bos=default_prepend_bos)
    if default_padding_side is not None and model.tokenizer is not None:
        model.set_tokenizer(model.tokenizer, default_padding_side)
    return model


def _load(name_or_path: str | Path, options: Any, *, device: Any, dtype: torch.dtype | str, tokenizer: Any,
          hf_model: Any) -> HookedTransformer:
    dtype = _as_dtype(dtype)
    if hf_model is not None:
        hf_config, source = _in_memory_source(hf_model)
        make_tokenizer = lambda: None  # noqa: E731
    else:
        ckpt = resolve_checkpoint(name_or_path)
        if ckpt.kind == "converted":
            return _load_converted(ckpt, options, device, dtype, tokenizer)
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
    # As in TransformerLens, prompts start with BOS unless the checkpoint says otherwise. Only
    # GGUF metadata says so explicitly; an HF tokenizer's add_bos_token=False does not (GPT-2's
    # is False, and TransformerLens prepends BOS to GPT-2 prompts).
    if hf_config.get("add_bos_token") is False:
        cfg = cfg.replace(default_prepend_bos=False)

    labels = ["embeddings", *(f"block {i}" for i in range(cfg.n_layers)), "final norm and unembedding"]
    groups = [(label, prefix, thunk) for label, (prefix, thunk)
              in zip(labels, weights_conversion.convert_groups(cfg, source, family))]
    model = _build_and_fill(cfg, options, _big_groups_first(groups), tokenizer, device, dtype,
                            desc=f"loading {Path(str(name_or_path)).name}",
                            tied=cfg.tie_word_embeddings)
    _warn_unused(source, cfg)
    return model


def _build_and_fill(cfg: ModelConfig, options: Any, groups: list[Group], tokenizer: Any, device: Any,
                    dtype: torch.dtype, desc: str, tied: bool) -> HookedTransformer:
    """Build the (processed) model on the meta device and stream ``groups`` into it.

    ``cfg`` describes the groups' tensors; processing turns it into the model's config.
    ``tied``: the unembedding is ``W_E.T``; it stays one shared tensor unless processing
    rewrites either side.
    """
    from . import processing

    model_cfg = processing.processed_config(cfg, options)
    applied = model_cfg.processing[len(cfg.processing):]
    process = (lambda group: processing.process_group(cfg, group, options)) if applied else None
    share = tied and not set(applied) & REWRITE_EMBEDDINGS
    model = build_on_meta(model_cfg, tokenizer)
    materialize(model, groups, device=device, dtype=dtype, process=process, n_groups=len(groups), desc=desc,
                skip=frozenset({"unembed.W_U"}) if share else frozenset())
    if share:
        model.tie_embeddings()
    return _finish(model, device)


def processed_copy(model: HookedTransformer, options: Any) -> HookedTransformer:
    """``model`` with the processing ``options`` ask for (``model`` itself if there is none
    left to apply), built as a load is. Unprocessed tensors may be shared with ``model``:
    this serves ``process_weights_``, which drops the old modules."""
    from . import processing

    if not processing.steps_for(model.cfg, options):
        return model
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {name: p.detach() for name, p in params.items()}
    frozen = {name for name, p in params.items() if not p.requires_grad}
    tied = model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr()
    new = _build_and_fill(model.cfg, options, [("weights", "", lambda: dict(weights))], model.tokenizer,
                          device=model.device, dtype=model.dtype, desc="processing", tied=tied)
    for name, param in new.named_parameters(remove_duplicate=False):
        param.requires_grad_(name not in frozen)
    new.train(model.training)
    return new


# Steps that rewrite W_E (centring) or W_U (folding ln_final, centring): after them a tied
# unembedding is its own tensor.
REWRITE_EMBEDDINGS = {"fold_ln", "center_writing_weights", "center_unembed"}


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


# Converted checkpoints (written by `python -m weights_conversion`) ------------------
def _load_converted(ckpt: Checkpoint, options: Any, device: Any, dtype: torch.dtype, tokenizer: Any
                    ) -> HookedTransformer:
    """Canonical tensors under their parameter names: no conversion; processing that the
    checkpoint does not have yet is applied on the way in."""
    from .processing import STEPS, steps_for

    meta = ckpt.config
    if meta.get("format_version") != CONVERTED_FORMAT_VERSION:
        raise ValueError(f"{ckpt.directory / CONVERTED_CONFIG} has format_version {meta.get('format_version')!r}; "
                         f"this transformer_hooks reads version {CONVERTED_FORMAT_VERSION}. Convert the model again.")
    cfg = ModelConfig.from_dict(meta["model_config"])
    wanted = steps_for(cfg.replace(processing=(), normalization_type=_unfolded_norm(cfg)), options)
    if wanted[:len(cfg.processing)] != cfg.processing:
        asked = {step: step in wanted for step in STEPS}
        raise ValueError(
            f"{ckpt.directory} was converted with processing {list(cfg.processing)}, which cannot be undone, "
            f"and this load asks for {list(wanted)} ({asked}). Load it with the processing it has "
            f"(e.g. from_pretrained(path) for the defaults), or convert the original checkpoint again with "
            f"`python -m weights_conversion SRC DST --no-processing`.")

    source = tensor_source(ckpt)
    if tokenizer is None:
        tokenizer = _hf_tokenizer(ckpt.directory)
    # A tied unembedding is stored once, as W_E; processing that rewrites it needs its own copy.
    stored_tied = cfg.tie_word_embeddings and "unembed.W_U" not in source.names()
    untie = stored_tied and bool(set(steps_for(cfg, options)) & REWRITE_EMBEDDINGS)
    groups = _converted_groups(cfg, source, stored_tied, untie)
    model = _build_and_fill(cfg, options, groups, tokenizer, device, dtype, desc=f"loading {ckpt.directory.name}",
                            tied=stored_tied)
    _warn_unused(source, cfg)
    return model


def _unfolded_norm(cfg: ModelConfig) -> str:
    return {"LNPre": "LN", "RMSPre": "RMS"}.get(cfg.normalization_type, cfg.normalization_type)


def _converted_groups(cfg: ModelConfig, source: TensorSource, tied: bool, untie: bool) -> list[Group]:
    """Embeddings, final norm + unembedding, then each block, under canonical names.

    ``tied``: the file has no ``unembed.W_U``; ``untie``: give the final group ``W_E.T`` as W_U.
    """
    names = [name for name, _ in build_on_meta(cfg).named_parameters()]

    def group(*prefixes: str) -> Callable[[], dict[str, torch.Tensor]]:
        wanted = [n for n in names if n.startswith(prefixes) and not (tied and n == "unembed.W_U")]

        def read() -> dict[str, torch.Tensor]:
            tensors = {n: source(n) for n in wanted}
            if untie and "unembed." in prefixes:
                tensors["unembed.W_U"] = source("embed.W_E").T
            return tensors
        return read

    return [("embeddings", "", group("embed.", "pos_embed.")),
            ("final norm and unembedding", "", group("ln_final.", "unembed.")),
            *((f"block {i}", "", group(f"blocks.{i}.")) for i in range(cfg.n_layers))]

