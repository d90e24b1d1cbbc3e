"""Small helpers with TransformerLens's names: ``get_act_name``, ``Slice``, ``test_prompt``
and ``to_numpy``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import sites

if TYPE_CHECKING:
    from .model import HookedTransformer


# TransformerLens's compact form: "k6" -> ("k", 6), "scale4ln1" -> ("scale", 4, "ln1").
_COMPACT = re.compile(r"^([a-z_]+?)(\d+)(ln1|ln2|ln_final|a|m|b|block|attn|mlp)?$")


def get_act_name(
    name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None
) -> str:
    """TransformerLens's shorthand: ``get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"``.

    ``("scale", 2, "ln1")`` -> ``blocks.2.ln1.hook_scale``; ``("scale",)`` -> ``ln_final.hook_scale``;
    ``("normalized", 2, "ln2")`` likewise. ``"k6"`` means ``("k", 6)`` and ``"scale4ln1"``
    ``("scale", 4, "ln1")``, as in TL. A full hook name passes through. Negative layers
    count from the end when ``n_layers`` is given; with ``n_layers``, a layer out of range
    is an error. The short names are the ``aliases`` of ``sites.SITES``.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name not in sites.ALIASES and layer is None and (m := _COMPACT.match(name)):
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or layer_type
    rows = sites.by_alias(name)
    if not rows:
        raise ValueError(
            f"unknown activation name {name!r}; known short names: "
            f"{sorted(sites.ALIASES)}, or a full hook name like 'blocks.0.hook_resid_pre'"
        )
    if layer is not None:
        layer = check_layer(layer, n_layers) if n_layers is not None else layer
        if layer < 0:
            raise ValueError(f"negative layer {layer} needs n_layers to count from the end")
    top = [s for s in rows if not s.per_block]
    block = [s for s in rows if s.per_block]
    if layer is None or not block:
        if not top:
            raise ValueError(f"{name!r} is a per-layer site: give a layer, e.g. get_act_name({name!r}, 0)")
        return top[0].name
    if len(block) > 1:  # one per norm of the block: layer_type picks it (TL's default: ln1)
        owners = [s.sublayer for s in block]
        owner = layer_type or owners[0]
        if owner not in owners:
            raise ValueError(f"layer_type for {name!r} must be {' or '.join(map(repr, owners))}, got {owner!r}")
        return block[owners.index(owner)].full_name(layer)
    return block[0].full_name(layer)


class IndexOutOfRangeError(IndexError, ValueError):
    """An index (layer, position, ...) outside its range; both an IndexError and a ValueError."""


def check_index(
    index: int, size: int, what: str, of: str, allow_end: bool = False, allow_negative: bool = True, note: str = ""
) -> int:
    """``index`` into ``range(size)`` (``range(size + 1)`` with ``allow_end``), negative values
    counting back from ``size`` (unless not ``allow_negative``); the one range check of the package.

    The error names the value, what it indexes (``of``, e.g. "a model with 4 layers") and the
    valid range: ``layer=5 is out of range for a model with 4 layers (valid: -4..3)``.
    """
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{what} must be an int, got {type(index).__name__}")
    idx = index + size if index < 0 and allow_negative else index
    lo, hi = (-size if allow_negative else 0), (size if allow_end else size - 1)
    if not 0 <= idx <= hi:
        raise IndexOutOfRangeError(
            f"{what}={index} is out of range for {of} (valid: {lo}..{hi}{'; ' + note if note else ''})"
        )
    return idx


def check_layer(layer: int, n_layers: int, what: str = "layer", allow_end: bool = False) -> int:
    """A block index in ``[0, n_layers)`` (``allow_end``: up to ``n_layers``, the unembedding);
    negative counts from the end. Raises when out of range."""
    return check_index(layer, n_layers, what, f"a model with {n_layers} layers", allow_end=allow_end)


SliceInput = None | int | slice | tuple | Sequence[int] | torch.Tensor


class Slice:
    """TransformerLens's ``Slice``: one way to say which entries of a dimension to keep.

    - ``None``: all of them;
    - an int: that one, and the dimension disappears (``pos_slice=-1``: the last position);
    - a tuple ``(start, stop[, step])`` or a ``slice``: a range;
    - a list or 1-D tensor of indices.
    """

    slice: Any  # a slice, an int or a 1-D index tensor, as self.mode says

    def __init__(self, input_slice: "SliceInput | Slice" = None) -> None:
        if isinstance(input_slice, Slice):
            input_slice = input_slice.slice
        if isinstance(input_slice, tuple):
            input_slice = slice(*input_slice)
        if input_slice is None:
            self.slice, self.mode = slice(None), "empty"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, int) and not isinstance(input_slice, bool):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, (list, torch.Tensor)) or hasattr(input_slice, "__len__"):
            self.slice, self.mode = torch.as_tensor(input_slice, dtype=torch.long), "array"
        else:
            raise ValueError(
                f"cannot make a slice from {input_slice!r}: pass None, an int, a (start, stop) tuple, "
                f"a slice, or a list of indices"
            )

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``tensor`` with this slice applied along ``dim``."""
        if self.mode == "empty":
            return tensor
        if self.mode == "int":
            check_index(self.slice, tensor.shape[dim], "position/index", f"a dimension of size {tensor.shape[dim]}")
            return tensor.select(dim, self.slice)
        if self.mode == "array":
            return tensor.index_select(dim, self.slice.to(tensor.device) % tensor.shape[dim])
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int) -> torch.Tensor:
        """The kept indices of a dimension of size ``max_ctx`` (negative ones made positive)."""
        return torch.atleast_1d(self.apply(torch.arange(max_ctx), 0))

    @staticmethod
    def unwrap(input_slice: "SliceInput | Slice") -> "Slice":
        return input_slice if isinstance(input_slice, Slice) else Slice(input_slice)

    def __repr__(self) -> str:
        return f"Slice({self.slice!r})"


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor (detached, on the CPU), list or number as a numpy array."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def test_prompt(
    prompt: str,
    answer: str | Sequence[str],
    model: HookedTransformer,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> list[list[tuple[str, int]]]:
    """Print how ``model`` ranks ``answer`` after ``prompt`` (TransformerLens's ``test_prompt``).

    For each token of the answer (fed to the model after the prompt, so a multi-token answer
    is scored token by token): its rank, logit and probability, and the ``top_k`` tokens at
    that position; then the ranks of all answer tokens. ``answer`` may be a list of answers,
    each scored on its own. Returns ``[(answer token, rank), ...]`` per answer.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0]
    ranks_per_answer = []
    for text in answers:
        if prepend_space_to_answer and not text.startswith(" "):
            text = " " + text
        answer_tokens = model.to_tokens(text, prepend_bos=False)[0].to(prompt_tokens.device)
        with torch.no_grad():
            logits = model(torch.cat([prompt_tokens, answer_tokens])[None])[0].float()
        # The prediction of answer token i is at the position before it.
        predictions = logits[len(prompt_tokens) - 1 : -1]
        probs = predictions.softmax(-1)
        str_answer: list[str] = model.to_str_tokens(answer_tokens)  # type: ignore[assignment]  # one sequence
        if print_details:
            print("Tokenized prompt:", model.to_str_tokens(prompt_tokens))
            print("Tokenized answer:", str_answer)
        ranks = []
        for i, (token, token_str) in enumerate(zip(answer_tokens.tolist(), str_answer, strict=True)):
            rank = int((predictions[i] > predictions[i, token]).sum())
            ranks.append((token_str, rank))
            if print_details:
                print("Performance on answer token:")
                print(
                    f"Rank: {rank: <8} Logit: {predictions[i, token]:5.2f} Prob: {probs[i, token]:6.2%} "
                    f"Token: |{token_str}|"
                )
                for k, top in enumerate(predictions[i].topk(min(top_k, predictions.shape[-1])).indices.tolist()):
                    print(
                        f"Top {k}th token. Logit: {predictions[i, top]:5.2f} Prob: {probs[i, top]:6.2%} "
                        f"Token: |{model.to_string([top])}|"
                    )
        print("Ranks of the answer tokens:", ranks)
        ranks_per_answer.append(ranks)
    return ranks_per_answer
