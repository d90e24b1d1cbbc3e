"""Distributed alignment search on a model split over processes (loading/pipeline.py): two
and three gloo processes, each holding a range of blocks of a three-block model, train the
rotation to one process's losses (rank 0's) and rotation (on EVERY rank), within 1e-6, at
residual sites whose resumed run starts on another rank than the site's block, and at an
attention and an MLP site, full and low-rank; ``evaluate_das`` and ``interchange_logits``
give one process's values on rank 0 (None elsewhere). A careless call (a site that does not
exist, several sites, a rotation of the wrong width, a position out of range) raises the same
clear error on every rank, and the ranks stay in step after it. Also ``model.blocks.grad`` when
rank 0 holds none of the inputs (attribution to a later rank's site only).

One launch of the ranks per world size runs every check (``_das``); the tests compare its
results with the same function run in one process."""

from __future__ import annotations

import pytest
import split_runs
import torch
from checkpoints import VOCAB, save_checkpoint
from split_runs import close, load

from transformer_hooks import HookedTransformer
from transformer_hooks.interventions.das import (
    RotatedSubspaceInterchange,
    evaluate_das,
    interchange_logits,
    source_activations,
    train_das,
)
from transformer_hooks.interventions.patching import attribution_products

# Blocks 0, 1, 2 are on ranks 0, 1, 1 of 2 and 0, 1, 2 of 3.
CASES = {
    # resumes at block 1: the site's block on rank 0, the hook (and the resumed input) on rank 1
    "resid_post_0": ("blocks.0.hook_resid_post", False, 5),
    # resumes at block 2 (the last rank): from rank 1 to rank 2 of 3; padded prompts
    "resid_post_1_padded": ("blocks.1.hook_resid_post", True, 4),
    "z_0": ("blocks.0.attn.hook_z", True, 3),  # rank 0: the gradient comes back to where the loss is
    "mlp_post_1": ("blocks.1.mlp.hook_post", False, 6),  # the middle rank of 3, the last of 2
}
MASK = torch.ones(8, 6, dtype=torch.long)
MASK[1, :2] = 0  # left padding
MASK[4, :1] = 0


def _pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, VOCAB, (8, 6), generator=gen)
    source = base.clone()
    source[:, 2] = torch.randint(0, VOCAB, (8,), generator=gen)
    return base, source, torch.randint(0, VOCAB, (8,), generator=gen)


def _width(model: HookedTransformer, site: str) -> int:
    return model.cfg.d_head if site.endswith("hook_z") else model.cfg.d_mlp if "mlp" in site else model.cfg.d_model


def _careless(model: HookedTransformer) -> list[str]:
    """What a careless call raises; on every rank alike (a rank that raised alone would leave the
    others waiting for it)."""
    base, source, target = _pairs()
    d = model.cfg.d_model
    calls = [
        lambda: train_das(model, RotatedSubspaceInterchange(d, 2), "blocks.1.hook_resid_middle", base, source, target),
        lambda: evaluate_das(model, RotatedSubspaceInterchange(d, 2), "blocks.7.hook_resid_post", base, source, target),
        lambda: source_activations(model, "blocks.*.hook_resid_post", source),
        lambda: train_das(model, RotatedSubspaceInterchange(d, 2), "blocks.2.attn.hook_z", base, source, target),
        lambda: train_das(model, RotatedSubspaceInterchange(d, 2), "blocks.0.hook_resid_post", base, source, target, 9),
        lambda: evaluate_das(model, RotatedSubspaceInterchange(8, 2), "blocks.1.attn.hook_z", base, source[:3], target),
    ]
    errors = []
    for call in calls:
        with pytest.raises((ValueError, IndexError, KeyError)) as e:
            call()
        errors.append(f"{type(e.value).__name__}: {e.value}")
    return errors


def _das(model: HookedTransformer) -> dict:
    """Every check, in one process or on each rank alike (each rank's own values)."""
    base, source, target = _pairs()
    out: dict = {"errors": _careless(model)}
    for name, (site, low_rank, k) in CASES.items():
        mask = MASK if "padded" in name else None
        das = RotatedSubspaceInterchange(_width(model, site), k, low_rank=low_rank, seed=3)
        init = das.rotation.weight.detach().clone()
        kwargs = dict(base_pos=2, source_pos=2, base_attention_mask=mask, source_attention_mask=mask)
        before = evaluate_das(model, das, site, base, source, target, **kwargs)
        losses = train_das(model, das, site, base, source, target, steps=4, lr=5e-2, batch_size=5, seed=1, **kwargs)
        out[name] = {
            "init": init,
            "weight": das.rotation.weight.detach().clone(),
            "state": {k: v.clone() for k, v in das.state_dict().items()},
            "losses": losses,
            "before": before,
            "after": evaluate_das(model, das, site, base, source, target, **kwargs),
        }
    # interchange_logits itself, resumed from the base's cached residual (its public resume path)
    site = "blocks.0.hook_resid_post"
    das = RotatedSubspaceInterchange(model.cfg.d_model, 5, seed=4)
    src, base_act = source_activations(model, site, source), source_activations(model, site, base)
    out["resumed_logits"] = interchange_logits(model, das, site, base, src, 2, 2, base_act=base_act)
    out["full_logits"] = interchange_logits(model, das, site, base, src, 2, 2)
    # A gradient to sites on later ranks only: rank 0's sent stream reaches none of its own inputs,
    # yet it must take the gradient the next rank sends back (the transfer's anchor).
    _, cache = model.run_with_cache(source)
    out["attribution"] = attribution_products(model, base, cache, _metric, ["blocks.2.attn.hook_z"])
    return out


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def _split(world: int, path: str) -> dict:
    return _das(load(path, world))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint("llama-gqa", tmp_path_factory.mktemp("split-das"), num_hidden_layers=3)
    return str(path)


one_process, ranks = split_runs.comparison(_split, "checkpoint")


@pytest.mark.parametrize("case", list(CASES))
def test_training_gives_every_rank_the_one_process_rotation(ranks, one_process, case):
    world, results = ranks
    want = one_process[case]
    assert not torch.allclose(want["weight"], want["init"], atol=1e-3), "training did not move the rotation"
    for rank, got in enumerate(results):
        where = f"{case}, rank {rank} of {world}"
        close(got[case]["init"], want["init"], f"{where}: initial rotation")
        close(got[case]["weight"], want["weight"], f"{where}: trained rotation")
        assert list(got[case]["state"]) == list(want["state"])
        for key, value in want["state"].items():
            close(got[case]["state"][key], value, f"{where}: {key}")
    losses = results[0][case]["losses"]
    assert losses is not None and len(losses) == len(want["losses"]) == 4
    close(torch.tensor(losses), torch.tensor(want["losses"]), f"{case}: losses per step on {world} ranks")
    assert want["losses"][-1] < want["losses"][0]
    assert all(got[case]["losses"] is None for got in results[1:]), "the losses are rank 0's"


@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_equals_one_process_on_rank_0(ranks, one_process, case):
    world, results = ranks
    want = one_process[case]
    assert want["after"]["loss"] < want["before"]["loss"]
    for when in ("before", "after"):
        got = results[0][case][when]
        assert got is not None and got.keys() == want[when].keys()
        assert got["loss"] == pytest.approx(want[when]["loss"], abs=1e-6), (case, when, world)
        assert got["accuracy"] == want[when]["accuracy"], (case, when, world)
        assert all(r[case][when] is None for r in results[1:]), "the metrics are rank 0's"


def test_interchange_logits_resumed_and_full_equal_one_process(ranks, one_process):
    world, results = ranks
    for name in ("resumed_logits", "full_logits"):
        close(results[0][name], one_process[name], f"{name} on {world} ranks")
        assert all(r[name] is None for r in results[1:])
    torch.testing.assert_close(one_process["resumed_logits"], one_process["full_logits"], atol=1e-5, rtol=1e-5)


def test_careless_calls_raise_the_same_clear_error_on_every_rank(ranks, one_process):
    world, results = ranks
    want = one_process["errors"]
    for rank, got in enumerate(results):
        assert got["errors"] == want, f"rank {rank} of {world}"
    missing, absent, several, width, position, batch = want
    assert "blocks.1.hook_resid_middle" in missing and "blocks.7.hook_resid_post" in absent
    assert "several hook names" in several and "give its full name" in several
    assert "48 wide" in width and "is 8 wide" in width and "d=8" in width
    assert "IndexError" in position and "out of range" in position
    assert "do not match" in batch or "need as many source prompts" in batch


def test_a_gradient_to_later_ranks_only_comes_back(ranks, one_process):
    """``model.blocks.grad`` when rank 0 holds no input: the backward still takes every transfer's gradient."""
    world, results = ranks
    want = one_process["attribution"]["blocks.2.attn.hook_z"]
    assert want.abs().sum() > 0
    close(results[0]["attribution"]["blocks.2.attn.hook_z"], want, f"attribution on {world} ranks")
    assert all(r["attribution"] is None for r in results[1:])
