"""TransformerLens's evaluations and ``test_prompt`` on a model split over processes (two and
three gloo processes, a three-block model): every rank calls them alike, rank 0 gets one
process's result (the other ranks None), even though each rank starts from its own random
state: the evaluations give every rank rank 0's (``model.blocks.same_random_state``), so a
shuffled loader, random tokens and drawn IOI prompts are the same on every rank. Without it,
IOI prompts drawn per rank differ in length and one model's ranks could not pass the stream on.
``model.trace`` is refused on a split model with an error naming what to use, and a forward
whose ranks were given different tokens or masks is refused on every rank alike."""

from __future__ import annotations

import contextlib
import io
import random

import pytest
import split_runs
import torch
from checkpoints import VOCAB, save_checkpoint
from split_runs import load
from tokenizers_util import SENTENCES, add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.tl import evals
from transformer_hooks.utils import test_prompt as rank_answer  # not collected as a test

MMLU_ROWS = {
    "global_facts": [
        {"question": "The capital of France is", "choices": ["Paris", "London", "Rome", "Madrid"], "answer": 0},
        {"question": "The capital of Italy is", "choices": ["Paris", "London", "Rome", "Madrid"], "answer": 2},
    ],
    "prehistory": [{"question": "In 1492 Columbus sailed the", "choices": ["ocean", "store", "a", "to"], "answer": 0}],
}


def _seeded(offset: int) -> None:
    """Each rank its own random state (``offset`` = its rank; one process: 0, as rank 0)."""
    torch.manual_seed(100 + offset)
    random.seed(100 + offset)


def _evals(model: HookedTransformer, offset: int) -> dict:
    model.tokenizer.add_tokens(list("ABCD"))  # MMLU's answer letters, inside the model's vocabulary
    out: dict = {}
    _seeded(offset)
    out["sanity"] = evals.sanity_check(model)
    _seeded(offset)
    loader = evals.make_data_loader(model.tokenizer, SENTENCES * 4, batch_size=2, max_length=6)
    out["dataset"] = evals.evaluate_on_dataset(model, loader, truncate=1)
    _seeded(offset)
    out["induction"] = evals.induction_loss(model, batch_size=2, subseq_len=5)
    _seeded(offset)
    out["ioi"] = evals.ioi_eval(model, batch_size=5, num_samples=12)  # prompts drawn from Python's random
    _seeded(offset)
    out["mmlu"] = evals.mmlu_eval(model, dataset=MMLU_ROWS)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["ranks"] = rank_answer("The capital of France is", [" Paris", " London Rome"], model, top_k=3)
    out["printed"] = printed.getvalue()
    return out


def _split(world: int, path: str) -> dict:
    model = load(path, world)
    rank = model.placement.rank or 0
    results = _evals(model, offset=rank)
    if world == 1:
        return results
    with pytest.raises(ValueError, match=r"model.trace steps through one process's forward") as e:
        model.trace("The capital of France is")
    results["trace_error"] = str(e.value)
    with pytest.raises(ValueError, match=r"were given different inputs: rank\(s\) \[1\] differ"):
        model(torch.tensor([[1, 5, 7 if rank == 1 else 8]]))  # rank 1 passes its own tokens
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] differ"):  # the same tokens, another mask
        model(torch.tensor([[1, 5, 7]]), attention_mask=torch.tensor([[1, 1, 1 if rank == 1 else 0]]))
    results["after_refusal"] = model(torch.tensor([[1, 5, 7]]))  # the model still runs
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint("llama-gqa", tmp_path_factory.mktemp("split-evals"), num_hidden_layers=3)
    return str(add_tokenizer(path, VOCAB))


@pytest.fixture(scope="module")
def one_process(checkpoint):
    return split_runs.one_process(_split, checkpoint)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluations_on_a_split_model_equal_one_process(world, checkpoint, one_process, tmp_path):
    results = split_runs.on_ranks(_split, world, (checkpoint,), tmp_path)
    got, want = results[0], one_process
    for name in ("sanity", "induction"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert got["dataset"] == pytest.approx(want["dataset"], rel=1e-6)
    assert got["ioi"].keys() == want["ioi"].keys()
    for key, value in want["ioi"].items():
        assert got["ioi"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert got["mmlu"] == want["mmlu"] and want["mmlu"]["num_total"] == 3
    assert got["ranks"] == want["ranks"] and got["printed"] == want["printed"] and "Rank:" in want["printed"]
    for rank, other in enumerate(results[1:], start=1):  # the others ran their blocks and got nothing
        assert all(other[k] is None for k in ("sanity", "dataset", "induction", "ioi", "mmlu", "ranks")), rank
        assert other["printed"] == "", rank
    assert all("run_with_hooks" in r["trace_error"] for r in results)
    assert got["after_refusal"] is not None and got["after_refusal"].shape == (1, 3, VOCAB)
