"""What a resumed run checks: a key of everything that decides its result, and the refusal
that names what changed.

A long run (a harvest, a sweep over processes) keeps a key beside its results. A rerun
builds the key again and continues only if every entry is equal; otherwise it refuses,
naming each entry that differs and how to start over. Entries are JSON values; the large
inputs enter as content hashes: the model's weights (every parameter and buffer, as the
model holds them, so processing is covered too), the tokenizer, the corpus, masks. What
cannot be hashed (a one-shot iterable, a function) enters by the name the caller gives it,
or as a value no rerun can equal.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..protocol import HookedModel
from .process_group import DEFAULT_TIMEOUT, exchange

# The library's format version for resume keys: a key written by another version never matches.
KEY_VERSION = "transformer_hooks.resume/2"  # 2: the weights hashed tensor by tensor


def _hasher() -> Any:
    # sha256: hardware-accelerated on current x86 and ARM CPUs (the fastest of hashlib's here).
    return hashlib.sha256()


def tensor_hash(t: torch.Tensor | np.ndarray, h: Any = None) -> str:
    """A content hash of the tensor ``t``: dtype, shape and bytes; fed into the hash object ``h``
    if given (else a new one).
    """
    h = _hasher() if h is None else h
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.device.type != "meta" and t.numel():
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return str(h.hexdigest()[:32])


def weights_hash(model: HookedModel, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> str:
    """A content hash of every parameter and buffer of ``model``, by name: one read of the
    weights (parameters on the meta device, not loaded here, count by shape only).

    Split over processes (``pipeline_ranks``): every rank calls it; each hashes the weights
    it holds, the ranks exchange those hashes (waiting at most ``timeout`` for each other),
    and every rank returns the hash of the whole model, the hash one process computes."""
    own = {name: (tensor_hash(t), t.device.type != "meta") for name, t in model.state_dict().items()}
    parts = [own]
    if model.blocks.processes > 1:
        parts = exchange(
            None,
            own,
            timeout=timeout,
            what="hashing its weights",
            consequence="The weights' hash (the resume key) was not computed.",
        )
    held: dict[str, str] = {}
    for part in parts:  # a weight's hash by the rank that holds it (by shape where none does)
        for name, (digest, real) in part.items():
            if real or name not in held:
                held[name] = digest
    h = _hasher()
    for name in sorted(held):
        h.update(f"{name}\0{held[name]}\0".encode())
    return str(h.hexdigest()[:32])


def tokenizer_hash(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser), or None without one."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()[:32]


def unnamed(what: str) -> str:
    """The key entry of ``what``, which cannot be hashed and was not named: no rerun equals it."""
    return f"unnamed {what} {uuid.uuid4().hex}"


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per entry that differs between the keys ``old`` and ``new``: the entry, then what it was and what it is
    now.
    """

    def show(v: Any) -> str:
        s = json.dumps(v, default=str)
        if isinstance(v, str) and v.startswith("unnamed "):
            return v.rsplit(" ", 1)[0] + " (cannot be compared: name it with resume_name=)"
        return s if len(s) <= 60 else s[:57] + "..."

    missing = object()
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            was = "absent" if a is missing else show(a)
            now = "absent" if b is missing else show(b)
            lines.append(f"{k}: was {was}, now {now}")
    return lines


def check_same(where: Path | str, what: str, old: dict[str, Any], new: dict[str, Any], start_over: str) -> None:
    """Raise unless the key ``old`` found in ``where`` equals ``new``, naming ``what`` and every
    difference, and how to ``start_over``.
    """
    lines = differences(old, new)
    if lines:
        raise ValueError(
            f"{where} holds {what} made with other inputs, so continuing would mix two runs:\n  "
            + "\n  ".join(lines)
            + f"\nRerun with the same inputs to continue it, or start over: {start_over}"
        )
