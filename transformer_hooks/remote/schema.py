"""What travels between ``RemoteModel`` and the server: requests as data, tensors as safetensors.

A request is JSON validated by pydantic: prompts (strings) or token ids, the sites to
return, and interventions, each a small record naming a site, an operation and its data.
Nothing in a request is code: no pickle, no eval, no callables. Tensors travel as a
safetensors file, base64 in JSON (``encode_tensors`` / ``decode_tensors``); an intervention
names its tensor by key.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = [
    "OPS",
    "AttributionRequest",
    "DLARequest",
    "GenerateRequest",
    "Intervention",
    "LensRequest",
    "Metric",
    "ParamsRequest",
    "PatchRequest",
    "RunRequest",
    "TokenizeRequest",
    "decode_tensors",
    "encode_tensors",
]

OPS = ("set", "add", "scale", "zero", "mean_ablate", "patch", "steer")

# Bounds on what one request may name (the per-token limits come on top of these).
MAX_NAME = 200  # characters of a site name or glob
MAX_ITEMS = 4096  # prompts, sites, interventions, selector entries
MAX_TEXT = 100_000  # characters of one prompt

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Index = Annotated[int, Field(ge=-(2**31), lt=2**31)]
Selector = Index | Annotated[list[Index], Field(min_length=1, max_length=MAX_ITEMS)] | None


def encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """A dict of tensors as base64 of a safetensors file ("" for none)."""
    if not tensors:
        return ""
    plain, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        plain[k] = v
    return base64.b64encode(st_save(plain)).decode("ascii")


def decode_tensors(data: str) -> dict[str, torch.Tensor]:
    """The tensors in ``data``, the inverse of ``encode_tensors``; ValueError for anything that is not one."""
    if not data:
        return {}
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"tensors: not base64 ({e})") from None
    try:
        return dict(st_load(raw))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"tensors: not a safetensors file ({type(e).__name__}: {e})") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Intervention(_Strict):
    """One edit of one site's activation, for some prompts of the request.

    ``op``: ``set`` (value := tensor), ``add`` (value += coeff * tensor), ``steer`` (the same
    as add), ``scale`` (value *= coeff), ``zero``, ``mean_ablate`` (the mean over the
    ``reference`` prompts' clean activations at each position, as ``ablation_value(kind="mean")``),
    ``patch`` (the clean activation of prompt ``from_prompt`` of the same request).
    ``tensor``: the key of a tensor in the request's ``tensors``, broadcast to the selection.
    ``pos`` / ``head``: the positions and heads to edit (all when None; negative count from
    the end). ``prompts``: the request's prompts to edit (all when None).
    Interventions at a site apply in the order given.
    """

    site: Name
    op: Literal["set", "add", "scale", "zero", "mean_ablate", "patch", "steer"]
    tensor: Name | None = None
    coeff: float = 1.0
    from_prompt: Index | None = None
    reference: Annotated[list[Index], Field(max_length=MAX_ITEMS)] | None = None
    prompts: Annotated[list[Index], Field(max_length=MAX_ITEMS)] | None = None
    pos: Selector = None
    head: Selector = None

    @model_validator(mode="after")
    def _fields_of_op(self) -> Intervention:
        needs_tensor = self.op in ("set", "add", "steer")
        if needs_tensor and self.tensor is None:
            raise ValueError(f"op {self.op!r} needs 'tensor' (the key of a tensor in 'tensors')")
        if not needs_tensor and self.tensor is not None:
            raise ValueError(f"op {self.op!r} takes no 'tensor'")
        if (self.op == "patch") != (self.from_prompt is not None):
            raise ValueError("'from_prompt' goes with op 'patch', and op 'patch' needs it")
        if self.reference is not None and self.op != "mean_ablate":
            raise ValueError("'reference' goes with op 'mean_ablate' only")
        return self


class _Input(_Strict):
    """Prompts (strings) or token ids; ``attention_mask`` only with token ids."""

    prompts: Annotated[list[Text], Field(min_length=1, max_length=MAX_ITEMS)] | None = None
    tokens: Annotated[list[list[Index]], Field(min_length=1, max_length=MAX_ITEMS)] | None = None
    attention_mask: list[list[Literal[0, 1]]] | None = None
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> _Input:
        if (self.prompts is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompts' (strings) and 'tokens' (token ids)")
        if self.attention_mask is not None and self.tokens is None:
            raise ValueError("'attention_mask' goes with 'tokens' (prompts make their own)")
        return self


class RunRequest(_Input):
    """One forward: logits and the activations of ``sites`` (names or globs), with interventions."""

    sites: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []
    interventions: Annotated[list[Intervention], Field(max_length=MAX_ITEMS)] = []
    tensors: str = ""
    return_logits: bool = True
    timeout: float | None = Field(default=None, gt=0)


class TokenizeRequest(_Input):
    """A ``tokenize`` request: prompts or token ids (the fields of every input)."""

    pass


class Metric(_Strict):
    """A named metric of the patched logits: ``logit_diff`` is
    ``logits[:, pos, answer] - logits[:, pos, contrast]`` averaged over the batch
    (``scale.distributed.logit_diff_metric``); ``logit`` is ``logits[:, pos, answer]``."""

    name: Literal["logit_diff", "logit"]
    answer: Index
    contrast: Index | None = None
    pos: Index = -1

    @model_validator(mode="after")
    def _contrast(self) -> Metric:
        if (self.name == "logit_diff") != (self.contrast is not None):
            raise ValueError("metric 'logit_diff' needs 'contrast'; metric 'logit' takes none")
        return self


class PatchRequest(_Strict):
    """A ``get_act_patch_*`` sweep: patch the clean prompt's activations into the corrupted one."""

    sweep: Name
    clean: _Input
    corrupted: _Input
    metric: Metric
    metric_positions: Index | None = None
    timeout: float | None = Field(default=None, gt=0)


class AttributionRequest(_Strict):
    """A ``get_attr_patch_*`` estimate (AtP, or AtP* with ``method="atp*"``)."""

    sweep: Name
    clean: _Input
    corrupted: _Input
    metric: Metric
    method: Literal["atp", "atp*"] = "atp"
    grad_drop: bool = False
    timeout: float | None = Field(default=None, gt=0)


class DLARequest(_Strict):
    """``analysis.dla.direct_logit_attribution`` of one prompt."""

    prompt: Text
    answer: Text
    contrast: Text
    pos: Index = -1
    timeout: float | None = Field(default=None, gt=0)


class LensRequest(_Input):
    """``analysis.lens.logit_lens`` of the input."""

    lens_sites: Annotated[list[Name], Field(min_length=1, max_length=16)] | None = None
    pos: Index | None = None
    top_k: int = Field(default=5, ge=1, le=1000)
    timeout: float | None = Field(default=None, gt=0)


class GenerateRequest(_Input):
    """``model.generate`` (greedy unless ``do_sample``, then seeded), optionally steered:
    ``interventions`` may only be ``steer``/``add`` (``steering.steering``, positions as ``pos``)."""

    max_new_tokens: int = Field(default=10, ge=0, le=100_000)
    do_sample: bool = False
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop_at_eos: bool = True
    interventions: Annotated[list[Intervention], Field(max_length=64)] = []
    tensors: str = ""
    timeout: float | None = Field(default=None, gt=0)


class ParamsRequest(_Strict):
    """Parameters by name or glob (what the client's ActivationCache needs for DLA)."""

    names: Annotated[list[Name], Field(min_length=1, max_length=MAX_ITEMS)]
