"""Activation patching sweeps and attribution patching.

The stacked sweeps must give the numbers of one patch per forward (a plain loop written
here, TransformerLens's way); attribution patching must equal the exact sweep where the
metric is affine in the patched site and approach it to second order elsewhere.
"""

import itertools
import sys

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer, UnknownHookError
from transformer_hooks.interventions import patching as P
from transformer_hooks.utils import get_act_name

BATCH, POS, DIFF_POS = 2, 6, 2


def logit_diff(logits):
    """A TL-style metric: [batch, pos, d_vocab] -> scalar (and [n, batch, pos, d_vocab] -> [n])."""
    return logits[..., -1, 3].mean(-1) - logits[..., -1, 5].mean(-1)


@pytest.fixture(scope="module")
def models(hooked_model):
    return hooked_model


def tokens_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (BATCH, POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, DIFF_POS] = (clean[:, DIFF_POS] + 1 + torch.randint(0, VOCAB - 1, (BATCH,), generator=g)) % VOCAB
    return clean, corrupted


def no_hooks_attached(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def one_patch_per_forward(model, corrupted, cache, metric, setter, name, shape):
    """The reference: TransformerLens's loop, one forward per index."""
    out = torch.empty(shape)
    for index in itertools.product(*map(range, shape)):
        site = get_act_name(name, index[0])

        def hook(act, hook, index=index, site=site):
            return setter(act.clone(), index, cache[site])

        with torch.no_grad():
            out[index] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(site, hook)]))
    return out


LP, LPH, LH, LHP = ("layer", "pos"), ("layer", "pos", "head"), ("layer", "head"), ("layer", "head", "pos")
SWEEPS = [  # (sweep, activation, TL's patch setter, output axes)
    (P.get_act_patch_resid_pre, "resid_pre", P.layer_pos_patch_setter, LP),
    (P.get_act_patch_resid_mid, "resid_mid", P.layer_pos_patch_setter, LP),
    (P.get_act_patch_attn_out, "attn_out", P.layer_pos_patch_setter, LP),
    (P.get_act_patch_mlp_out, "mlp_out", P.layer_pos_patch_setter, LP),
    (P.get_act_patch_attn_head_out_by_pos, "z", P.layer_pos_head_vector_patch_setter, LPH),
    (P.get_act_patch_attn_head_q_all_pos, "q", P.layer_head_vector_patch_setter, LH),
    (P.get_act_patch_attn_head_k_by_pos, "k", P.layer_pos_head_vector_patch_setter, LPH),
    (P.get_act_patch_attn_head_v_all_pos, "v", P.layer_head_vector_patch_setter, LH),
    (P.get_act_patch_attn_head_out_all_pos, "z", P.layer_head_vector_patch_setter, LH),
    (P.get_act_patch_attn_head_pattern_by_pos, "pattern", P.layer_head_pos_pattern_patch_setter, LHP),
    (P.get_act_patch_attn_head_pattern_all_pos, "pattern", P.layer_head_pattern_patch_setter, LH),
]


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "pythia"])
def test_stacked_sweeps_equal_one_patch_per_forward(models, name):
    model = models(name)
    cfg = model.cfg
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    # Every sweep on the GQA model; the stacking is architecture-blind, so a few elsewhere.
    sweeps = SWEEPS if name == "llama-gqa" else [s for s in SWEEPS if s[1] in ("resid_pre", "resid_mid", "pattern")]
    for fn, act, setter, axes in sweeps:
        if act == "resid_mid" and cfg.parallel_residual:
            with pytest.raises(UnknownHookError, match="resid_mid"):
                fn(model, corrupted, cache, logit_diff, progress=False)
            continue
        # batch_size=5 makes chunks that straddle layers and leave a ragged last chunk.
        got = fn(model, corrupted, cache, logit_diff, batch_size=5, progress=False)
        # Key and value sites have n_kv_heads heads (GQA).
        size = {"layer": cfg.n_layers, "pos": POS, "head": cfg.n_kv_heads if act in "kv" else cfg.n_heads}
        shape = tuple(size[a] for a in axes)
        assert tuple(got.shape) == shape, fn.__name__
        ref = one_patch_per_forward(model, corrupted, cache, logit_diff, setter, act, shape)
        assert ref.max() - ref.min() > 1e-3, "patches should matter, or the comparison proves nothing"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m, fn=fn: f"{fn.__name__}: {m}")
    assert no_hooks_attached(model)


def test_layer_zero_patch_of_the_differing_position_restores_the_clean_run(models):
    """resid_pre[0] differs only where the tokens differ: patching it there is the clean run."""
    model = models("llama-gqa")
    clean, corrupted = tokens_pair()
    clean_logits, cache = model.run_with_cache(clean)
    with torch.no_grad():
        corrupted_metric = logit_diff(model(corrupted))
    out = P.get_act_patch_resid_pre(model, corrupted, cache, logit_diff, progress=False)
    torch.testing.assert_close(out[0, DIFF_POS], logit_diff(clean_logits), atol=1e-5, rtol=0)
    others = [p for p in range(POS) if p != DIFF_POS]
    torch.testing.assert_close(out[0, others], corrupted_metric.expand(len(others)), atol=1e-5, rtol=0)


def test_every_sweeps_stack_the_single_sweeps(models):
    model = models("llama-gqa")  # GQA: 6 query heads, 2 kv heads
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    kw = dict(progress=False)
    block = P.get_act_patch_block_every(model, corrupted, cache, logit_diff, **kw)
    single = [P.get_act_patch_resid_pre, P.get_act_patch_attn_out, P.get_act_patch_mlp_out]
    torch.testing.assert_close(
        block, torch.stack([f(model, corrupted, cache, logit_diff, **kw) for f in single]), atol=1e-5, rtol=0
    )

    heads = P.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, logit_diff, **kw)
    assert heads.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    k = P.get_act_patch_attn_head_k_all_pos(model, corrupted, cache, logit_diff, **kw)
    kv = model.cfg.n_kv_heads
    torch.testing.assert_close(heads[2, :, :kv], k, atol=1e-5, rtol=0)
    # Heads that do not exist (GQA k and v rows beyond n_kv_heads) are 0, as in TransformerLens.
    assert (heads[2:4, :, kv:] == 0).all() and not heads.isnan().any()

    by_pos = P.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, logit_diff, **kw)
    pattern = P.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, logit_diff, **kw)
    assert by_pos.shape == (5, model.cfg.n_layers, POS, model.cfg.n_heads)
    torch.testing.assert_close(by_pos[4], pattern.transpose(1, 2), atol=1e-5, rtol=0)


def test_index_df_vectorized_metric_and_memory_budget_give_the_grid_values(models):
    model = models("gpt2")
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    grid = P.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, logit_diff, progress=False)

    rows = torch.tensor([[1, 3, 0], [0, DIFF_POS, 2], [1, 0, 3], [0, 5, 1]])
    flat = P.generic_activation_patch(
        model, corrupted, cache, logit_diff, P.layer_pos_head_vector_patch_setter, "z", index_df=rows, progress=False
    )
    assert flat.shape == (4,)
    torch.testing.assert_close(flat, grid[tuple(rows.T)], atol=1e-5, rtol=0)

    vectorized = P.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, logit_diff, vectorized_metric=True, progress=False
    )
    torch.testing.assert_close(vectorized, grid, atol=1e-5, rtol=0)
    one_per_forward = P.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, logit_diff, max_batch_bytes=1, progress=False
    )
    torch.testing.assert_close(one_per_forward, grid, atol=1e-5, rtol=0)


def count_forwards(model, monkeypatch):
    calls = []
    forward = model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return calls


def test_bad_input_fails_before_any_forward(models, monkeypatch):
    model = models("llama-gqa")
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    _, resid_only = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    _, short_cache = model.run_with_cache(clean[:, :-1])
    calls = count_forwards(model, monkeypatch)

    with pytest.raises(ValueError, match="one number per patched run"):
        P.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: lg[:, -1, 3], progress=False)
    with pytest.raises(ValueError, match=r"vectorized_metric=True\) returned shape \(\)"):
        P.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: lg.mean(), vectorized_metric=True)
    with pytest.raises(TypeError, match="must return a tensor"):
        P.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: "good")
    with pytest.raises(ValueError, match="clean and corrupted inputs differ in shape"):
        P.get_act_patch_resid_pre(model, corrupted, short_cache, logit_diff)
    with pytest.raises(ValueError, match="clean and corrupted inputs differ in shape"):
        P.get_act_patch_resid_pre(model, corrupted[:1], cache, logit_diff)
    with pytest.raises(KeyError, match="clean_cache holds no 'blocks.0.hook_attn_out'"):
        P.get_act_patch_attn_out(model, corrupted, resid_only, logit_diff)
    with pytest.raises(ValueError, match="unknown activation name 'resid_middle'"):
        P.generic_activation_patch(
            model, corrupted, cache, logit_diff, P.layer_pos_patch_setter, "resid_middle", ("layer", "pos")
        )
    with pytest.raises(UnknownHookError, match="blocks.0.hook_pos_embedding"):
        P.generic_activation_patch(
            model,
            corrupted,
            cache,
            logit_diff,
            P.layer_pos_patch_setter,
            "blocks.0.hook_pos_embedding",
            ("layer", "pos"),
        )
    with pytest.raises(ValueError, match="unknown index axis names \\['position'\\]"):
        P.generic_activation_patch(
            model, corrupted, cache, logit_diff, P.layer_pos_patch_setter, "resid_pre", ("layer", "position")
        )
    with pytest.raises(ValueError, match="metric raised"):

        def broken(logits):
            raise ValueError("metric raised")

        P.get_act_patch_resid_pre(model, corrupted, cache, broken)
    with pytest.raises(ValueError, match="one number per patched run"):
        P.get_attr_patch_resid_pre(model, corrupted, cache, lambda lg: lg[:, -1, 3])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
        with pytest.raises(ImportError, match="pip install pandas"):
            P.get_act_patch_resid_pre(model, corrupted, cache, logit_diff, return_index_df=True)
    assert calls == [], "a check ran after a forward"

    with pytest.raises(ValueError, match="does not depend differentiably"):
        P.get_attr_patch_resid_pre(model, corrupted, cache, lambda lg: lg[:, -1].argmax(-1).float().mean())
    assert no_hooks_attached(model)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_mid_sweep_leaves_no_hook(models, error):
    model = models("gpt2")
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    calls = []

    def fails_on_the_fourth_patch(logits):
        calls.append(1)
        if len(calls) == 5:  # the first call is the check on trial logits
            raise error("stop")
        return logit_diff(logits)

    with pytest.raises(error):
        P.get_act_patch_attn_head_out_by_pos(
            model, corrupted, cache, fails_on_the_fourth_patch, batch_size=2, progress=False
        )
    assert len(calls) == 5 and no_hooks_attached(model)

    def setter_fails(corrupted_activation, index, clean_activation):
        raise error("stop")

    with pytest.raises(error):
        P.generic_activation_patch(
            model, corrupted, cache, logit_diff, setter_fails, "resid_pre", ("layer", "pos"), progress=False
        )
    assert no_hooks_attached(model)


# Attribution patching ---------------------------------------------------------------------------
def freeze_final_scale(model, corrupted):
    """A hook that replaces the final norm's scale with the corrupted run's, in every run (stacked or
    not): logits are then affine in the last block's output."""
    _, c = model.run_with_cache(corrupted, names_filter="ln_final.hook_scale")
    frozen = c["ln_final.hook_scale"]
    return "ln_final.hook_scale", lambda x, hook: frozen.repeat(x.shape[0] // frozen.shape[0], 1, 1)


def effect(model, corrupted, metric):
    with torch.no_grad():
        return metric(model(corrupted))


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_attribution_is_exact_where_the_metric_is_affine_in_the_site(hf_checkpoint, name):
    """With the final norm's scale frozen, the metric is affine in the last block's resid_post and
    mlp_out; with the last MLP's W_out zeroed as well, in its resid_mid, attn_out, z, v and pattern
    (z = pattern · v). There the linear estimate must be the exact patch effect."""
    path, _ = hf_checkpoint(name)
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)

    def metric(logits):  # linear in the logits, reading two positions
        return logits[:, -1, 3].mean() - 2 * logits[:, 4, 5].mean()

    def check(attr_fn, sweep_fn):
        exact = sweep_fn(model, corrupted, cache, metric, progress=False) - effect(model, corrupted, metric)
        attr = attr_fn(model, corrupted, cache, metric)
        assert attr.shape == exact.shape
        assert exact[-1].abs().max() > 0.01, f"{sweep_fn.__name__}: the patches must move the metric"
        torch.testing.assert_close(attr[-1], exact[-1], atol=2e-5, rtol=1e-4, msg=lambda m: f"{attr_fn.__name__}: {m}")

    with model.hooks(fwd_hooks=[freeze_final_scale(model, corrupted)]):
        check(P.get_attr_patch_resid_post, P.get_act_patch_resid_post)
        check(P.get_attr_patch_mlp_out, P.get_act_patch_mlp_out)
    with torch.no_grad():
        model.blocks[-1].mlp.W_out.zero_()
    with model.hooks(fwd_hooks=[freeze_final_scale(model, corrupted)]):
        check(P.get_attr_patch_resid_mid, P.get_act_patch_resid_mid)
        check(P.get_attr_patch_attn_out, P.get_act_patch_attn_out)
        check(P.get_attr_patch_attn_head_out_by_pos, P.get_act_patch_attn_head_out_by_pos)
        check(P.get_attr_patch_attn_head_out_all_pos, P.get_act_patch_attn_head_out_all_pos)
        check(P.get_attr_patch_attn_head_v_by_pos, P.get_act_patch_attn_head_v_by_pos)
        check(P.get_attr_patch_attn_head_pattern_by_pos, P.get_act_patch_attn_head_pattern_by_pos)
        check(P.get_attr_patch_attn_head_pattern_dest_src_pos, P.get_act_patch_attn_head_pattern_dest_src_pos)
    assert no_hooks_attached(model)
    assert all(p.grad is None for p in model.parameters()), "attribution must not write parameter grads"


def pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", ["llama-gqa", "pythia"])
def test_attribution_approaches_the_sweep_to_second_order(models, name):
    """Clean = corrupted with the embeddings nudged by eps. The estimate's error is second order:
    halving eps quarters it, and at small eps it correlates almost perfectly with the exact sweep."""
    model = models(name)
    _, corrupted = tokens_pair()
    noise = torch.randn(BATCH, POS, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    base = effect(model, corrupted, logit_diff)
    errors, correlations = [], []
    for eps in (0.02, 0.01):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook, eps=eps: x + eps * x.std() * noise)]):
            _, cache = model.run_with_cache(corrupted)
        exact = (
            torch.cat(
                [
                    P.get_act_patch_block_every(model, corrupted, cache, logit_diff, progress=False).flatten(),
                    P.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, logit_diff, progress=False).flatten(),
                ]
            )
            - base
        )
        attr = torch.cat(
            [
                P.get_attr_patch_block_every(model, corrupted, cache, logit_diff).flatten(),
                P.get_attr_patch_attn_head_out_by_pos(model, corrupted, cache, logit_diff).flatten(),
            ]
        )
        errors.append(float((attr - exact).norm()))
        correlations.append(pearson(attr, exact))
    assert 3.0 < errors[0] / errors[1] < 5.0, f"error should shrink as eps^2: {errors}"
    assert correlations[1] > 0.99, correlations


def test_attribution_every_matches_the_single_estimates(models):
    model = models("llama-gqa")
    clean, corrupted = tokens_pair()
    _, cache = model.run_with_cache(clean)
    every = P.get_attr_patch_attn_head_all_pos_every(model, corrupted, cache, logit_diff)
    singles = [
        P.get_attr_patch_attn_head_out_all_pos,
        P.get_attr_patch_attn_head_q_all_pos,
        P.get_attr_patch_attn_head_k_all_pos,
        P.get_attr_patch_attn_head_v_all_pos,
        P.get_attr_patch_attn_head_pattern_all_pos,
    ]
    kv = model.cfg.n_kv_heads
    for i, fn in enumerate(singles):
        single = fn(model, corrupted, cache, logit_diff)
        torch.testing.assert_close(every[i, :, : single.shape[-1]], single, atol=1e-6, rtol=1e-5)
    assert (every[2:4, :, kv:] == 0).all()
    # The all-positions estimate is the sum of the by-position ones (the estimate is linear).
    by_pos = P.get_attr_patch_attn_head_by_pos_every(model, corrupted, cache, logit_diff)
    torch.testing.assert_close(by_pos[:4].sum(2), every[:4], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_real_model_patches_in_one_forward(embedded_model):
    """SmolLM2: an IOI prompt pair; patching the differing name at layer 0 is the clean run, patching
    an identical position changes nothing, and two patches share one forward."""
    model = embedded_model
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    assert clean.shape == corrupted.shape
    diff = int((clean != corrupted).nonzero()[0, 1])
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    clean_logits, cache = model.run_with_cache(clean, names_filter=["blocks.0.hook_resid_pre"])
    rows = [(0, diff), (0, diff + 1)]
    out = P.generic_activation_patch(
        model,
        corrupted,
        cache,
        metric,
        P.layer_pos_patch_setter,
        "resid_pre",
        index_df=rows,
        batch_size=2,
        progress=False,
    )
    corrupted_metric = effect(model, corrupted, metric)
    assert (metric(clean_logits) - corrupted_metric).abs() > 0.5
    torch.testing.assert_close(out[0], metric(clean_logits), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out[1], corrupted_metric, atol=1e-3, rtol=1e-4)
    assert no_hooks_attached(model)


# TransformerLens's transformer_lens/patching.py public functions (TL 2.x/3.x).
TL_PATCHING_NAMES = [
    "make_df_from_ranges",
    "generic_activation_patch",
    "layer_pos_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_block_every",
]


def test_public_names_are_transformer_lens_s_and_each_sweep_is_a_real_function():
    """Every TL name imports from the package; each sweep is its own named, documented function
    with TL's leading parameters, and every get_attr_patch_X has its get_act_patch_X."""
    import inspect

    public = {n for n in dir(P) if not n.startswith("_")}
    assert set(TL_PATCHING_NAMES) <= public, sorted(set(TL_PATCHING_NAMES) - public)
    sweeps = sorted(n for n in public if n.startswith(("get_act_patch_", "get_attr_patch_")))
    for name in sweeps:
        fn = getattr(P, name)
        assert fn.__name__ == fn.__qualname__ == name
        assert fn.__module__.startswith("transformer_hooks.interventions.patching.")
        assert fn.__doc__ and fn.__doc__.strip()
        params = list(inspect.signature(fn).parameters)
        assert params[:3] == ["model", "corrupted_tokens", "clean_cache"], (name, params)
        assert params[3] in ("patching_metric", "metric"), (name, params)
    acts = {n.removeprefix("get_act_patch_") for n in sweeps if n.startswith("get_act_patch_")}
    attrs = {n.removeprefix("get_attr_patch_") for n in sweeps if n.startswith("get_attr_patch_")}
    assert attrs == acts
    assert "globals()" not in inspect.getsource(P.sweeps) + inspect.getsource(P.attribution)
