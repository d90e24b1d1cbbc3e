"""ActivationCache: the decompositions sum to what the model computed, on folded and
unfolded models of every family; TransformerLens's indexing; the logit lens; the DLA
workflow of a TransformerLens notebook on the real model; clear errors."""

import einops
import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer
from transformer_hooks.analysis.lens import final_norm, logit_lens, unembed
from transformer_hooks.cache import ActivationCache, NotCachedError
from transformer_hooks.utils import get_act_name

FAMILIES = ["gpt2", "gpt-neo-local", "pythia", "neox-sequential-full-rotary", "llama-gqa", "llama-head-dim-bias"]
TOL = 1e-4
B, P = 2, 7


def tokens(seed=0):
    return torch.randint(0, VOCAB, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run(hooked_model):
    """(family, folded) -> (model, logits, full cache), made once per module."""
    made = {}

    def get(name, folded):
        if (name, folded) not in made:
            model = hooked_model(name, processed=folded)
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens())
            made[name, folded] = model, logits, cache
        return made[name, folded]

    return get


def close(actual, expected, tol=TOL):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


# Exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_full_decomposition_through_the_final_norm_gives_the_logits(run, name, folded):
    model, logits, cache = run(name, folded)
    assert model.cfg.normalization_type.endswith("Pre") == folded  # fold_ln really applied (or not)
    assert ("fold_ln" in model.cfg.processing) == folded
    for expand_neurons in (False, True):
        stack, labels = cache.get_full_resid_decomposition(
            apply_ln=True, expand_neurons=expand_neurons, return_labels=True
        )
        assert len(labels) == stack.shape[0] and labels[-1] == "bias"
        close(stack.sum(0) @ model.W_U + model.b_U, logits)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_inner_decompositions_through_each_norm_give_its_output(run, name, folded):
    """Into every layer's ln1 and ln2: the rows, normalised with the cached scale, sum to
    what the norm module computes from the whole residual stream (weight and bias included)."""
    model, _, cache = run(name, folded)
    for layer in range(model.cfg.n_layers):
        block = model.blocks[layer]
        for mlp_input, norm in ((False, block.ln1), (True, block.ln2)):
            stack = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, apply_ln=True, expand_neurons=False)
            resid = (
                cache["resid_mid", layer]
                if mlp_input and not model.cfg.parallel_residual
                else cache["resid_pre", layer]
            )
            with torch.no_grad():
                close(stack.sum(0), norm(resid))


@pytest.mark.parametrize("name", FAMILIES)
def test_head_results_plus_b_O_are_attn_out(run, name):
    model, _, cache = run(name, True)
    n, h = model.cfg.n_layers, model.cfg.n_heads
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape == (n * h, B, P, model.cfg.d_model)
    assert labels[:2] == ["L0H0", "L0H1"] and labels[-1] == f"L{n - 1}H{h - 1}"
    per_layer = einops.rearrange(heads, "(layer head) ... -> layer head ...", layer=n)
    for layer in range(n):
        close(per_layer[layer].sum(0) + model.blocks[layer].attn.b_O, cache["attn_out", layer])


@pytest.mark.parametrize("name", FAMILIES)
def test_neuron_results_plus_b_out_are_mlp_out(run, name):
    model, _, cache = run(name, False)
    for layer in range(model.cfg.n_layers):
        close(cache.get_neuron_results(layer).sum(-2) + model.blocks[layer].mlp.b_out, cache["mlp_out", layer])
    stack, labels = cache.stack_neuron_results(1, neuron_slice=3, return_labels=True)
    assert labels == ["L0N3"]
    close(stack[0], cache.get_neuron_results(0)[..., 3, :])


@pytest.mark.parametrize("name", FAMILIES)
def test_decompose_resid_sums_to_each_residual_stream(run, name):
    model, _, cache = run(name, False)
    n = model.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    close(stack.sum(0), cache["resid_post", -1])
    assert labels[0] == "embed" and labels[-2:] == [f"{n - 1}_attn_out", f"{n - 1}_mlp_out"]
    assert ("pos_embed" in labels) == (model.cfg.positional_embedding == "learned")
    for layer in range(n):
        close(cache.decompose_resid(layer).sum(0), cache["resid_pre", layer])
        mlp_in = cache["resid_pre", layer] if model.cfg.parallel_residual else cache["resid_mid", layer]
        close(cache.decompose_resid(layer, mlp_input=True).sum(0), mlp_in)
    attn, mlp = cache.decompose_resid(mode="attn"), cache.decompose_resid(mode="mlp", incl_embeds=False)
    close(attn.sum(0) + mlp.sum(0), cache["resid_post", -1])


@pytest.mark.parametrize("name", FAMILIES)
def test_accumulated_resid_ends_at_the_last_resid_post(run, name):
    model, logits, cache = run(name, True)
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    close(stack[-1], cache["resid_post", -1])
    assert labels[-1] == "final_post" and labels[0] == "0_pre"
    assert ("0_mid" in labels) != model.cfg.parallel_residual  # parallel blocks have no resid_mid
    for label, row in zip(labels, stack, strict=True):
        layer, kind = label.split("_")
        if kind == "pre":
            close(row, cache["resid_pre", int(layer)])
    # Through the final norm the last row gives the logits (folded: no weight left to apply).
    close(cache.accumulated_resid(apply_ln=True)[-1] @ model.W_U + model.b_U, logits)
    assert cache.accumulated_resid(layer=2).shape[0] == 3  # 0_pre, 1_pre, 2_pre (or final_post)
    assert cache.accumulated_resid(layer=-2, return_labels=True)[1][-1] == f"{n - 1}_pre"


@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-gqa"])
def test_head_results_from_z_equal_the_cached_hook_result(run, name):
    model, _, full = run(name, False)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens(), names_filter=["blocks.*.attn.hook_result", "blocks.*.attn.hook_z", "hook_embed"]
        )
    from_z = ActivationCache({k: v for k, v in cache.items() if "hook_result" not in k}, model)
    assert "blocks.0.attn.hook_result" not in from_z
    close(from_z.stack_head_results(pos_slice=-1), cache.stack_head_results(pos_slice=-1), tol=1e-5)
    from_z.compute_head_results()
    for layer in range(model.cfg.n_layers):
        close(from_z["result", layer], cache["result", layer], tol=1e-5)
    close(from_z.stack_head_results(), full.stack_head_results(), tol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_and_unfolded_models_give_the_same_attributions(run, name):
    """apply_ln_to_stack applies an unfolded norm's weight exactly, so per-layer DLA is the
    same number whether or not fold_ln (and centring) rewrote the weights."""
    attrs = []
    for folded in (True, False):
        model, _, cache = run(name, folded)
        parts, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
        attrs.append(cache.logit_attrs(parts, tokens()[:, 0], tokens()[:, 1], pos_slice=-1))
    assert attrs[0].shape == (len(labels), B)
    close(attrs[0], attrs[1])


def test_bfloat16_models_keep_their_dtype(hf_checkpoint):
    """The cached norm scale is float32; the stacks stay in the model's dtype, so
    ``stack @ model.W_U`` works, and agree with the logits to bfloat16 rounding."""
    model = HookedTransformer.from_pretrained(str(hf_checkpoint("llama-gqa")[0]), dtype=torch.bfloat16)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens())
        stack = cache.get_full_resid_decomposition(apply_ln=True)
        assert stack.dtype == torch.bfloat16 and cache["scale"].dtype == torch.float32
        error = (stack.sum(0) @ model.W_U + model.b_U - logits).abs().max()
    assert error < 0.02 * logits.abs().max()  # a few bfloat16 roundings (2**-8 relative)


# Model helpers ---------------------------------------------------------------------------------
def test_per_query_head_value_weights_reproduce_z(run):
    """GQA: W_V_per_query_head gives each query head its value head, so pattern · v == z."""
    model, _, cache = run("llama-gqa", False)
    cfg = model.cfg
    assert cfg.n_kv_heads < cfg.n_heads
    W_V, b_V = model.W_V_per_query_head, model.b_V_per_query_head
    assert W_V.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert torch.equal(model.W_K_per_query_head[:, 5], model.W_K[:, 5 // cfg.group_size])
    for layer in range(cfg.n_layers):
        with torch.no_grad():
            x = model.blocks[layer].ln1(cache["resid_pre", layer])
        v = einops.einsum(x, W_V[layer], "b p d, h d e -> b p h e") + b_V[layer]
        z = einops.einsum(cache["pattern", layer], v, "b h q k, b k h e -> b q h e")
        close(z, cache["z", layer], tol=1e-5)


def test_tokens_to_residual_directions(run):
    model, _, _ = run("llama-gqa", False)
    ids = torch.tensor([[3, 5], [7, 11]])
    dirs = model.tokens_to_residual_directions(ids)
    assert dirs.shape == (2, 2, model.cfg.d_model)
    assert torch.equal(dirs[1, 0], model.W_U[:, 7])
    assert torch.equal(model.tokens_to_residual_directions(9), model.W_U[:, 9])
    with pytest.raises(ValueError, match="outside|in \\[0"):
        model.tokens_to_residual_directions(VOCAB)


# Indexing and dict-like access ------------------------------------------------------------------
def test_indexing_by_full_name_short_name_and_layer(run):
    model, _, cache = run("gpt2", False)
    n = model.cfg.n_layers
    last = cache[f"blocks.{n - 1}.hook_resid_post"]
    assert cache["resid_post", -1] is last and cache["resid_post", n - 1] is last
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["k1"] is cache["blocks.1.attn.hook_k"] and cache["scale1ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["embed"] is cache["hook_embed"] and cache["pattern", 0].shape == (B, model.cfg.n_heads, P, P)
    assert get_act_name("z", -1, n_layers=n) == f"blocks.{n - 1}.attn.hook_z"
    assert "blocks.0.hook_resid_pre" in cache and ("resid_pre", 0) in cache and ("resid_pre", 99) not in cache
    assert len(cache) == len(list(cache.keys())) == len(list(cache.values())) == len(dict(cache.items()))
    assert set(cache) == set(cache.keys())
    stacked = cache.stack_activation("pattern")
    assert stacked.shape == (n, B, model.cfg.n_heads, P, P) and torch.equal(stacked[1], cache["pattern", 1])


def test_batch_slicing_removing_the_batch_dim_and_moving(run):
    model, _, cache = run("llama-gqa", True)
    one = cache.apply_slice_to_batch_dim([1])
    assert one.has_batch_dim and one["resid_pre", 0].shape == (1, P, model.cfg.d_model)
    expected = cache.decompose_resid(pos_slice=-1)[:, 1]
    one.remove_batch_dim()
    assert not one.has_batch_dim and one["resid_pre", 0].shape == (P, model.cfg.d_model)
    # The methods work without a batch dim, and agree with the batched cache.
    close(one.decompose_resid(pos_slice=-1), expected)
    close(
        one.get_full_resid_decomposition(apply_ln=True).sum(0) @ model.W_U + model.b_U,
        model(tokens()[1:2])[0],
        tol=1e-4,
    )
    with pytest.raises(ValueError, match="batch of one"):
        cache.apply_slice_to_batch_dim([0, 1]).remove_batch_dim()
    moved = one.to("cpu")
    assert moved is one and all(v.device.type == "cpu" for v in moved.values())


# Logit lens ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-gqa"])
def test_logit_lens_of_the_last_residual_is_the_model_output(run, name, folded):
    model, logits, cache = run(name, folded)
    n = model.cfg.n_layers
    target = logits.argmax(-1)
    for norm in ("recompute", "cached"):
        lens = logit_lens(model, cache, top_k=4, targets=target, norm=norm, progress=False)
        last = lens.labels.index(f"{n - 1}_resid_post")
        top = logits.topk(4, dim=-1)
        assert torch.equal(lens.top_tokens[last], top.indices)
        close(lens.top_logits[last], top.values)
        close(lens.top_probs[last], logits.softmax(-1).gather(-1, top.indices))
        assert (lens.target_ranks[last] == 0).all()
    layers, grid = lens.grid("resid_post", "target_probs")
    assert layers == list(range(n)) and grid.shape == (n, B, P)
    assert ("resid_mid" in lens.sites) != model.cfg.parallel_residual


def test_logit_lens_decodes_sublayer_outputs_like_the_norm_module(run):
    """The recomputed final norm of an attention output is what ln_final itself computes."""
    model, _, cache = run("gpt2", False)
    lens = logit_lens(model, tokens(), sites=["attn_out"], layers=[-1], pos_slice=-1, top_k=2, progress=False)
    assert lens.labels == [f"{model.cfg.n_layers - 1}_attn_out"]
    with torch.no_grad():
        expected = model.unembed(model.ln_final(cache["attn_out", -1][:, -1]))
    assert torch.equal(lens.top_tokens[0], expected.topk(2, -1).indices)
    x = cache["attn_out", 0]
    close(unembed(model, final_norm(model, x)), model.unembed(model.ln_final(x)).detach())


# The TransformerLens DLA notebook, on the real model ------------------------------------------
def test_transformer_lens_dla_workflow_on_the_embedded_model(embedded_model):
    """TL's exploratory-analysis code, with only the import changed: Paris beats London,
    and the accumulated residual stream ends at the model's own logit difference."""
    with torch.no_grad():  # as TL notebooks run (torch.set_grad_enabled(False))
        model = embedded_model
        prompts = ["The capital of France is"]
        answer_tokens = torch.tensor([[model.to_single_token(" Paris"), model.to_single_token(" London")]])
        logits, cache = model.run_with_cache(model.to_tokens(prompts))
        final_logits = logits[:, -1, :]
        answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
        logit_diff = (answer_logits[:, 0] - answer_logits[:, 1]).mean()
        assert logit_diff > 0

        answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
        logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

        def residual_stack_to_logit_diff(residual_stack, cache):
            scaled = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
            diffs = einops.einsum(scaled, logit_diff_directions, "... batch d_model, batch d_model -> ...")
            return diffs / len(prompts)

        accumulated_residual, labels = cache.accumulated_resid(
            layer=-1, incl_mid=True, pos_slice=-1, return_labels=True
        )
        logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
        assert labels[-1] == "final_post" and len(labels) == 2 * model.cfg.n_layers + 1
        assert abs(float(logit_lens_logit_diffs[-1]) - float(logit_diff)) < 1e-3

        per_layer_residual, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
        per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
        assert abs(float(per_layer_logit_diffs.sum()) - float(logit_diff)) < 1e-3  # Llama: no b_U, no norm bias

        per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
        per_head_residual = einops.rearrange(
            per_head_residual, "(layer head) ... -> layer head ...", layer=model.cfg.n_layers
        )
        per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
        assert per_head_logit_diffs.shape == (model.cfg.n_layers, model.cfg.n_heads)
        # Each layer's heads plus its b_O are that layer's attention output.
        b_O = residual_stack_to_logit_diff(model.b_O[:, None].detach().expand(-1, 1, -1), cache)
        attn = per_layer_logit_diffs[[layer_labels.index(f"{L}_attn_out") for L in range(model.cfg.n_layers)]]
        close(per_head_logit_diffs.sum(-1) + b_O, attn, tol=1e-3)


# Bad input --------------------------------------------------------------------------------------
def test_clear_errors(run):
    model, _, cache = run("pythia", False)
    d = model.cfg.d_model
    with pytest.raises(ValueError, match=f"d_model={d}.*shape \\(3, 2, 7, 5\\)"):
        cache.apply_ln_to_stack(torch.zeros(3, B, P, 5))
    with pytest.raises(ValueError, match="pass the pos_slice"):
        cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=-1))  # built with pos_slice=-1, applied without
    with pytest.raises(ValueError, match="out of range.*2 layers"):
        cache["resid_pre", 5]
    with pytest.raises(ValueError, match="layer=7 is out of range"):
        cache.accumulated_resid(layer=7)
    with pytest.raises(ValueError, match="unembedding"):
        cache.decompose_resid(layer=-1, mlp_input=True)
    with pytest.raises(NotCachedError, match="parallel-residual blocks have no resid_mid"):
        cache["resid_mid", 0]
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(cache.decompose_resid(), torch.tensor([1, 2]), torch.tensor([3]))
    _, partial = model.run_with_cache(tokens(), names_filter=["blocks.*.hook_resid_pre", "hook_embed"])
    with pytest.raises(NotCachedError) as err:
        partial.stack_head_results()
    message = str(err.value)
    assert "stack_head_results needs 'blocks.0.attn.hook_z'" in message
    assert "blocks.{0-1}.hook_resid_pre" in message and "hook_embed" in message  # what it holds
    assert "names_filter=[..., 'blocks.*.attn.hook_z']" in message  # how to cache it
    with pytest.raises(NotCachedError, match="per-head expansions"):
        cache["result", 0]


@pytest.mark.parametrize("pos_slice", [-1, (1, 4), [0, 2]])
def test_pos_slice_keeps_those_positions_of_every_site(hf_checkpoint, pos_slice):
    """As TransformerLens: the position dim of each site (the query dim of scores and
    patterns) is sliced; an int drops it."""
    from transformer_hooks.utils import Slice

    path, _ = hf_checkpoint("llama-gqa")
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    toks = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(0))
    names = [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_z",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_k",
        "blocks.0.ln1.hook_scale",
        "blocks.1.mlp.hook_post",
        "blocks.0.hook_q_input",
    ]
    _, full = model.run_with_cache(toks, names_filter=names)
    _, sliced = model.run_with_cache(toks, names_filter=names, pos_slice=pos_slice)
    s = Slice(pos_slice)
    for name in names:
        dim = -3 if full[name].ndim == 4 and not name.endswith("hook_pattern") else -2
        torch.testing.assert_close(sliced[name], s.apply(full[name], dim=dim), atol=1e-6, rtol=0, msg=name)
    n = 3 if isinstance(pos_slice, tuple) else 2
    kept = () if isinstance(pos_slice, int) else (n,)
    assert sliced["blocks.0.attn.hook_pattern"].shape == (2, model.cfg.n_heads, *kept, 6)
    assert sliced["blocks.0.hook_resid_pre"].shape == (2, *kept, model.cfg.d_model)
