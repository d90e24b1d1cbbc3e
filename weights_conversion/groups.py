"""The groups a checkpoint streams in, and their order: the one definition.

A group is the tensors that are converted, processed and placed together: the
embeddings, the final norm with the unembedding (the norm must travel with the weights
that read it, for ``fold_ln``), and each block. A load takes them in ``load_order``:
the two big groups first, while the model is still nearly empty, so their temporaries
never stack on top of a full model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

# (label for messages, name prefix, thunk returning {name relative to prefix: tensor})
Group = tuple[str, str, Callable[[], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Part:
    """One group: its kind, its layer (blocks only), and the parameter-name prefixes it holds."""

    kind: Literal["embeddings", "final", "block"]
    layer: int | None = None

    @property
    def label(self) -> str:
        """The group's name in progress bars and errors (``"block 3"``)."""
        return {"embeddings": "embeddings", "final": "final norm and unembedding"}.get(self.kind, f"block {self.layer}")

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The canonical parameter-name prefixes the group holds."""
        if self.kind == "embeddings":
            return ("embed.", "pos_embed.")
        if self.kind == "final":
            return ("ln_final.", "unembed.")
        return (f"blocks.{self.layer}.",)


def load_order(n_layers: int) -> list[Part]:
    """The groups of a model of ``n_layers`` blocks in load order: embeddings, final norm +
    unembedding, then each block."""
    return [Part("embeddings"), Part("final"), *(Part("block", layer) for layer in range(n_layers))]


def convert_groups(cfg, get: Callable[[str], torch.Tensor], family: ModuleType) -> list[Group]:
    """(label, prefix, thunk) per group, in ``load_order``, converting the HF tensors ``get(hf_name)``
    returns with ``family`` for the config ``cfg``.

    A thunk returns ``{name relative to prefix: tensor}``; calling them one at a time keeps
    one group's tensors alive at once.
    """

    def group(part: Part) -> Group:
        if part.kind == "embeddings":
            return part.label, "", lambda: family.convert_embeddings(cfg, get)
        if part.kind == "final":
            return part.label, "", lambda: family.convert_final(cfg, get)
        return part.label, f"blocks.{part.layer}.", lambda: family.convert_block(cfg, get, part.layer)

    return [group(part) for part in load_order(cfg.n_layers)]
