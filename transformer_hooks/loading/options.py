"""``LoadOptions``: everything ``from_pretrained`` takes besides the name, in one place.

``HookedTransformer.from_pretrained(name, fold_ln=False, device_map="auto")`` builds
``LoadOptions(fold_ln=False, device_map="auto")``; ``load_model(name, options)`` takes it
as it is, and each step of a load reads the fields it needs (processing, placement,
offload, pipeline, tokens)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..processing import ProcessingOptions
from ..tokens import PaddingSide
from .quantize import CHOICES_TEXT, QUANTIZE_CHOICES, QuantizeError

_ALIASES = {"torch_dtype": "dtype"}  # TransformerLens's (and transformers') name for dtype


@dataclass(frozen=True)
class LoadOptions:
    """The options of a load (``from_pretrained``'s keyword arguments).

    Weight processing (processing.py; TransformerLens's defaults): ``fold_ln``,
    ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``,
    ``refactor_factored_attn_matrices`` (refused: see processing.py).

    Where: ``device`` (default: the CPU), ``dtype`` (``torch_dtype`` is accepted as its
    TransformerLens name), ``move_to_device=False`` keeps the weights on the CPU.

    Tokens: ``tokenizer`` (a HF tokenizer; default: the checkpoint's), ``default_prepend_bos``
    and ``default_padding_side`` override the defaults; ``hf_model`` converts a transformers
    model already in memory (the name then only names it).

    Size (loading/placement.py, offload.py, pipeline.py; at most one of the three modes):
    ``device_map`` ("auto", "balanced", "sequential" or {group: device}), ``max_memory``
    ({device: bytes or "20GiB"}) and ``n_devices`` place whole blocks over devices;
    ``offload`` ("cpu" or "disk", with ``offload_dir``: default a temporary directory removed
    at exit) keeps block weights off ``device``; ``pipeline_ranks=k`` under ``torchrun`` holds
    one range of blocks per process, each wait bounded by ``pipeline_timeout`` (seconds or a
    timedelta; default 30 minutes).

    ``quantize`` (loading/quantize.py): ``"int8"`` or ``"int4"`` (torchao; ``pip install
    'transformer_hooks[quant]'``), ``"bnb-int8"`` or ``"bnb-nf4"`` (bitsandbytes, CUDA)
    stores the attention and MLP weight matrices quantized, block by block as they load;
    the embeddings, unembedding, norms and biases keep ``dtype``.

    ``compile``: True (or a dict of ``torch.compile`` keyword arguments) returns the model
    after ``model.compile(...)``.
    """

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False
    device: Any = None
    dtype: torch.dtype | str = torch.float32
    move_to_device: bool = True
    tokenizer: Any = None
    default_prepend_bos: bool | None = None
    default_padding_side: PaddingSide | None = None
    hf_model: Any = None
    device_map: Any = None
    max_memory: Any = None
    n_devices: int | None = None
    offload: str | None = None
    offload_dir: Any = None
    pipeline_ranks: int | None = None
    pipeline_timeout: Any = None
    compile: bool | dict[str, Any] = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.default_padding_side not in (None, "left", "right"):
            raise ValueError(f"default_padding_side must be 'left' or 'right', got {self.default_padding_side!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise QuantizeError(f"quantize={self.quantize!r} is not a choice: {CHOICES_TEXT}")
        if not isinstance(self.compile, (bool, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile arguments, got {self.compile!r}")

    @classmethod
    def of(cls, options: LoadOptions | None = None, **kwargs: Any) -> LoadOptions:
        """``options`` (default: the defaults) with ``kwargs`` replacing fields; an unknown
        keyword raises a ``TypeError`` that lists the known ones."""
        for alias, name in _ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if value is not None:
                    kwargs[name] = value
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(
                f"from_pretrained got unknown option(s) {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(known + sorted(_ALIASES))}"
            )
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    @property
    def processing(self) -> ProcessingOptions:
        """The processing fields as ``processing.ProcessingOptions``."""
        return ProcessingOptions(
            fold_ln=self.fold_ln,
            center_writing_weights=self.center_writing_weights,
            center_unembed=self.center_unembed,
            fold_value_biases=self.fold_value_biases,
            refactor_factored_attn_matrices=self.refactor_factored_attn_matrices,
        )
