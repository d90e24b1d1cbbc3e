"""TransformerLens's ``evals`` on local data: quick loss checks of a model.

TransformerLens's ``make_*_data_loader(tokenizer)`` download their corpus from the hub; here
each takes the corpus as ``dataset`` (a list of strings, of ``{"text": ...}`` dicts, or a
``datasets.Dataset`` already on disk) and refuses to run without it. ``induction_loss`` and
``evaluate_on_dataset`` compute what TransformerLens's do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..progress import tqdm
from ..protocol import HookedModel
from ..utils import lm_cross_entropy_loss, tokenize_and_concatenate

SANITY_TEXT = (
    "Many important transition points in the history of science have been moments when science 'zoomed in.' "
    "At these points, we develop a visualization or tool that allows us to see the world in a new level of "
    "detail, and a new field of science develops to study the world through this lens."
)


def sanity_check(model: HookedModel) -> torch.Tensor:
    """The model's loss on one paragraph (TransformerLens: below 5 is probably fine, above 7 is broken)."""
    return model(SANITY_TEXT, return_type="loss")


class _TokenRows(Dataset):
    """Rows of a [rows, pos] token tensor as ``{"tokens": row}`` (what TransformerLens's loaders yield)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i]}


def make_data_loader(
    tokenizer: Any, dataset: Any, batch_size: int = 8, max_length: int = 1024, column_name: str = "text"
) -> DataLoader:
    """Batches ``{"tokens": [batch_size, max_length]}`` of ``dataset`` (the texts of its
    ``column_name`` column) tokenized by ``tokenizer`` and concatenated
    (``utils.tokenize_and_concatenate``), shuffled, the last incomplete batch dropped.
    """
    tokenized = tokenize_and_concatenate(dataset, tokenizer, max_length=max_length, column_name=column_name)
    rows = tokenized if not isinstance(tokenized, dict) else _TokenRows(tokenized["tokens"])
    return DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True)


def _named_loader(corpus: str):
    def make(tokenizer: Any, batch_size: int = 8, dataset: Any = None, max_length: int = 1024) -> DataLoader:
        if dataset is None:
            raise ValueError(
                f"make_{corpus}_data_loader needs the corpus as dataset=...: TransformerLens downloads it from "
                f"the hub, which this library never does. Pass a list of texts or a datasets.Dataset on disk."
            )
        return make_data_loader(tokenizer, dataset, batch_size, max_length)

    make.__name__ = f"make_{corpus}_data_loader"
    make.__doc__ = f"TransformerLens's ``make_{corpus}_data_loader`` on a local ``dataset`` (see ``make_data_loader``)."
    return make


make_wiki_data_loader = _named_loader("wiki")
make_owt_data_loader = _named_loader("owt")
make_pile_data_loader = _named_loader("pile")
make_code_data_loader = _named_loader("code")
DATASET_NAMES = ["wiki", "owt", "pile", "code"]
DATASET_LOADERS = [make_wiki_data_loader, make_owt_data_loader, make_pile_data_loader, make_code_data_loader]


@torch.no_grad()
def evaluate_on_dataset(model: HookedModel, data_loader: Any, truncate: int = 100, device: Any = None) -> float:
    """Mean of ``model``'s per-batch losses over the first ``truncate + 1`` batches of
    ``data_loader`` (as TransformerLens counts them), the tokens moved to ``device`` (None: the model's).
    """
    device = model.device if device is None else device
    running_loss, total = 0.0, 0
    for batch in tqdm(data_loader, leave=False):
        running_loss += model(batch["tokens"].to(device), return_type="loss").mean().item()
        total += 1
        if total > truncate:
            break
    if total == 0:
        raise ValueError("the data loader yielded no batch (too little text for one batch of max_length tokens?)")
    return running_loss / total


@torch.no_grad()
def induction_loss(
    model: HookedModel,
    tokenizer: Any = None,
    batch_size: int = 4,
    subseq_len: int = 384,
    prepend_bos: bool | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean next-token loss of ``model`` on the second half of random token sequences repeated
    twice (low if the model has induction heads).

    ``batch_size`` sequences of ``2 * subseq_len`` tokens, drawn from [100, 20000) as in
    TransformerLens (capped at the vocabulary) with ``generator``, on ``device`` (None: the
    model's); with BOS (``prepend_bos``, None: the model's rule), the first token is replaced by
    the BOS of ``tokenizer`` (None: the model's).
    """
    device = model.device if device is None else device
    high = min(20000, model.cfg.d_vocab)
    low = 100 if high > 200 else 0
    first_half = torch.randint(low, high, (batch_size, subseq_len), generator=generator).to(device)
    repeated = first_half.repeat(1, 2)
    prepend_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    if prepend_bos:
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        bos = tokenizer.bos_token_id if tokenizer is not None else model.cfg.bos_token_id
        if bos is None:
            raise ValueError("prepend_bos needs a BOS token id: pass tokenizer= or prepend_bos=False")
        repeated[:, 0] = bos
    logits = model(repeated, return_type="logits")
    per_token = lm_cross_entropy_loss(logits, repeated, per_token=True)
    return per_token[:, subseq_len + 1 :].mean()


def evaluate(model: HookedModel, truncate: int = 100, batch_size: int = 8, tokenizer: Any = None, datasets: Any = None):
    """``evaluate_on_dataset`` of ``model`` on each local corpus in ``datasets`` ({name: texts}),
    tokenized by ``tokenizer`` (None: the model's) in batches of ``batch_size``, over
    ``truncate + 1`` batches; prints and returns ``{f"{name}_loss": loss}``. TransformerLens
    downloads four corpora instead.
    """
    if not datasets:
        raise ValueError("evaluate needs datasets={name: texts}: the corpora are not downloaded here")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    losses = {}
    for name, data in datasets.items():
        loss = evaluate_on_dataset(model, make_data_loader(tokenizer, data, batch_size), truncate=truncate)
        print(f"{name}: {loss}")
        losses[f"{name}_loss"] = loss
    return losses
