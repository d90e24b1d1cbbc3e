"""The workflows on a model split over processes (loading/pipeline.py): two and three gloo
processes, each holding a range of blocks of a three-block model, give what one process
gives (within 1e-6, fp32) for the activation-patching sweeps and the stacked batch engine,
ablations, steering (its vector, coefficient and a steered generation), ``generate`` and a
forward split at ``stop_at_layer`` / ``start_at_layer``, and (after ``hold_weights``) the weight views,
direct logit attribution and the logit lens. Rank 0 returns each result; the
other ranks return None (as ``run_with_cache``), except ``generate``, which every rank returns.

One launch of the ranks per world size runs every workflow (``_workflows``); the tests
compare its results with the same function run in one process."""

from __future__ import annotations

import pytest
import split_runs
import torch
from checkpoints import VOCAB, save_checkpoint
from split_runs import close, load
from tokenizers_util import add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.analysis.circuits import attribute_edges
from transformer_hooks.analysis.dla import direct_logit_attribution
from transformer_hooks.analysis.lens import logit_lens
from transformer_hooks.components.stack import WeightNotHeldError
from transformer_hooks.interventions.patching import (
    Ablation,
    ablate,
    ablation_sweep,
    attribution_products,
    generic_activation_patch,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_block_every,
    get_act_patch_resid_pre,
    get_attr_patch_attn_head_all_pos_every,
    get_attr_patch_attn_head_k_by_pos,
    get_attr_patch_attn_head_q_all_pos,
    get_attr_patch_block_every,
    layer_pos_patch_setter,
    run_ablations,
)
from transformer_hooks.interventions.steering import steering, steering_coeff, steering_vector

CHECKPOINT = "llama-gqa"  # with three blocks: GQA, rotary
CLEAN = torch.tensor([[1, 17, 42, 8, 19, 5, 23], [1, 64, 2, 77, 31, 9, 12]])
CORRUPT = torch.tensor([[1, 17, 42, 8, 30, 5, 23], [1, 64, 2, 50, 31, 9, 12]])
REFERENCE = torch.tensor([[1, 3, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14], [1, 20, 21, 22, 23, 24, 25]])
SITE = "blocks.2.hook_resid_pre"  # run by the last rank


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def _workflows(model: HookedTransformer) -> dict:
    """Every workflow compared, in one process or on each rank alike (rank 0's values; None elsewhere)."""
    out: dict = {}
    _, clean_cache = model.run_with_cache(CLEAN)
    out["resid_pre"] = get_act_patch_resid_pre(model, CORRUPT, clean_cache, _metric, progress=False)
    # several chunks, each with rows joining at every layer
    out["heads_every"] = get_act_patch_attn_head_all_pos_every(
        model, CORRUPT, clean_cache, _metric, batch_size=5, progress=False
    )
    out["block_every_last_pos"] = get_act_patch_block_every(
        model, CORRUPT, clean_cache, _metric, batch_size=4, metric_positions=-1, progress=False
    )
    out["pattern_by_pos"] = get_act_patch_attn_head_pattern_by_pos(model, CORRUPT, clean_cache, _metric, progress=False)
    out["index_df"] = generic_activation_patch(
        model,
        CORRUPT,
        clean_cache,
        _metric,
        patch_setter=layer_pos_patch_setter,
        activation_name="mlp_out",
        index_df=[(2, 6), (0, 3), (1, 1)],
        progress=False,
    )

    out["ablate_logits"] = ablate(model, CORRUPT, "blocks.1.attn.hook_z", heads=[1, 3])
    out["ablate_metric"] = ablate(model, CORRUPT, "blocks.2.mlp.hook_post", neurons=[4], kind="zero", metric=_metric)
    out["mean_heads"] = ablation_sweep(model, CORRUPT, _metric, "z", over="head", kind="mean", reference=REFERENCE)
    out["resample_neurons"] = ablation_sweep(
        model, CORRUPT, _metric, "post", over="neuron", kind="resample", reference=REFERENCE, layers=[2, 0]
    )
    _, ref_cache = model.run_with_cache(REFERENCE)  # a cache as the reference: None on ranks but 0
    out["mixed"] = run_ablations(
        model,
        CORRUPT,
        [
            Ablation("blocks.0.hook_resid_post", positions=(2,), kind="mean"),
            Ablation("blocks.2.attn.hook_v", heads=(1,), kind="zero"),
            Ablation("blocks.1.hook_mlp_out", kind="resample"),
        ],
        _metric,
        reference=ref_cache,
        metric_positions=[-1],
    )

    vector = steering_vector(model, "The capital of France is", "The capital of England is", SITE)
    coeff = steering_coeff(model, SITE, vector, fraction=1.0)
    out["vector"], out["coeff"] = vector, coeff
    with steering(model, SITE, vector, coeff=coeff):
        out["steered_logits"] = model(CORRUPT)
        steered = model.generate("The capital of", max_new_tokens=4, do_sample=False, verbose=False)
    out["greedy"] = model.generate(CORRUPT, max_new_tokens=4, do_sample=False, verbose=False)
    torch.manual_seed(7)
    out["sampled"] = model.generate(CORRUPT, max_new_tokens=4, do_sample=True, temperature=2.0, verbose=False)

    resid = model(CLEAN, stop_at_layer=2)  # stays on the rank that runs block 2 (a meta tensor elsewhere)
    out["split_forward"] = model(resid, start_at_layer=2)
    out["logits"] = model(CLEAN)
    out["corrupt_logits"] = model(CORRUPT)
    everywhere = {"steered_generation": steered, "greedy": out["greedy"], "sampled": out["sampled"]}
    return out | _attribution(model, clean_cache) | _weight_views(model) | everywhere


def _attribution(model: HookedTransformer, clean_cache) -> dict:
    """Attribution patching: its gradients flow back across the ranks."""
    return {
        "atp_block_every": get_attr_patch_block_every(model, CORRUPT, clean_cache, _metric),
        "atp_heads_every": get_attr_patch_attn_head_all_pos_every(model, CORRUPT, clean_cache, _metric),
        "atp_star_k_by_pos": get_attr_patch_attn_head_k_by_pos(model, CORRUPT, clean_cache, _metric, method="atp*"),
        "atp_star_q_grad_drop": get_attr_patch_attn_head_q_all_pos(
            model, CORRUPT, clean_cache, _metric, method="atp*", grad_drop=True
        ),
        "products": attribution_products(
            model, CORRUPT, clean_cache, _metric, ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"]
        ),
        "eap_ig": _edges(attribute_edges(model, CLEAN, CORRUPT, _metric, method="EAP-IG", ig_steps=2)),
    }


def _edges(graph) -> dict | None:
    return None if graph is None else {(e.sender, e.receiver): e.score for e in graph.edges}


def _weight_views(model: HookedTransformer) -> dict:
    """Weight views and the cache's weight-reading methods; on a split model after
    ``hold_weights`` (every rank), on rank 0. Also the errors before it, on rank 0."""
    out: dict = {}
    _, cache = model.run_with_cache(CLEAN)
    here = model.blocks.gets_output
    split = model.placement.kind == "pipeline"
    if here and split:
        errors = []
        for read in (lambda: model.W_Q, lambda: model.W_U, lambda: cache.stack_head_results(layer=-1)):
            with pytest.raises(WeightNotHeldError) as e:
                read()
            errors.append(str(e.value))
        out["errors"] = errors
    model.hold_weights("attn.W_O")  # what stack_head_results reads
    if here:
        out["heads"] = cache.stack_head_results(layer=-1, incl_remainder=True, return_labels=True)
    model.hold_weights()  # every weight
    dla = direct_logit_attribution(model, "The capital of France is", " Paris", " London")
    lens = logit_lens(model, CLEAN, top_k=3, progress=False, targets=5)
    if not here:
        assert dla is None and lens is None
        with pytest.raises(WeightNotHeldError):  # rank 0 holds the copies, not this rank
            _ = model.W_Q
        return {}
    assert dla is not None and lens is not None
    out["dla"] = {k: v for k, v in vars(dla).items() if isinstance(v, (torch.Tensor, float))}
    out["lens"] = {"tokens": lens.top_tokens, "probs": lens.top_probs, "target_logits": lens.target_logits}
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_gate", "W_out", "W_U", "b_U", "W_E"):
        out[name] = getattr(model, name)
    out["QK"], out["OV"] = model.QK.AB, model.OV.AB
    out["bias"] = model.accumulated_bias(3)
    out["directions"] = model.tokens_to_residual_directions(torch.tensor([5, 7]))
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)
    out["logit_attrs"] = cache.logit_attrs(stack, torch.tensor([5, 7]), torch.tensor([7, 5]), pos_slice=-1)
    out["neurons"] = cache.stack_neuron_results(layer=-1)
    return out


def _processing(path: str, world: int) -> dict:
    """``process_weights_`` on an unprocessed GPT-2 (LayerNorm: every step, W_E and W_U
    centred), then its logits, cache and (after ``hold_weights``) weights on rank 0."""
    split = {"pipeline_ranks": world} if world > 1 else {}
    model = HookedTransformer.from_pretrained_no_processing(path, **split).process_weights_()
    logits, cache = model.run_with_cache(CLEAN)
    if model.placement.kind == "pipeline":  # another rank's weights are meta tensors here
        with pytest.raises(ValueError, match=r"cannot be moved: load it on each rank's device"):
            model.to("cpu")
    model.hold_weights()
    if not model.blocks.gets_output:
        assert logits is None and cache is None
        return {}
    weights = {n: p for n, p in model.named_parameters()}
    return {
        "processed": {
            "logits": logits,
            "cache": dict(cache.items()),
            "weights": weights,
            "steps": list(model.cfg.processing),
        }
    }


def _split(world: int, path: str, gpt2_path: str) -> dict:
    model = load(path, world)
    results = _workflows(model) | _processing(gpt2_path, world)
    if not model.blocks.gets_output:  # every result but generate's is rank 0's alone
        assert all(v is None for k, v in results.items() if k not in ("steered_generation", "greedy", "sampled"))
        assert "W_Q" not in results
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint(CHECKPOINT, tmp_path_factory.mktemp("split"), num_hidden_layers=3)
    return str(add_tokenizer(path, VOCAB))


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    path, _ = save_checkpoint("gpt2", tmp_path_factory.mktemp("split-gpt2"), n_layer=3)
    return str(path)


one_process, ranks = split_runs.comparison(_split, "checkpoint", "gpt2_checkpoint")


SWEEPS = ["resid_pre", "heads_every", "block_every_last_pos", "pattern_by_pos", "index_df"]
ABLATIONS = ["ablate_logits", "ablate_metric", "mean_heads", "resample_neurons", "mixed"]


def test_patching_sweeps_equal_one_process(ranks, one_process):
    world, results = ranks
    for name in SWEEPS:
        close(results[0][name], one_process[name], f"{name} on {world} ranks")
        assert results[0][name].abs().sum() > 0, name  # the patches change the metric
    assert torch.isfinite(results[0]["block_every_last_pos"]).all()


def test_ablations_equal_one_process(ranks, one_process):
    world, results = ranks
    for name in ABLATIONS:
        close(results[0][name], one_process[name], f"{name} on {world} ranks")
    assert not torch.allclose(one_process["ablate_logits"], one_process["corrupt_logits"])  # it ablates


def test_steering_generate_and_split_forward_equal_one_process(ranks, one_process):
    world, results = ranks
    close(results[0]["vector"], one_process["vector"], "steering vector")
    assert results[0]["coeff"] == pytest.approx(one_process["coeff"], rel=1e-6)
    close(results[0]["steered_logits"], one_process["steered_logits"], "steered logits")
    assert not torch.allclose(one_process["steered_logits"], one_process["corrupt_logits"])  # it steers
    close(results[0]["split_forward"], one_process["logits"], "stop_at_layer, then start_at_layer")
    close(results[0]["logits"], one_process["logits"], "logits")
    for rank, got in enumerate(results):  # generate returns the tokens on every rank
        for name in ("steered_generation", "greedy", "sampled"):
            want = one_process[name]
            assert (got[name] == want) if isinstance(want, str) else torch.equal(got[name], want), (name, rank)


WEIGHTS = ["W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_gate", "W_out", "W_U", "b_U", "W_E", "QK", "OV", "bias"]


def test_weight_views_and_head_results_equal_one_process(ranks, one_process):
    """After hold_weights (every rank), rank 0's weight views and the cache methods that read
    weights give one process's values; before it, a clear error names the call to make."""
    world, results = ranks
    got = results[0]
    for name in WEIGHTS + ["directions", "logit_attrs", "neurons"]:
        close(got[name], one_process[name], f"{name} on {world} ranks")
    heads, labels = got["heads"]
    want_heads, want_labels = one_process["heads"]
    assert labels == want_labels and labels[-1] == "remainder"
    close(heads, want_heads, "stack_head_results")
    for key, value in one_process["dla"].items():  # direct logit attribution, every part
        if isinstance(value, float):
            assert got["dla"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        else:
            close(got["dla"][key], value, f"dla {key}")
    assert torch.equal(got["lens"]["tokens"], one_process["lens"]["tokens"]), "logit lens top tokens"
    close(got["lens"]["probs"], one_process["lens"]["probs"], "logit lens top probabilities")
    close(got["lens"]["target_logits"], one_process["lens"]["target_logits"], "logit lens target logits")
    w_q, w_u, head_results = got["errors"]
    assert "blocks.1.attn.W_Q is not held by this process" in w_q and "model.hold_weights('attn.W_Q')" in w_q
    assert "unembed.W_U is not held" in w_u and "model.hold_weights('unembed.W_U')" in w_u
    assert "model.hold_weights('attn.W_O')" in head_results


def test_attribution_patching_gradients_cross_ranks(ranks, one_process):
    """AtP and AtP* (with GradDrop) and EAP-IG: the metric's gradient goes back from rank 0
    through every rank, and the estimates (elementwise products, edge scores) equal one process's."""
    world, results = ranks
    got = results[0]
    for name in ("atp_block_every", "atp_heads_every", "atp_star_k_by_pos", "atp_star_q_grad_drop"):
        close(got[name], one_process[name], f"{name} on {world} ranks")
    assert got["atp_block_every"][0, 0].abs().sum() > 0  # block 0, on rank 0: the gradient came back
    assert list(got["products"]) == ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"]
    for site, product in one_process["products"].items():
        close(got["products"][site], product, site)
        assert product.abs().sum() > 0, site
    edges, want = got["eap_ig"], one_process["eap_ig"]
    assert list(edges) == list(want) and any(s != 0 for s in want.values())  # same edges, same order
    close(torch.tensor(list(edges.values())), torch.tensor(list(want.values())), "EAP-IG scores")


def test_process_weights_on_a_split_model_equals_one_process(ranks, one_process):
    """Each rank processes the groups it holds (W_E centred on rank 0, ln_final folded into a
    centred W_U on the last rank): the logits, every cached site and every weight equal one
    process's ``process_weights_``."""
    world, results = ranks
    got, want = results[0]["processed"], one_process["processed"]
    assert got["steps"] == want["steps"] and "center_writing_weights" in want["steps"]
    close(got["logits"], want["logits"], f"processed logits on {world} ranks")
    assert list(got["cache"]) == list(want["cache"])
    for site, act in want["cache"].items():
        close(got["cache"][site], act, site)
    assert list(got["weights"]) == list(want["weights"])
    for name, weight in want["weights"].items():
        close(got["weights"][name], weight, name)
