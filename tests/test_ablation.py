"""Ablations: zero, mean and resample, as one call and as sweeps.

A sweep stacks many ablations per forward; it must give the numbers of one forward per
ablation (``ablate``), which is itself checked against a hand-written hook.
"""

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer, UnknownHookError
from transformer_hooks.interventions.patching import Ablation, ablate, ablation_sweep, run_ablations
from transformer_hooks.utils import IndexOutOfRangeError

BATCH, POS = 2, 6


def metric(logits):
    return logits[..., -1, 3].mean(-1) - logits[..., -1, 5].mean(-1)


@pytest.fixture(scope="module")
def model(hf_checkpoint, one_thread):
    path, _ = hf_checkpoint("llama-gqa")
    return HookedTransformer.from_pretrained_no_processing(str(path))


def toks(seed, n=BATCH, pos=POS):
    return torch.randint(0, VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))


def no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_one_call_equals_a_hand_written_hook(model):
    tokens, ref = toks(0), toks(1, n=5)
    _, ref_cache = model.run_with_cache(ref, names_filter="blocks.1.attn.hook_z")
    mean = ref_cache["blocks.1.attn.hook_z"].mean(0)  # per position [pos, head, d_head]

    def hook(z, hook):
        z = z.clone()
        z[:, [1, 4], 2] = mean[[1, 4], 2]
        return z

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    got = ablate(model, tokens, "blocks.1.attn.hook_z", heads=2, positions=[1, 4], kind="mean", reference=ref)
    torch.testing.assert_close(got, expected)

    # Zero ablation of two neurons at every position.
    def zero(post, hook):
        post = post.clone()
        post[..., [3, 7]] = 0
        return post

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", zero)])
    torch.testing.assert_close(ablate(model, tokens, "blocks.0.mlp.hook_post", neurons=[3, 7]), expected)
    assert not torch.allclose(expected, model(tokens))
    assert no_hooks(model)


def test_pooled_mean_and_resample_values(model):
    tokens, ref = toks(0), toks(1, n=4, pos=POS)
    site = "blocks.0.hook_attn_out"
    _, c = model.run_with_cache(ref, names_filter=site)
    pooled = c[site].mean((0, 1))

    def hook(x, hook):
        return pooled.expand_as(x).clone()

    expected = model.run_with_hooks(tokens, fwd_hooks=[(site, hook)])
    torch.testing.assert_close(ablate(model, tokens, site, kind="mean", reference=ref, per_position=False), expected)
    # Pooled means take references of another length; per-position ones refuse them.
    longer = toks(2, n=3, pos=POS + 3)
    ablate(model, tokens, site, kind="mean", reference=longer, per_position=False)
    with pytest.raises(ValueError, match=f"{site}.*positions"):
        ablate(model, tokens, site, kind="mean", reference=longer)
    # Resample: each row is some reference prompt's activation; the seed fixes which.
    a = ablate(model, tokens, site, kind="resample", reference=ref, seed=3)
    b = ablate(model, tokens, site, kind="resample", reference=ref, seed=3)
    torch.testing.assert_close(a, b)
    rows = torch.randint(0, 4, (BATCH,), generator=torch.Generator().manual_seed(3))

    def resample(x, hook):
        return c[site][rows].clone()

    torch.testing.assert_close(a, model.run_with_hooks(tokens, fwd_hooks=[(site, resample)]))
    assert no_hooks(model)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_sweeps_equal_one_forward_per_ablation(model, kind):
    tokens, ref = toks(0), toks(1, n=4)
    kw = dict(kind=kind, reference=None if kind == "zero" else ref, seed=1)
    cfg = model.cfg
    for name, over, n in [("z", "head", cfg.n_heads), ("v", "head", cfg.n_kv_heads), ("post", "neuron", cfg.d_mlp)]:
        # batch_size=7: chunks straddle layers and the last one is ragged.
        got = ablation_sweep(model, tokens, metric, name, over=over, batch_size=7, **kw)
        assert got.shape == (cfg.n_layers, n)
        ref_loop = torch.empty(cfg.n_layers, n)
        for layer in range(cfg.n_layers):
            site = f"blocks.{layer}.attn.hook_{name}" if name != "post" else f"blocks.{layer}.mlp.hook_post"
            for i in range(n):
                sel = {"heads": [i]} if over == "head" else {"neurons": [i]}
                ref_loop[layer, i] = ablate(model, tokens, site, metric=metric, **sel, **kw)
        assert ref_loop.max() - ref_loop.min() > 1e-3
        torch.testing.assert_close(got, ref_loop, atol=1e-5, rtol=1e-5)
    # A subset of layers gives those rows of the full sweep.
    full = ablation_sweep(model, tokens, metric, "z", **kw)
    torch.testing.assert_close(
        ablation_sweep(model, tokens, metric, "z", layers=[1], **kw), full[1:], atol=1e-5, rtol=0
    )
    # Ablations restricted to positions, swept over positions.
    got = ablation_sweep(model, tokens, metric, "resid_pre", over="pos", **kw)
    assert got.shape == (cfg.n_layers, POS)
    assert no_hooks(model)


def test_mixed_ablations_in_one_stream(model):
    tokens, ref = toks(0), toks(1, n=3)
    abls = [
        Ablation("blocks.0.attn.hook_z", heads=(1,), kind="mean"),
        Ablation("blocks.1.mlp.hook_post", neurons=(2, 5), positions=(-1,), kind="zero"),
        Ablation("blocks.1.hook_resid_pre", positions=(0, 2), kind="resample"),
    ]
    got = run_ablations(model, tokens, abls, metric, reference=ref, batch_size=2)
    one = torch.stack([ablate(model, tokens, a, reference=ref, metric=metric) for a in abls])
    torch.testing.assert_close(got, one, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_site_and_leaves_no_hook(model):
    tokens = toks(0)
    with pytest.raises(IndexOutOfRangeError, match=r"head=9 .*blocks\.1\.attn\.hook_z"):
        ablate(model, tokens, "blocks.1.attn.hook_z", heads=9)
    with pytest.raises(IndexOutOfRangeError, match=r"head=3 .*hook_k .*kv_head"):
        ablate(model, tokens, "blocks.0.attn.hook_k", heads=3)  # 2 kv heads
    with pytest.raises(UnknownHookError):
        ablate(model, tokens, "blocks.7.attn.hook_z", heads=0)
    with pytest.raises(ValueError, match="another tokenizer"):
        ablate(model, tokens, "blocks.0.hook_mlp_out", kind="mean", reference=torch.full((2, POS), VOCAB + 50))
    wrong = {"blocks.0.hook_mlp_out": torch.zeros(3, POS, model.cfg.d_model + 1)}
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_mlp_out has shape"):
        ablate(model, tokens, "blocks.0.hook_mlp_out", kind="mean", reference=wrong)
    with pytest.raises(ValueError, match="reference"):
        ablate(model, tokens, "blocks.0.hook_mlp_out", kind="resample")
    with pytest.raises(ValueError, match="no neuron axis|no head axis"):
        ablate(model, tokens, "blocks.0.hook_mlp_out", heads=0)
    with pytest.raises(ValueError, match="kind"):
        ablate(model, tokens, "blocks.0.hook_mlp_out", kind="mode")
    assert no_hooks(model)


def test_sweep_unembedding_only_the_metric_positions(model):
    """Rows join the batch at their own layer and only the metric's position is unembedded:
    still the numbers of one full forward per ablation."""
    tokens, ref = toks(0), toks(1, n=4)
    cfg = model.cfg
    loop = torch.tensor(
        [
            [
                ablate(model, tokens, f"blocks.{layer}.attn.hook_z", heads=h, kind="mean", reference=ref, metric=metric)
                for h in range(cfg.n_heads)
            ]
            for layer in range(cfg.n_layers)
        ]
    )
    mean = dict(kind="mean", reference=ref)
    for kw in [dict(batch_size=5), dict(batch_size=3, vectorized_metric=True), {}]:
        for positions in (-1, [2, POS - 1]):
            got = ablation_sweep(model, tokens, metric, "z", metric_positions=positions, **mean, **kw)
            torch.testing.assert_close(got, loop, atol=1e-5, rtol=1e-5)

    def reads_first(logits):
        return logits[..., 0, 3].mean(-1)

    with pytest.raises(ValueError, match="metric_positions"):
        ablation_sweep(model, tokens, reads_first, "z", kind="mean", reference=ref, metric_positions=-1)
    with pytest.raises(IndexOutOfRangeError, match="position"):
        ablation_sweep(model, tokens, metric, "z", kind="mean", reference=ref, metric_positions=POS)
    assert no_hooks(model)
