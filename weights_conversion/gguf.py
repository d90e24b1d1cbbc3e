"""GGUF files (llama.cpp's format) as an HF config plus tensors under HF names.

Reading reuses transformers' GGUF utilities throughout; what this module adds is doing
each step once and tensor by tensor:

- the metadata and tensor table are parsed once, with transformers' fast reader
  (``integrations.gguf.reader``); the HF config is built from them with transformers'
  own key mapping (``GGUF_CONFIG_MAPPING``), as ``load_gguf_checkpoint`` builds it;
- HF names map to GGUF names through gguf's ``TensorNameMap`` (the table transformers'
  ``get_gguf_hf_weights_map`` consults), and each tensor goes through transformers'
  per-architecture ``TensorProcessor`` (for Llama: undoing llama.cpp's q/k row
  permutation);
- a tensor is dequantized only when the loader asks for it, so the file streams in like a
  safetensors checkpoint: F32/F16/BF16 are read as they are, the block types transformers'
  torch ``dequantize`` knows go through it (fast), and every other type the ``gguf``
  package can dequantize (Q5_0, Q5_1, TQ1_0, TQ2_0, MXFP4, ...) goes
  through ``gguf.quants.dequantize`` (numpy); a type neither knows is refused by name.
  The tensor table is read here, not with transformers' ``GgufHeader``, whose byte counts
  know only the types its torch dequantizer has (it refuses Q5_0 files such as Gemma 3
  270M's Q4_K_M).

``load_gguf_checkpoint`` instead parses the metadata with the slow generic
``gguf.GGUFReader`` (every vocabulary string is a separate numpy view), rebuilds the
name table once per submodule of an HF model, and dequantizes the whole file up front;
``AutoTokenizer`` parses the file once more.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import UnsupportedArchitectureError, supported_model_types
from .sources import CorruptCheckpointError, TensorSource


def read_gguf(path: Path) -> tuple[dict, Any, Callable[[], Any]]:
    """(HF config dict, tensor source by HF name, tokenizer factory) for the .gguf file ``path``;
    ``CorruptCheckpointError`` for a file that is not GGUF, truncated or damaged."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        header = read_header(path)
        metadata, tensor_names = read_gguf_metadata(str(path))
    except ValueError as e:  # transformers' reader explains: not GGUF, unsupported version or type
        if not isinstance(e, UnicodeDecodeError):
            raise CorruptCheckpointError(f"cannot read GGUF file {path}: {e}") from e
        raise _truncated(path, e) from e
    except (OSError, KeyError, IndexError, struct.error) as e:  # reading past the end of the metadata
        raise _truncated(path, e) from e
    _check_tensors_inside(path, header)
    hf_config = hf_config_from_metadata(metadata, tensor_names)
    source = GgufTensors(path, header, hf_config)

    def tokenizer() -> Any:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        # The class AutoTokenizer settles on for a GGUF file (it has no tokenizer_config.json);
        # calling it directly skips AutoTokenizer's extra, slow parse of the whole file.
        name = TOKENIZER_MAPPING_NAMES.get(hf_config["model_type"])
        cls = (name and tokenizer_class_from_name(name)) or TokenizersBackend
        return cls.from_pretrained(str(path.parent), gguf_file=path.name)

    return hf_config, source, tokenizer


_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml F32, F16, BF16


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: torch-order shape, ggml type id, byte offset in the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


class GgufHeader(NamedTuple):
    """A GGUF file's architecture, tensor table and where its data section starts."""

    path: str
    architecture: str
    tensors: tuple[TensorInfo, ...]
    data_start: int


def ggml_type_name(ggml_type: int) -> str:
    """The name of the ggml type id ``ggml_type`` (``"Q4_1"``, ...), or ``"unknown ggml type N"``."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown ggml type {ggml_type}"


def tensor_bytes(name: str, ggml_type: int, shape: tuple[int, ...], where: str) -> int:
    """Bytes the tensor ``name`` of ``ggml_type`` and ``shape`` occupies (``gguf``'s block sizes),
    or a clear error naming the tensor and the file ``where``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise CorruptCheckpointError(
            f"cannot read GGUF file {where}: tensor {name!r} has ggml type {ggml_type}, which the installed gguf "
            f"package does not know (upgrade it: pip install -U gguf), or the file is corrupt."
        ) from None
    elements = prod(shape)
    if elements % block_elements:
        raise CorruptCheckpointError(
            f"cannot read GGUF file {where}: tensor {name!r} has {elements} elements, not a multiple of "
            f"{ggml_type_name(ggml_type)}'s block of {block_elements}. The file is corrupt."
        )
    return elements // block_elements * block_bytes


def read_header(path: Path) -> GgufHeader:
    """The tensor table of the GGUF file ``path``, for every ggml type the ``gguf`` package knows."""
    from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

    blob = _mapped(str(path))
    metadata, tensor_count, pos = _read_metadata(blob, str(path))
    alignment = metadata.get("general.alignment", 32)  # llama.cpp's default
    entries, pos = _read_tensor_table(blob, tensor_count, pos)
    infos = tuple(
        TensorInfo(name, shape, ggml_type, offset, tensor_bytes(name, ggml_type, shape, str(path)))
        for name, shape, ggml_type, offset in entries
    )
    data_start = (pos + alignment - 1) // alignment * alignment  # the data section is aligned
    return GgufHeader(str(path), metadata["general.architecture"], infos, data_start)


def dequantize_tensor(raw: np.ndarray, info: TensorInfo, where: str) -> torch.Tensor:
    """A tensor's bytes ``raw`` (``uint8``) as float32 values of the shape ``info`` gives.

    F32/F16/BF16 are reinterpreted; the types transformers' torch dequantizer knows go
    through it; any other type through ``gguf.quants.dequantize`` (numpy). ``where``: the
    file, for error messages.
    """
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
    if info.ggml_type in _FLOAT_TYPES:
        return data.view(_FLOAT_TYPES[info.ggml_type]).float().reshape(info.shape)
    if info.ggml_type in GGML_BLOCK:
        return dequantize(data, info.ggml_type, torch.float32).reshape(info.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        values = gguf_dequantize(data.numpy(), GGMLQuantizationType(info.ggml_type))
    except NotImplementedError:
        raise CorruptCheckpointError(
            f"cannot read tensor {info.name!r} from GGUF file {where}: its type {ggml_type_name(info.ggml_type)} "
            f"cannot be dequantized by the installed gguf package (pip install -U gguf), nor by transformer_hooks."
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def _truncated(path: Path, error: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read GGUF file {path}: {error}. The file is truncated or corrupt; download it again."
    )


def _check_tensors_inside(path: Path, header: Any) -> None:
    """Every tensor's data must lie inside the file: a cut-short download fails here, by name,
    before anything is built."""
    size = path.stat().st_size
    for info in header.tensors:
        end = header.data_start + info.offset + info.nbytes
        if end > size:
            raise CorruptCheckpointError(
                f"cannot read GGUF file {path}: tensor {info.name!r} ends at byte {end} but the file has only "
                f"{size} bytes. The file is truncated; download it again."
            )


def hf_config_from_metadata(metadata: dict, tensor_names: tuple[str, ...]) -> dict:
    """The HF config dict ``load_gguf_checkpoint`` builds for these ``metadata`` (for the
    architectures transformer_hooks reads), from transformers' key mapping; ``tensor_names``
    (the file's) tell whether the unembedding is tied."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = metadata["general.architecture"]
    if arch not in GGUF_CONFIG_MAPPING:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r}: transformers cannot read it, and transformer_hooks "
            f"implements {', '.join(supported_model_types())}."
        )
    config: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, value in metadata.items():  # "llama.block_count", "general.architecture", "tokenizer.ggml.bos_token_id"
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)  # type: ignore[attr-defined]  # typed as object upstream
        if renamed not in (None, -1):
            config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the reader leaves string arrays as counts
    if config.get("model_type") == "gemma3":  # as load_gguf_checkpoint: a Gemma 3 GGUF holds the text model only
        config["model_type"] = "gemma3_text"
    return config


class GgufTensors(TensorSource):
    """A GGUF file's tensors, asked for by HF name and dequantized one at a time.

    HF name -> GGUF name by gguf's ``TensorNameMap`` for the file's architecture (the
    table transformers' ``get_gguf_hf_weights_map`` consults, built once here rather
    than once per submodule); then transformers' ``TensorProcessor`` for the
    architecture (for Llama: undo llama.cpp's q/k row permutation).

    Args:
        path: the .gguf file.
        header: its ``read_header`` (architecture, tensor table, data offset).
        hf_config: the HF config ``hf_config_from_metadata`` made of it.
    """

    def __init__(self, path: Path, header: Any, hf_config: dict) -> None:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers.integrations.gguf.reader import _mapped
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        super().__init__({}, str(path))
        arch = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}.get(header.architecture)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {header.architecture!r} is unknown to the "
                f"installed gguf package; upgrade it (pip install -U gguf)"
            )
        self.path = path
        self.name_map = get_tensor_name_map(arch, int(hf_config.get("num_hidden_layers") or hf_config["n_layer"]))
        self.blob = _mapped(str(path))
        self.data_start = header.data_start
        self.infos = {info.name: info for info in header.tensors}
        self.lazy = self.infos  # GGUF name -> where its bytes are
        self.processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=hf_config)

    def names(self) -> set[str]:
        """The HF names of the tensors in the file."""
        return set(self.lazy)  # GGUF names; ``used`` holds GGUF names too

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of the HF name ``hf_name`` (None if absent)."""
        module, dot, suffix = hf_name.rpartition(".")
        parts = module.split(".")
        for start in range(len(parts)):  # the full name, then without leading module prefixes
            found = self.name_map.get_name(".".join(parts[start:]))
            if found is not None and found + dot + suffix in self.lazy:
                return found + dot + suffix
        return None

    def __call__(self, hf_name: str) -> torch.Tensor:
        name = self.gguf_name(hf_name)
        if name is None:
            raise KeyError(hf_name)
        self.used.add(name)
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        """Dequantize one tensor and apply the architecture's processor: a fresh tensor."""
        info = self.infos[name]
        start = self.data_start + info.offset
        try:
            values = dequantize_tensor(self.blob[start : start + info.nbytes], info, str(self.path))
        except (ValueError, RuntimeError) as e:
            raise CorruptCheckpointError(f"cannot read tensor {name!r} from GGUF file {self.path}: {e}") from e
        weights = self.processor.process(weights=values.numpy(), name=self.processor.preprocess_name(name)).weights
        return torch.from_numpy(np.ascontiguousarray(weights))  # processors work in numpy
