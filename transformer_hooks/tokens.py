"""Text <-> tokens for a model: tokenizing with BOS and padding, checking token ids and
attention masks, and TransformerLens's ``to_tokens`` / ``to_string`` / ``to_str_tokens`` /
``to_single_token`` / ``get_token_position``.

Plain functions of ``(tokenizer, cfg)``: they need the tokenizer (a HF tokenizer, or None
for a model run on token ids) and a few config facts (``default_prepend_bos``,
``bos_token_id``, ``pad_token_id``/``eos_token_id``, ``d_vocab``, ``n_ctx`` for learned
positions), not the model. ``TokenMethods`` (at the end) gives ``HookedTransformer`` the
methods of the same names, which call them with its own tokenizer, config and device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import torch
from jaxtyping import Int

from .config import ModelConfig
from .utils import CheckError, get_attention_mask

TextInput = str | Sequence[str]
ModelInput = TextInput | Int[torch.Tensor, " batch pos"] | Int[torch.Tensor, " pos"]
PaddingSide = Literal["left", "right"]


def require_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or an error saying what to pass instead."""
    if tokenizer is None:
        # a CheckError (also an AssertionError, as TransformerLens's assert)
        raise CheckError("this model has no tokenizer: pass token ids, or set model.tokenizer")
    return tokenizer


def pad_id(tokenizer: Any, cfg: ModelConfig) -> int:
    """The id that fills padding: ``tokenizer``'s pad token, else ``cfg``'s, else an end token, else 0."""
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        cfg.pad_token_id,
        getattr(tokenizer, "eos_token_id", None),
        cfg.eos_token_id,
    ):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (tuple, list)) else candidate)  # several EOS: the first
    return 0


def bos_id(tokenizer: Any, cfg: ModelConfig) -> int:
    """The BOS id of ``tokenizer``, else ``cfg.bos_token_id``; ValueError when neither has one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = cfg.bos_token_id if bos is None else bos
    if bos is None:
        raise ValueError("this tokenizer has no BOS token; pass prepend_bos=False")
    return int(bos)


# Architectures whose BOS token is also their EOS token but which are run without it: GPT-NeoX
# (Pythia's "<|endoftext|>" is both), as TransformerLens 3.9 and 4.3 run it and as published
# Pythia analyses rely on.
NO_SEPARATOR_BOS = frozenset({"GPTNeoXForCausalLM"})


def tokenizer_adds_bos(tokenizer: Any) -> bool | None:
    """Whether ``tokenizer`` itself puts its BOS token first (``tokenizer(text)`` with its
    default special tokens), found by tokenizing a probe both ways; None without a tokenizer."""
    if tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer.encode("The", add_special_tokens=True)
    without = tokenizer.encode("The", add_special_tokens=False)
    return len(with_special) > len(without) and with_special[0] == bos


def default_prepend_bos(tokenizer: Any, cfg: ModelConfig, adds_bos: bool | None = None) -> bool:
    """The BOS rule: whether prompts given as text start with the checkpoint's BOS token.

    Prepend BOS when the checkpoint's own tokenizer adds it (Llama 3 ``<|begin_of_text|>``,
    Gemma ``<bos>``, Mistral ``<s>``), or when the BOS token is the model's document
    separator, the same token as EOS (GPT-2 and GPT-Neo ``<|endoftext|>``: what
    TransformerLens users' GPT-2 numbers rely on). Never for a distinct BOS the tokenizer
    does not add (SmolLM2's ``<|im_start|>``, a chat marker; Qwen), nor without a BOS, nor
    for GPT-NeoX / Pythia (``NO_SEPARATOR_BOS``: BOS is EOS there too, but TransformerLens
    and Pythia's published work run it without).

    ``adds_bos`` is what decides for the tokenizer (``tokenizer_adds_bos``; a GGUF file's
    ``tokenizer.ggml.add_bos_token``, a converted checkpoint's stored answer); BOS and EOS
    are the tokenizer's tokens, else ``cfg``'s ids when there is no tokenizer.
    ``from_pretrained(default_prepend_bos=...)`` and every ``prepend_bos=`` override it.
    """
    if adds_bos is None:
        adds_bos = tokenizer_adds_bos(tokenizer)
    if adds_bos:
        return True
    if tokenizer is not None:
        bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    else:
        bos, eos = cfg.bos_token_id, cfg.eos_token_id
    return bos is not None and bos == eos and cfg.original_architecture not in NO_SEPARATOR_BOS


def is_text(input: Any) -> TypeGuard[TextInput]:
    """Whether ``input`` is a string or a non-empty list of strings (as opposed to token ids)."""
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and bool(input) and isinstance(input[0], str))


def check_mask(attention_mask: Any, shape: tuple[int, int], device: Any = None) -> Int[torch.Tensor, "batch pos"]:
    """``attention_mask`` as 0/1 longs on ``device``, checked to have the tokens' ``shape`` ([pos] becomes [1, pos]).

    Raises:
        ValueError: a shape other than the tokens' or a value other than 0 and 1.
    """
    mask = torch.as_tensor(attention_mask, device=device)
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, tokens {shape}; they must match")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1 (0 for padding, 1 for a real token); got other values")
    return mask.long()


def check_tokens(tokens: Any, cfg: ModelConfig, device: Any = None) -> Int[torch.Tensor, "batch pos"]:
    """``tokens`` (a tensor or lists of ids, [pos] or [batch, pos]) as a long tensor [batch, pos] on
    ``device``, each id checked to be inside ``cfg.d_vocab``.

    Raises:
        ValueError: empty input, rows of different lengths, float ids, more than 2 dimensions, or an id outside the
            vocabulary.
        TypeError: anything but a tensor or lists of ids.
    """
    if isinstance(tokens, (list, tuple)):
        if not tokens:
            raise ValueError("empty input: pass at least one token or a non-empty string")
        rows = tokens if isinstance(tokens[0], (list, tuple)) else [tokens]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"token lists of different lengths {sorted({len(r) for r in rows})}: pad them to "
                f"one length and pass attention_mask (or pass strings, which are padded for you)"
            )
        tokens = torch.tensor(tokens)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"input must be a string, a list of strings or a token tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be integer ids (torch.long), got dtype {tokens.dtype}; "
            f"use model.to_tokens(text) or tokens.long() if they are whole numbers"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos] or [pos], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"empty input (tokens of shape {tuple(tokens.shape)}): pass at least one token")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.d_vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {cfg.d_vocab}); "
            f"were these tokens made by another model's tokenizer?"
        )
    return tokens.to(device, torch.long)


def tokenize(
    tokenizer: Any,
    cfg: ModelConfig,
    input: TextInput,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    device: Any = None,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"] | None]:
    """Tokens of one string or a padded batch of strings, and the padding mask.

    Args:
        tokenizer: the HF tokenizer (ValueError when None).
        cfg: the model's config (``default_prepend_bos``, the pad and BOS ids).
        input: a string or a list of strings.
        prepend_bos: start each string with BOS (None: ``cfg.default_prepend_bos``).
        padding_side: ``"left"`` or ``"right"`` (None: the tokenizer's side, else right).
        device: where the tensors go.

    Returns:
        (tokens [batch, pos], mask [batch, pos] with 0 at padding, or None when nothing is padded).
    """
    tok = require_tokenizer(tokenizer)
    texts = [input] if isinstance(input, str) else list(input)
    prepend_bos = cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    ids = _encode(tok, texts)
    if prepend_bos:
        bos = bos_id(tok, cfg)
        ids = [[bos] + row for row in ids]
    if any(len(row) == 0 for row in ids):
        raise ValueError("empty prompt: a string with no tokens (and prepend_bos=False) cannot be run")
    width = max(len(row) for row in ids)
    side = padding_side or getattr(tok, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    tokens = torch.full((len(ids), width), pad_id(tok, cfg), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return tokens.to(device), None if bool(mask.all()) else mask.to(device)


def _encode(tok: Any, texts: list[Any]) -> list[list[int]]:
    """Token ids of each text; a text the tokenizer cannot encode is a ValueError naming it."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text input {i} is a {type(text).__name__}, not a string: {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"the tokenizer cannot encode {text!r}: {error.reason} at character {error.start} "
                f"({text[error.start : error.end]!r}); text must be valid Unicode (no lone surrogates)"
            ) from None
    try:
        return tok(texts, add_special_tokens=False)["input_ids"]
    except Exception as error:  # the tokenizer's own errors are terse (e.g. "TextEncodeInput must be ...")
        raise ValueError(f"the tokenizer cannot encode {texts!r}: {type(error).__name__}: {error}") from error


def left_padding_mask(
    tokenizer: Any, cfg: ModelConfig, tokens: Int[torch.Tensor, "batch pos"], prepend_bos: bool | None = None
) -> Int[torch.Tensor, "batch pos"] | None:
    """The mask TransformerLens 3.9 infers for token ids given without ``attention_mask``
    (``HookedTransformer.forward`` with ``utils.get_attention_mask``), or None where it infers
    none: only when the tokenizer pads on the left, each row's leading pad tokens are padding;
    when prompts start with BOS (``prepend_bos``, else ``cfg.default_prepend_bos``) and BOS is
    the pad token, the last leading pad is that row's BOS and stays real. Pad tokens after a
    real token are never padding; a right-padding tokenizer infers nothing (causal attention
    keeps right padding from reaching real tokens)."""
    if tokenizer is None or getattr(tokenizer, "padding_side", None) != "left":
        return None
    if getattr(tokenizer, "pad_token_id", None) is None:
        return None
    prepend_bos = cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    mask = get_attention_mask(tokenizer, tokens, prepend_bos, padding_side="left")
    return None if bool(mask.all()) else mask


def tokens_and_mask(
    tokenizer: Any,
    cfg: ModelConfig,
    input: ModelInput,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    attention_mask: Any = None,
    device: Any = None,
    infer_padding: bool = True,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"] | None]:
    """Tokens [batch, pos] on ``device``, checked, and the padding mask (or None).

    ``input`` is text (tokenized as ``tokenize`` does with ``tokenizer``, ``cfg``, ``prepend_bos``
    and ``padding_side``) or token ids (checked by ``check_tokens``). Token ids without
    ``attention_mask`` get TransformerLens's inferred mask (``left_padding_mask``) unless
    ``infer_padding`` is False (a decoding step); an ``attention_mask`` given replaces the mask.
    """
    if is_text(input):
        tokens, mask = tokenize(tokenizer, cfg, input, prepend_bos, padding_side, device)
    else:
        tokens = check_tokens(input, cfg, device)
        mask = left_padding_mask(tokenizer, cfg, tokens, prepend_bos) if infer_padding else None
    if attention_mask is not None:
        mask = check_mask(attention_mask, (tokens.shape[0], tokens.shape[1]), device)
    return tokens, mask


def to_tokens(
    tokenizer: Any,
    cfg: ModelConfig,
    input: TextInput,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    device: Any = None,
    truncate: bool = True,
) -> Int[torch.Tensor, "batch pos"]:
    """Token ids [batch, pos] of ``input``, tokenized as ``tokenize`` does (with ``tokenizer``,
    ``cfg``, ``prepend_bos``, ``padding_side``, ``device``); a list of strings is padded.
    ``truncate`` cuts learned-position models' input to ``n_ctx``.
    """
    tokens, _ = tokenize(tokenizer, cfg, input, prepend_bos, padding_side, device)
    if truncate and cfg.positional_embedding == "learned":
        tokens = tokens[:, : cfg.n_ctx]
    return tokens


def to_string(tokenizer: Any, tokens: Int[torch.Tensor, "... pos"] | int | Sequence[int]) -> str | list[str]:
    """``tokens`` decoded by ``tokenizer``: one string for a single sequence (or id), a list of strings for a batch."""
    tok = require_tokenizer(tokenizer)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim <= 1:
        return tok.decode(tokens.reshape(-1).tolist())
    return [tok.decode(row.tolist()) for row in tokens]


def to_str_tokens(
    tokenizer: Any,
    cfg: ModelConfig,
    input: str | torch.Tensor | Sequence[int] | Sequence[str],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> list[str] | list[list[str]]:
    """Each token of ``input`` as its own string, decoded by ``tokenizer``.

    ``input``: a string (tokenized with ``cfg``, ``prepend_bos`` and ``padding_side`` as in
    ``tokenize``), a list of strings, or token ids. Returns a list per sequence for a batch or a
    list of strings.
    """
    tok = require_tokenizer(tokenizer)
    if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
        return [to_str_tokens(tok, cfg, s, prepend_bos, padding_side) for s in input]  # type: ignore[return-value]  # one list[str] per string
    tokens = to_tokens(tok, cfg, input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
    if tokens.ndim == 2:
        if tokens.shape[0] != 1:
            return [to_str_tokens(tok, cfg, row) for row in tokens]  # type: ignore[return-value]  # one list[str] per row
        tokens = tokens[0]
    return [tok.decode([t]) for t in tokens.reshape(-1).tolist()]


def to_single_token(tokenizer: Any, cfg: ModelConfig, string: str) -> int:
    """The id of ``string``, tokenized by ``tokenizer`` and ``cfg`` without BOS; ValueError unless it is exactly one
    token.
    """
    tokens = to_tokens(tokenizer, cfg, string, prepend_bos=False)[0]
    if tokens.numel() != 1:
        raise ValueError(
            f"{string!r} is not a single token: it tokenizes as "
            f"{to_str_tokens(tokenizer, cfg, tokens)} ({tokens.numel()} tokens)"
        )
    return int(tokens[0])


def get_token_position(
    tokenizer: Any,
    cfg: ModelConfig,
    single_token: str | int,
    input: str | torch.Tensor,
    mode: Literal["first", "last"] = "first",
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> int:
    """The position of ``single_token`` (a string of one token, or an id) in one sequence.

    Args:
        tokenizer: the HF tokenizer.
        cfg: the model's config.
        single_token: a string that is one token, or a token id.
        input: a string (tokenized with ``prepend_bos`` and ``padding_side`` as in ``tokenize``)
            or the token ids of one sequence.
        mode: ``"first"`` or ``"last"`` occurrence.

    Raises:
        ValueError: a batch of more than one sequence, or a token that does not occur.
    """
    tokens = (
        to_tokens(tokenizer, cfg, input, prepend_bos, padding_side)
        if isinstance(input, str)
        else torch.as_tensor(input)
    )
    if tokens.ndim == 2:
        if tokens.shape[0] != 1:
            raise ValueError(f"get_token_position takes one sequence, got a batch of {tokens.shape[0]}")
        tokens = tokens[0]
    token = to_single_token(tokenizer, cfg, single_token) if isinstance(single_token, str) else int(single_token)
    hits = (tokens == token).nonzero().flatten().tolist()
    if not hits:
        raise ValueError(f"token {single_token!r} ({token}) does not occur in the input")
    return hits[0] if mode == "first" else hits[-1]


class TokenMethods:
    """TransformerLens's token methods (``model.to_tokens(...)`` and the rest): the functions
    above, called with the model's tokenizer, config and device. ``HookedTransformer`` inherits
    them; a method here calls the module function of the same name."""

    if TYPE_CHECKING:  # what the methods read; HookedTransformer sets or defines each
        tokenizer: Any
        cfg: ModelConfig

        @property
        def device(self) -> torch.device: ...

    def tokens_and_mask(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens.tokens_and_mask`` with the model's tokenizer, config and device: ``input``,
        ``prepend_bos``, ``padding_side`` and ``attention_mask`` as there.
        """
        return tokens_and_mask(self.tokenizer, self.cfg, input, prepend_bos, padding_side, attention_mask, self.device)

    def _check_mask(self, attention_mask: Any, shape: tuple[int, int]) -> torch.Tensor:
        return check_mask(attention_mask, shape, self.device)

    def to_tokens(
        self,
        input: TextInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids [batch, pos] of ``input`` (a string or strings; a list is padded).

        Args:
            input: a string or a list of strings.
            prepend_bos: start each string with BOS (None: the model's ``default_prepend_bos``).
            padding_side: ``"left"`` or ``"right"`` (None: the tokenizer's side).
            move_to_device: put the tokens on the model's device (else the CPU).
            truncate: cut a learned-position model's input to ``n_ctx``.
        """
        return to_tokens(
            self.tokenizer,
            self.cfg,
            input,
            prepend_bos,
            padding_side,
            self.device if move_to_device else "cpu",
            truncate,
        )

    def to_tokens_and_mask(
        self, input: TextInput, prepend_bos: bool | None = None, padding_side: PaddingSide | None = None
    ):
        """(tokens, attention_mask) of ``input`` for a padded batch; the mask is all ones without
        padding. ``prepend_bos`` and ``padding_side`` as in ``to_tokens``.
        """
        tokens, mask = tokenize(self.tokenizer, self.cfg, input, prepend_bos, padding_side, self.device)
        return tokens, torch.ones_like(tokens) if mask is None else mask

    def to_string(self, tokens: Int[torch.Tensor, "... pos"] | int | Sequence[int]) -> str | list[str]:
        """``tokens`` decoded: one string for one sequence (or id), a list of strings for a batch."""
        return to_string(self.tokenizer, tokens)

    def to_str_tokens(
        self,
        input: str | torch.Tensor | Sequence[int],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token of ``input`` (a string, strings or token ids) as its own string; a list per
        sequence for a batch. ``prepend_bos`` and ``padding_side`` as in ``to_tokens``.
        """
        return to_str_tokens(self.tokenizer, self.cfg, input, prepend_bos, padding_side)

    def to_single_token(self, string: str) -> int:
        """The id of ``string`` (no BOS); ValueError unless it is exactly one token."""
        return to_single_token(self.tokenizer, self.cfg, string)

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> int:
        """The position of ``single_token`` (a one-token string or an id) in ``input`` (a string or one
        sequence of ids): the ``mode="first"`` or ``"last"`` occurrence. ``prepend_bos`` and
        ``padding_side`` as in ``to_tokens``; ValueError if it does not occur.
        """
        return get_token_position(self.tokenizer, self.cfg, single_token, input, mode, prepend_bos, padding_side)
