"""Small helpers with TransformerLens's names: ``get_act_name``, ``Slice``, ``test_prompt``
and ``to_numpy``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import sites

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
    is an error. ``layer_type`` picks the norm of a per-norm site (``scale``, ``normalized``:
    ``"ln1"``, the default, or ``"ln2"``). The short names are the ``aliases`` of ``sites.SITES``.
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


class CheckError(ValueError, AssertionError):
    """An argument TransformerLens rejects with an ``assert``: both a ValueError (this library's
    error for a bad argument) and an AssertionError, so ``pytest.raises(AssertionError)`` and
    ``except AssertionError`` in ported code still catch it."""


class BroadcastError(CheckError, RuntimeError):
    """Leading (batch) dimensions that do not broadcast: TransformerLens lets torch raise its
    ``RuntimeError`` there, so this is that too, beside a ``CheckError``."""


class IndexOutOfRangeError(IndexError, ValueError):
    """An index (layer, position, ...) outside its range; both an IndexError and a ValueError."""


class IndexTypeError(TypeError, ValueError):
    """An index (layer, position, ...) that is not an integer; both a TypeError and a ValueError."""


def check_index(
    index: int, size: int, what: str, of: str, allow_end: bool = False, allow_negative: bool = True, note: str = ""
) -> int:
    """``index`` into ``range(size)`` (``range(size + 1)`` with ``allow_end``), negative values
    counting back from ``size`` (unless not ``allow_negative``); the one range check of the package.

    The error (ValueError) names the value as ``what``, what it indexes (``of``, e.g. "a model
    with 4 layers"), the valid range and ``note`` if given:
    ``layer=5 is out of range for a model with 4 layers (valid: -4..3)``.
    """
    if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.is_floating_point():
        index = int(index)  # a 0-d integer tensor, as TransformerLens code often passes
    if not isinstance(index, int) or isinstance(index, bool):
        raise IndexTypeError(
            f"{what} must be an int, got {type(index).__name__} {index!r} "
            f"(valid: {-size if allow_negative else 0}..{size if allow_end else size - 1})"
        )
    idx = index + size if index < 0 and allow_negative else index
    lo, hi = (-size if allow_negative else 0), (size if allow_end else size - 1)
    if not 0 <= idx <= hi:
        raise IndexOutOfRangeError(
            f"{what}={index} is out of range for {of} (valid: {lo}..{hi}{'; ' + note if note else ''})"
        )
    return idx


def check_layer(layer: int, n_layers: int, what: str = "layer", allow_end: bool = False) -> int:
    """``layer`` as a block index in ``[0, n_layers)`` (``allow_end``: up to ``n_layers``, the
    unembedding); negative counts from the end. Raises when out of range, naming it ``what``."""
    return check_index(layer, n_layers, what, f"a model with {n_layers} layers", allow_end=allow_end)


SliceInput = None | int | slice | tuple | Sequence[int] | torch.Tensor


class Slice:
    """TransformerLens's ``Slice``: one way to say which entries of a dimension to keep.

    - ``None``: all of them;
    - an int (or a 0-d tensor or array, as TransformerLens takes it): that one, and the
      dimension disappears (``pos_slice=-1``: the last position);
    - a tuple ``(start, stop[, step])`` or a ``slice``: a range;
    - a list or 1-D tensor of indices.

    Args:
        input_slice: one of the above (or a ``Slice``, copied).
    """

    slice: Any  # a slice, an int or a 1-D index tensor, as self.mode says

    def __init__(self, input_slice: "SliceInput | Slice" = None) -> None:
        if isinstance(input_slice, Slice):
            input_slice = input_slice.slice
        if isinstance(input_slice, tuple):
            input_slice = slice(*input_slice)
        if isinstance(input_slice, (torch.Tensor, np.ndarray)) and input_slice.ndim == 0:
            input_slice = int(input_slice.item())  # a 0-d index drops the dimension, as an int does
        if isinstance(input_slice, np.integer):
            input_slice = int(input_slice)
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
            size = tensor.shape[dim]
            outside = self.slice[(self.slice >= size) | (self.slice < -size)]
            if outside.numel():  # an index past the end raises, as an int does (never wraps around)
                check_index(int(outside[0]), size, "position/index", f"a dimension of size {size}")
            return tensor.index_select(dim, self.slice.to(tensor.device) % size)
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> torch.Tensor:
        """The kept indices of a dimension of size ``max_ctx`` (negative ones made positive).
        An int slice needs no size (its one index, as given); other slices do."""
        if max_ctx is None:
            if self.mode != "int":
                raise ValueError(f"{self!r}.indices() needs max_ctx, the size of the dimension it slices")
            return torch.tensor([self.slice])
        return torch.atleast_1d(self.apply(torch.arange(max_ctx), 0))

    @staticmethod
    def unwrap(input_slice: "SliceInput | Slice") -> "Slice":
        """``input_slice`` as a ``Slice`` (itself if it is one)."""
        return input_slice if isinstance(input_slice, Slice) else Slice(input_slice)

    def __repr__(self) -> str:
        return f"Slice({self.slice!r})"


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor (detached, on the CPU; bfloat16, which numpy lacks, as float32), list or number
    as a numpy array."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return np.asarray(tensor)


def test_prompt(
    prompt: str,
    answer: str | Sequence[str],
    model: Any,  # a HookedTransformer: utils sits below model.py, so it is not imported here
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> list[list[tuple[str, int]]] | None:
    """Print how ``model`` ranks ``answer`` after ``prompt`` (TransformerLens's ``test_prompt``).

    For each token of the answer (fed to the model after the prompt, so a multi-token answer
    is scored token by token): its rank, logit and probability, and the ``top_k`` tokens at
    that position; then the ranks of all answer tokens. ``answer`` may be a list of answers,
    each scored on its own. Returns ``[(answer token, rank), ...]`` per answer.

    ``prepend_space_to_answer``: put a space before an answer that does not start with one.
    ``print_details``: print each token's details (else only the ranks). ``prepend_bos``: for
    the prompt, as in ``model.to_tokens``.

    On a model split over processes (``pipeline_ranks``) every rank calls it alike; rank 0
    prints and returns the ranks, the other ranks run their blocks and return None.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0]
    ranks_per_answer = []
    for text in answers:
        if prepend_space_to_answer and not text.startswith(" "):
            text = " " + text
        answer_tokens = model.to_tokens(text, prepend_bos=False)[0].to(prompt_tokens.device)
        with torch.no_grad():
            output = model(torch.cat([prompt_tokens, answer_tokens])[None])
        if output is None:  # another rank of a split model gets the logits
            continue
        logits = output[0].float()
        # The prediction of answer token i is at the position before it.
        predictions = logits[len(prompt_tokens) - 1 : -1]
        probs = predictions.softmax(-1)
        str_answer: list[str] = model.to_str_tokens(answer_tokens)  # one sequence
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
    return ranks_per_answer if model.blocks.gets_output else None


# More of TransformerLens's ``utils`` (the names its tutorials import) -----------------------------
def get_device() -> torch.device:
    """The best device here: CUDA, then Apple's MPS, else the CPU (TransformerLens's choice)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The top-left ``n x n x ...`` corner of a tensor (or a ``FactoredMatrix``, via its ``get_corner``)."""
    if hasattr(tensor, "get_corner"):
        return tensor.get_corner(n)
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its first axis if that axis has size 1; otherwise unchanged."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its last two axes swapped."""
    return tensor.transpose(-1, -2)


def is_square(x: torch.Tensor) -> bool:
    """Whether ``x`` is a square 2-D tensor."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: torch.Tensor) -> bool:
    """Whether ``x`` is a square 2-D tensor with zeros above the diagonal."""
    return is_square(x) and bool(x.equal(x.tril()))


def get_cumsum_along_dim(tensor: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum of ``tensor`` along ``dim`` (from the end with ``reverse``)."""
    if reverse:
        return tensor.flip(dims=(dim,)).cumsum(dim=dim).flip(dims=(dim,))
    return tensor.cumsum(dim=dim)


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting the real tokens of ``attention_mask`` only
    (padding gets 0), from ``past_kv_pos_offset`` on.
    """
    positions = attention_mask.cumsum(dim=1) - 1
    return positions.masked_fill(positions < 0, 0)[:, past_kv_pos_offset:]


def repeat_along_head_dimension(tensor: torch.Tensor, n_heads: int, clone_tensor: bool = True) -> torch.Tensor:
    """``tensor`` [batch, pos, d_model] -> [batch, pos, n_heads, d_model] (a copy per head unless not
    ``clone_tensor``).
    """
    repeated = tensor[:, :, None, :].expand(-1, -1, n_heads, -1)
    return repeated.clone() if clone_tensor else repeated


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """The entries of ``dictionary`` whose key starts with ``prefix`` (a dot is implied), with the prefix removed."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(prefix) :]: v for k, v in dictionary.items() if k.startswith(prefix)}


def get_nested_attr(obj: Any, attr_str: str) -> Any:
    """The attribute of ``obj`` at the dotted path ``attr_str`` (``get_nested_attr(model, "blocks.0.attn")``); integer
    parts index sequences.
    """
    for part in attr_str.split("."):
        obj = obj[int(part)] if part.isdigit() and not hasattr(obj, part) else getattr(obj, part)
    return obj


def set_nested_attr(obj: Any, attr_str: str, value: Any) -> None:
    """Set ``obj.a.b.c = value`` for ``attr_str = "a.b.c"``."""
    head, _, leaf = attr_str.rpartition(".")
    setattr(get_nested_attr(obj, head) if head else obj, leaf, value)


def gelu_new(input: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (the tanh approximation) of ``input``."""
    return 0.5 * input * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


def gelu_fast(input: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation of ``input`` as GPT-2's ``gelu_fast`` writes it."""
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


def solu(input: torch.Tensor) -> torch.Tensor:
    """SoLU of ``input``: x * softmax(x) over the last axis."""
    return input * input.softmax(dim=-1)


def is_library_available(name: str) -> bool:
    """Whether the package ``name`` can be imported."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def print_gpu_mem(step_name: str = "") -> None:
    """Print the CUDA memory allocated, after ``step_name`` (nothing without CUDA)."""
    if torch.cuda.is_available():
        print(f"{step_name} ~ {np.round(torch.cuda.memory_allocated() / 2e30, 2)} GiB allocated on GPU.")
    else:
        print(f"{step_name}: no CUDA device")


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions count, ``[batch, pos-1]`` (bool): those of a real token from a
    real token (``attention_mask[:, i]`` and ``attention_mask[:, i+1]`` both 1). The one masking
    rule of every next-token loss here (the model's, ``loss_fn``, the SAE evaluation's)."""
    return attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()


def lm_cross_entropy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy, -log p(tokens[:, i+1] | logits[:, i]), computed in float32: the
    one implementation (the model's ``return_type="loss"`` and ``loss_fn`` call it).

    ``per_token``: ``[batch, pos-1]``; otherwise the mean over the predictions that count. With
    ``attention_mask`` only the pairs ``next_token_mask`` keeps count (a real token predicted from
    a real token), and the others are 0 in the per-token loss, as in TransformerLens."""
    if tokens.shape[-1] < 2:
        raise ValueError("a next-token loss needs at least two tokens per row; got one")
    log_probs = logits[..., :-1, :].float().log_softmax(dim=-1)
    nll = -log_probs.gather(dim=-1, index=tokens[..., 1:, None])[..., 0]  # [batch, pos-1]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(attention_mask.shape)}"
        )
    keep = next_token_mask(attention_mask)
    nll = nll.masked_fill(~keep, 0.0)
    if per_token:
        return nll
    if not keep.any():
        raise ValueError("a next-token loss needs two consecutive real tokens; the attention mask leaves none")
    return nll.sum() / keep.sum()


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy of ``logits`` [batch, pos, d_vocab] on ``tokens`` [batch, pos]:
    the mean, or with ``per_token`` a bool [batch, pos-1]."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def get_attention_mask(tokenizer: Any, tokens: torch.Tensor, prepend_bos: bool, padding_side: str | None = None):
    """TransformerLens's rule for the mask of tokens padded by ``tokenizer``: 1 for real tokens,
    0 for the run of pad tokens at the padded end (left: the leading ones; right: the trailing
    ones). Pad tokens inside the text stay attended. With left padding and ``prepend_bos``, a BOS
    that equals the pad token is unmasked (the last of the leading pad run). ``padding_side``:
    None for the tokenizer's."""
    mask = torch.ones_like(tokens)
    if tokenizer is None:
        return mask
    side = padding_side or tokenizer.padding_side
    is_real = tokens.ne(tokenizer.pad_token_id)
    if side == "right":
        mask[get_cumsum_along_dim(is_real, -1, reverse=True) == 0] = 0
    else:
        leading = get_cumsum_along_dim(is_real, -1) == 0
        mask[leading] = 0
        if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
            mask[torch.arange(mask.shape[0], device=mask.device), leading.sum(-1) - 1] = 1
    return mask


def get_input_with_manually_prepended_bos(bos_token: str | None, input: str | list[str]) -> str | list[str]:
    """``input`` (a string or strings) with the BOS string ``bos_token`` prepended to each (unchanged when None)."""
    if bos_token is None:
        return input
    return bos_token + input if isinstance(input, str) else [bos_token + s for s in input]


def get_tokens_with_bos_removed(tokenizer: Any, tokens: torch.Tensor, padding_side: str | None = None):
    """``tokens`` without the BOS of each row (with left padding, the BOS after the padding), by
    ``tokenizer``'s BOS and pad ids; ``padding_side``: None for the tokenizer's. Unchanged without a BOS."""
    if tokenizer.bos_token_id is None:
        return tokens
    if (padding_side or tokenizer.padding_side) == "right":
        return tokens[..., 1:]
    shape = list(tokens.shape)
    shape[-1] -= 1
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        leading = get_cumsum_along_dim(tokens.ne(tokenizer.pad_token_id), -1) == 0
        bos_positions = leading.sum(-1) - 1
    else:
        bos_positions = (tokens == tokenizer.bos_token_id).int().argmax(-1)
    keep = torch.ones_like(tokens, dtype=torch.bool).scatter(-1, bos_positions.unsqueeze(-1), False)
    return tokens[keep].view(*shape)


def get_tokenizer_with_bos(tokenizer: Any) -> Any:
    """The tokenizer itself: this library prepends BOS itself (``prepend_bos``), never the tokenizer."""
    return tokenizer


def keep_single_column(dataset: Any, col_name: str) -> Any:
    """``dataset`` (a ``datasets.Dataset``) with only ``col_name`` (TransformerLens's helper)."""
    return dataset.remove_columns([c for c in dataset.features if c != col_name])


def tokenize_and_concatenate(
    dataset: Any,
    tokenizer: Any,
    streaming: bool = False,
    max_length: int = 1024,
    column_name: str = "text",
    add_bos_token: bool = True,
    num_proc: int | None = 10,
) -> Any:
    """Tokenize each document, join them with an EOS token between documents, and cut the
    stream into rows of ``max_length`` tokens (each starting with BOS if ``add_bos_token``);
    the incomplete last row is dropped, as in TransformerLens 3.9.

    ``dataset``: a ``datasets.Dataset`` (returns one, with a ``"tokens"`` column in torch
    format), a list of strings or of ``{column_name: text}`` dicts (returns a dict
    ``{"tokens": LongTensor [rows, max_length]}``). Needs no network. ``tokenizer``: the HF
    tokenizer (it needs an EOS token). ``streaming`` and ``num_proc`` are TransformerLens's
    and ignored: documents are tokenized in this process, in one pass."""
    texts = _texts_of(dataset, column_name)
    seq_len = max_length - 1 if add_bos_token else max_length
    if seq_len < 1:
        raise ValueError(f"max_length={max_length} leaves no room for tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate needs a tokenizer with an EOS token (it separates documents)")
    ids: list[int] = []
    for i, row in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        ids.extend(row)
        if i < len(texts) - 1:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < seq_len:  # TransformerLens pads one short row with EOS (or the pad token)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = ids + [pad] * (seq_len - len(ids))
    n_rows = len(ids) // seq_len
    tokens = torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).reshape(n_rows, seq_len)
    if add_bos_token:
        bos = torch.full((n_rows, 1), tokenizer.bos_token_id, dtype=torch.long)
        tokens = torch.cat([bos, tokens], dim=1)
    if _is_hf_dataset(dataset):
        import datasets

        return datasets.Dataset.from_dict({"tokens": tokens.tolist()}).with_format("torch")
    return {"tokens": tokens}


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets")


def _texts_of(dataset: Any, column_name: str) -> list[str]:
    if _is_hf_dataset(dataset):
        return list(dataset[column_name])
    if isinstance(dataset, str):
        return [dataset]
    rows = list(dataset)
    return [row[column_name] if isinstance(row, dict) else row for row in rows]
