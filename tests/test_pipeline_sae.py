"""SAEs on a model split over processes (loading/pipeline.py): two and three gloo processes,
each holding a range of blocks of a three-block model, give what one process gives (fp32,
within 1e-6) when an SAE is spliced in (with and without its error term, at some positions,
in a generation), when its features are cached (``<site>.hook_sae_acts_post``, gathered to
rank 0) or edited by hooks, when a feature steers, and for every field of ``evaluate_sae``.
The SAEs sit on rank 0's block, a middle block and the last block. An SAE that does not fit
its site fails with the same clear error on every rank (its width is measured on the site's
rank and shared, so no rank waits).

One launch of the ranks per world size runs every check (``_sae_workflows``); the tests compare
its results with the same function run in one process."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import split_runs
import torch
from checkpoints import save_checkpoint
from split_runs import close, load

from transformer_hooks import HookedTransformer
from transformer_hooks.loading.groups import group_of
from transformer_hooks.loading.pipeline import pipeline_map
from transformer_hooks.sae import SAE, SAEConfig, evaluate_sae, splice_sae, steer_with_feature

CHECKPOINT = "llama-gqa"  # three blocks: with 2 ranks block 0 is rank 0's, blocks 1-2 rank 1's; with 3, one each
TOKENS = torch.tensor([[1, 17, 42, 8, 19, 5, 23], [1, 64, 2, 77, 31, 9, 12]])
EVAL_TOKENS = torch.tensor([[1, 3, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14], [1, 20, 21, 22, 23, 24, 25]])
EVAL_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
SAES = {  # name: (site, SAE.for_model's arguments)
    "first": ("blocks.0.hook_mlp_out", dict(d_sae=24, seed=1)),
    "middle": ("blocks.1.hook_resid_post", dict(d_sae=32, seed=2)),
    "last": ("blocks.2.attn.hook_z", dict(d_sae=24, seed=3, architecture="topk", k=4)),  # heads flattened
}


def _zero_top_feature(acts: torch.Tensor, hook) -> torch.Tensor:
    """Zero the feature with the largest total activation (chosen where the hook runs)."""
    acts = acts.clone()
    acts[..., acts.sum((0, 1)).argmax()] = 0
    return acts


def _sae_workflows(model: HookedTransformer) -> dict:
    """Every SAE workflow compared, in one process or on each rank alike (rank 0's values, None elsewhere)."""
    out: dict = {"clean": model(TOKENS)}
    for name, (site, kwargs) in SAES.items():
        sae = SAE.for_model(model, site, **kwargs)  # d_in measured on the site's rank, shared
        with torch.no_grad():  # features that fire and biases that matter: a spliced model differs
            gen = torch.Generator().manual_seed(kwargs["seed"])
            sae.b_dec.copy_(0.05 * torch.randn(sae.b_dec.shape, generator=gen))
        out[f"{name}.d_in"] = sae.cfg.d_in
        feats = f"{site}.hook_sae_acts_post"
        with splice_sae(model, sae):
            out[f"{name}.spliced"] = model(TOKENS)
            if name == "middle":  # every rank gets the tokens of a generation
                out["generated"] = model.generate(TOKENS, max_new_tokens=4, do_sample=False, verbose=False)
        with splice_sae(model, sae, positions=slice(2, None)):
            out[f"{name}.positions"] = model(TOKENS)
        with splice_sae(model, sae, use_error_term=True):
            logits, cache = model.run_with_cache(TOKENS, names_filter=[site, feats, f"{site}.hook_sae_recons"])
            out[f"{name}.error_term"] = logits
            out[f"{name}.cache"] = None if cache is None else dict(cache.items())
            with model.hooks(fwd_hooks=[(feats, _zero_top_feature)]):
                out[f"{name}.edited"] = model(TOKENS)
        assert feats not in model.hook_dict and not any(hp.fwd_hooks for hp in model.hook_dict.values())
        with steer_with_feature(model, sae, 3, coeff=4.0):
            out[f"{name}.steered"] = model(TOKENS)
        with steer_with_feature(model, sae, 5, coeff=-2.0, positions=[1, 4]):
            out[f"{name}.steered_positions"] = model(TOKENS)
        ev = evaluate_sae(model, sae, EVAL_TOKENS, batch_size=2, attention_mask=EVAL_MASK, positions=slice(1, None))
        out[f"{name}.eval"] = None if ev is None else asdict(ev)
        ev = evaluate_sae(model, sae, EVAL_TOKENS, batch_size=3)
        out[f"{name}.eval_all"] = None if ev is None else asdict(ev)
    return out | _careless(model)


def _careless(model: HookedTransformer) -> dict:
    """SAEs whose d_in does not fit their site: every rank raises the same clear error (none waits)."""
    errors = {}
    for site in ("blocks.1.hook_resid_post", "blocks.2.attn.hook_z"):
        wrong = SAE(SAEConfig(d_in=model.cfg.d_model + 1, d_sae=8, hook_name=site))
        with pytest.raises(ValueError, match=rf"d_in={model.cfg.d_model + 1}, but {site} of this model has width"):
            with splice_sae(model, wrong):
                pass
        with pytest.raises(ValueError, match=r"d_in=.*: was it trained on another site or model\?") as e:
            evaluate_sae(model, wrong, EVAL_TOKENS)
        errors[site] = str(e.value)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    return {"errors": errors}


def _split(world: int, path: str) -> dict:
    model = load(path, world)
    results = _sae_workflows(model)
    if (
        not model.blocks.gets_output
    ):  # rank 0 gets every result; the widths, errors and generated tokens are every rank's
        everywhere = ("errors", "generated")
        assert all(v is None for k, v in results.items() if not k.endswith(".d_in") and k not in everywhere)
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint(CHECKPOINT, tmp_path_factory.mktemp("split-sae"), num_hidden_layers=3)
    return str(path)


one_process, ranks = split_runs.comparison(_split, "checkpoint")


def test_an_sae_sites_hook_names_belong_to_its_sites_block():
    """The SAE's sites (``<site>.hook_sae_*``) run on the rank of the site they hang on."""
    for site in ("blocks.1.hook_resid_post", "blocks.2.attn.hook_z"):
        for leaf in ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
            assert group_of(f"{site}.{leaf}") == group_of(site) == f"blocks.{site.split('.')[1]}"
    assert pipeline_map(3, 3)["blocks.1"] == 1 and pipeline_map(3, 2)["blocks.1"] == 1  # the middle SAE: rank 1


def test_spliced_logits_equal_one_process(ranks, one_process):
    """Spliced in (all positions, some, with the error term), each SAE gives one process's logits
    (and a spliced greedy generation its tokens, on every rank); the splice changes the logits,
    and the error term gives back the clean model."""
    world, results = ranks
    got = results[0]
    close(got["clean"], one_process["clean"], f"clean logits on {world} ranks")
    for name in SAES:
        assert all(r[f"{name}.d_in"] == one_process[f"{name}.d_in"] for r in results), name  # every rank's width
        for kind in ("spliced", "positions", "error_term"):
            close(got[f"{name}.{kind}"], one_process[f"{name}.{kind}"], f"{name} {kind} on {world} ranks")
        clean, spliced = one_process["clean"], one_process[f"{name}.spliced"]
        assert (spliced - clean).abs().max() > 1e-3, name  # the splice changes the model
        assert (one_process[f"{name}.positions"] - spliced).abs().max() > 1e-3, name  # positions leave some alone
        torch.testing.assert_close(one_process[f"{name}.error_term"], clean, rtol=0, atol=1e-6)
    for rank, got in enumerate(results):  # a spliced generation: the same tokens on every rank
        assert torch.equal(got["generated"], one_process["generated"]), (rank, world)


def test_sae_features_cached_and_edited_equal_one_process(ranks, one_process):
    """``run_with_cache`` of the SAE's sites (features, reconstruction) brings them from the site's
    rank to rank 0 in the forward's order; a hook zeroing a feature and steering with a feature's
    decoder row run on the site's rank, with one process's logits."""
    world, results = ranks
    got = results[0]
    for name, (site, _) in SAES.items():
        cache, want = got[f"{name}.cache"], one_process[f"{name}.cache"]
        assert cache is not None and list(cache) == list(want), (name, world)
        assert f"{site}.hook_sae_acts_post" in want and (want[f"{site}.hook_sae_acts_post"] > 0).any()
        for key, value in want.items():
            close(cache[key], value, f"{key} on {world} ranks")
        for kind in ("edited", "steered", "steered_positions"):
            close(got[f"{name}.{kind}"], one_process[f"{name}.{kind}"], f"{name} {kind} on {world} ranks")
            assert (one_process[f"{name}.{kind}"] - one_process["clean"]).abs().max() > 1e-4, (name, kind)


def test_evaluate_sae_equals_one_process_on_rank_0(ranks, one_process):
    """Every field of ``evaluate_sae`` (padded rows, some positions; and plain) equals one process's
    on rank 0 (floats within rel 1e-6, the token count exact); the other ranks return None."""
    world, results = ranks
    for name in SAES:
        for kind in ("eval", "eval_all"):
            got, want = results[0][f"{name}.{kind}"], one_process[f"{name}.{kind}"]
            assert got is not None and list(got) == list(want), (name, kind, world)
            assert got["n_tokens"] == want["n_tokens"] and want["n_tokens"] > 0
            for field, value in want.items():
                assert isinstance(value, (int, float)) and not math.isnan(value), (name, kind, field)
                assert got[field] == pytest.approx(value, rel=1e-6, abs=1e-12), (name, kind, field, world)
            assert want["spliced_loss"] != want["clean_loss"], (name, kind)
            assert all(r[f"{name}.{kind}"] is None for r in results[1:])
    assert one_process["middle.eval"]["n_tokens"] == int(EVAL_MASK[:, 1:].sum())  # real tokens after the first


def test_an_sae_that_does_not_fit_fails_clearly_on_every_rank(ranks, one_process):
    world, results = ranks
    for rank, got in enumerate(results):
        assert got["errors"] == one_process["errors"], (rank, world)
