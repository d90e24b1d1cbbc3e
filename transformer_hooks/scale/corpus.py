"""The corpus as contexts: documents read from a file, a list of strings or tokens, packed
into contexts of ``context_size`` tokens with the model's BOS rule; the positions a harvest
keeps; and a content hash of the corpus (what a resumed harvest checks)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..protocol import HookedModel
from ..tokens import bos_id, pad_id, require_tokenizer
from .resume import unnamed

Corpus = str | Path | Sequence[str] | torch.Tensor | np.ndarray
PositionChoice = str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _piece(tokens: torch.Tensor | np.ndarray, index: Any) -> torch.Tensor:
    """Some tokens as a CPU long tensor (copied: a memory-mapped array is read only)."""
    if isinstance(tokens, torch.Tensor):
        return tokens[index].to("cpu", torch.long)
    return torch.from_numpy(np.array(tokens[index])).long()


def _documents(corpus: str | Path, text_key: str) -> Iterator[str]:
    """A .jsonl file (one JSON object per line, text under ``text_key``) or a text file
    (documents separated by blank lines), read line by line."""
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file {path}: pass a text or .jsonl file, a list of strings or tokens")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {i + 1} is not JSON ({e})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path} line {i + 1} is a JSON {type(record).__name__}, not an object")
                    if text_key not in record:
                        raise KeyError(
                            f"{path} line {i + 1} has no {text_key!r} field (it has {sorted(record)}); "
                            f"pass text_key=..."
                        )
                    if not isinstance(record[text_key], str):
                        raise ValueError(
                            f"{path} line {i + 1}: {text_key!r} is a {type(record[text_key]).__name__}, not text"
                        )
                    yield record[text_key]
            return
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).removesuffix("\n")  # the line break before the blank line separates
                lines = []
        if lines:
            yield "".join(lines).removesuffix("\n")


def pack_contexts(
    model: HookedModel, corpus: Corpus, context_size: int, prepend_bos: bool, text_key: str, attention_mask: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [context_size], mask [context_size]) for each context of ``corpus``, in order.

    ``corpus`` as ``harvest`` takes it; text is tokenized by ``model`` (reading the
    ``text_key`` field of .jsonl lines), each context starting with BOS when ``prepend_bos``;
    ``attention_mask`` goes with token contexts [n, context_size].
    """
    if isinstance(corpus, (torch.Tensor, np.ndarray)) and (
        corpus.dtype.is_floating_point or corpus.dtype.is_complex or corpus.dtype == torch.bool
        if isinstance(corpus, torch.Tensor)
        else not np.issubdtype(corpus.dtype, np.integer)
    ):
        raise ValueError(f"tokens must be integer ids, got dtype {corpus.dtype}")
    if attention_mask is not None:
        if not isinstance(corpus, (torch.Tensor, np.ndarray)) or corpus.ndim != 2:
            raise ValueError("attention_mask goes with token contexts [n, context_size] only")
        if tuple(attention_mask.shape) != tuple(corpus.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the token contexts {tuple(corpus.shape)}"
            )
    if isinstance(corpus, (torch.Tensor, np.ndarray)):  # read piece by piece: a memory-mapped array stays on disk
        if corpus.ndim == 2:  # contexts as given
            if corpus.shape[1] != context_size:
                raise ValueError(f"token contexts have length {corpus.shape[1]}, but context_size={context_size}")
            for i in range(corpus.shape[0]):
                m = (
                    torch.ones(context_size, dtype=torch.bool)
                    if attention_mask is None
                    else torch.as_tensor(attention_mask[i]).bool()
                )
                yield _piece(corpus, i), m
            return
        if corpus.ndim != 1:
            raise ValueError(
                f"tokens must be a stream [n] or contexts [n, context_size], got shape {tuple(corpus.shape)}"
            )
        streams: Iterable[list[int]] = (
            _piece(corpus, slice(i, i + (1 << 16))).tolist() for i in range(0, corpus.shape[0], 1 << 16)
        )
    else:
        docs = _documents(corpus, text_key) if isinstance(corpus, (str, Path)) else iter(corpus)
        tok = require_tokenizer(model.tokenizer)

        def text(doc: Any, i: int) -> str:
            if not isinstance(doc, str):
                raise ValueError(
                    f"document {i} of the corpus is a {type(doc).__name__}, not a string: pass strings, a file, "
                    f"or token ids as a tensor or array"
                )
            return doc

        streams = (tok(text(doc, i), add_special_tokens=False)["input_ids"] for i, doc in enumerate(docs))
    bos = bos_id(model.tokenizer, model.cfg) if prepend_bos else None
    eos = getattr(model.tokenizer, "eos_token_id", None)
    cfg_eos = model.cfg.eos_token_id
    cfg_eos = cfg_eos[0] if isinstance(cfg_eos, tuple) else cfg_eos  # several EOS ids: the first
    sep = bos if bos is not None else (eos if eos is not None else cfg_eos)
    body = context_size - (1 if prepend_bos else 0)
    buffer: list[int] = []
    first = True
    for ids in streams:
        if sep is not None and not first and not isinstance(corpus, (torch.Tensor, np.ndarray)):
            buffer.append(sep)  # documents joined by BOS (by EOS for models that prepend no BOS)
        first = False
        buffer.extend(ids)
        while len(buffer) >= body:
            chunk, buffer = buffer[:body], buffer[body:]
            yield torch.tensor(([bos] if bos is not None else []) + chunk), torch.ones(context_size, dtype=torch.bool)
    if buffer:
        n = len(buffer) + (1 if bos is not None else 0)
        row = torch.full((context_size,), pad_id(model.tokenizer, model.cfg), dtype=torch.long)
        row[:n] = torch.tensor(([bos] if bos is not None else []) + buffer)
        mask = torch.zeros(context_size, dtype=torch.bool)
        mask[:n] = True
        yield row, mask


def select_positions(
    positions: PositionChoice, tokens: torch.Tensor, mask: torch.Tensor, first_context: int, bos: int | None
) -> torch.Tensor:
    """The [batch, pos] positions to keep of ``tokens``: real tokens (``mask``) at the chosen
    ``positions`` (as ``harvest`` takes them; a mask is read from row ``first_context`` on), the
    token ``bos`` left out unless None.
    """
    if isinstance(positions, str):
        if positions == "all":
            chosen = mask.clone()
        elif positions == "last":
            chosen = torch.zeros_like(mask)
            last = mask.long().cumsum(1).argmax(1)
            chosen[torch.arange(len(mask)), last] = True
        else:
            raise ValueError(
                f"positions must be 'all', 'last', a [contexts, pos] bool mask or a function of the "
                f"tokens, got {positions!r}"
            )
    elif callable(positions):
        chosen = torch.as_tensor(positions(tokens)).bool()
    else:
        chosen = torch.as_tensor(positions).bool()[first_context : first_context + len(tokens)]
    if tuple(chosen.shape) != tuple(tokens.shape):
        raise ValueError(
            f"the positions mask for contexts {first_context}.. has shape {tuple(chosen.shape)}; "
            f"expected {tuple(tokens.shape)} ([contexts, context_size])"
        )
    chosen = chosen & mask
    if bos is not None:
        chosen &= tokens != bos
    return chosen


def corpus_hash(corpus: Corpus, name: str | None = None) -> str:
    """The corpus's content hash: a file's bytes, the tokens, the strings. A one-shot iterable
    cannot be hashed without consuming it: it is known by the ``name`` its caller gives it
    (or by a value no rerun equals)."""
    h = hashlib.sha256()
    if isinstance(corpus, (str, Path)):
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"no corpus file {p}: pass a text or .jsonl file, a list of strings or tokens")
        h.update(f"file:{p.suffix == '.jsonl'}:".encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    elif isinstance(corpus, (torch.Tensor, np.ndarray)):
        h.update(f"tokens:{tuple(corpus.shape)}".encode())
        for i in range(0, corpus.shape[0], 1 << 16):  # piece by piece, as the tokens are read
            piece = _piece(corpus, slice(i, i + (1 << 16))).numpy()
            h.update(np.ascontiguousarray(piece).data)
    elif isinstance(corpus, (list, tuple)):
        for i, doc in enumerate(corpus):
            if not isinstance(doc, str):
                raise ValueError(
                    f"document {i} of the corpus is a {type(doc).__name__}, not a string: pass strings, a file, "
                    f"or token ids as a tensor or array"
                )
            h.update(doc.encode())
            h.update(b"\0")
    else:
        return f"named {name}" if name is not None else unnamed("one-shot iterable")
    return h.hexdigest()[:16]
