"""SAE training recipes: each architecture lowers the reconstruction error of synthetic
sparse data from its initial value, saves in SAELens's layout and reloads to the same
function; the straight-through JumpReLU gradients are the published pseudo-derivatives;
resampling rewrites exactly the dead features; training reads harvested datasets."""

import pytest
import torch

from transformer_hooks import HookedTransformer
from transformer_hooks.activations import harvest
from transformer_hooks.sae import SAE, evaluate_sae, train_sae
from transformer_hooks.sae.training import _resample, ghost_loss, jumprelu, step

D, F = 16, 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def sparse_data(n=4096, seed=0):
    """x = sum of ~3 of 24 unit directions with positive magnitudes, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(24, D, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    on = torch.rand(n, 24, generator=g) < 3 / 24
    mags = torch.rand(n, 24, generator=g) * 2 + 0.5
    return (on * mags) @ dirs + 0.3


def mse(sae, x):
    with torch.no_grad():
        return float((sae(x) - x).pow(2).sum(-1).mean())


RECIPES = {
    "standard": dict(l1_coefficient=1e-3, l1_warm_up_steps=20, lr_warm_up_steps=10),
    "unit_norm": dict(
        architecture="standard",
        decoder="unit_norm",
        l1_coefficient=1e-3,
        resample_every=50,
        dead_window=20,
        adam_beta1=0.0,
    ),
    "ghost_grads": dict(architecture="standard", ghost_grads=True, dead_window=10, l1_coefficient=1e-3),
    "jumprelu": dict(l0_coefficient=1e-3, l1_warm_up_steps=20),
    "topk": dict(k=4, dead_window=10),
    "batchtopk": dict(k=4, dead_window=10),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_lowers_the_error_and_saves_in_saelens_format(recipe, tmp_path):
    kw = dict(RECIPES[recipe])
    arch = kw.pop("architecture", recipe)
    data, held_out = sparse_data(), sparse_data(512, seed=1)
    init = train_sae(data, "blocks.0.hook_resid_post", F, arch, steps=0, progress=False, **kw)
    sae = train_sae(
        data,
        "blocks.0.hook_resid_post",
        F,
        arch,
        steps=250,
        batch_size=128,
        lr=3e-3,
        save_to=tmp_path / "sae",
        progress=False,
        **kw,
    )
    assert len(sae.training_log) == 250
    assert mse(sae, held_out) < 0.5 * mse(init, held_out)
    if arch in ("topk",):
        with torch.no_grad():
            assert bool(((sae.encode(held_out) > 0).sum(-1) <= 4).all())
    if arch == "batchtopk":  # saved as SAELens saves it: a JumpReLU with one threshold
        assert sae.cfg.architecture == "jumprelu" and torch.unique(sae.threshold.detach()).numel() == 1
    if arch == "jumprelu":
        assert not torch.equal(sae.threshold.detach(), torch.full((F,), 0.001))  # the thresholds learnt
    if recipe == "unit_norm":
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(F))
    loaded = SAE.load_from_disk(tmp_path / "sae")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    with torch.no_grad():
        assert torch.equal(loaded(held_out), sae(held_out))


def test_jumprelu_straight_through_gradients_are_the_rectangle_kernel_pseudo_derivatives():
    eps = 0.1
    pre = torch.tensor([[0.02, 0.28, 0.32, 0.9], [0.5, 0.29, -0.1, 0.36]], requires_grad=True)
    theta = torch.tensor([0.0, 0.3, 0.3, 0.4], requires_grad=True)
    out = jumprelu(pre, theta, eps)
    assert torch.equal(out.detach(), pre.detach() * (pre.detach() > theta.detach()))
    g = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    out.backward(g)
    kernel = ((pre - theta).abs() < eps / 2).float().detach()
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * kernel * g).sum(0))
    torch.testing.assert_close(pre.grad, (pre.detach() > theta.detach()).float() * g)
    theta.grad = None
    step(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, (-(1 / eps) * kernel).sum(0))


def test_ghost_gradients_reach_only_the_dead_features():
    sae = train_sae(sparse_data(256), "x", F, steps=0, progress=False)
    x = sparse_data(64, seed=3)
    feats, pre = sae.encode_with_hidden_pre(x)
    err = x - sae.decode(feats)
    mse = err.pow(2).sum(-1).mean()
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[2, 9]] = True
    loss = ghost_loss(sae, pre, err, dead, mse)
    assert loss.item() == pytest.approx(mse.item(), rel=1e-4)  # rescaled to the size of the MSE
    sae.zero_grad()
    loss.backward()
    assert bool((sae.W_enc.grad[:, dead] != 0).any()) and bool((sae.W_enc.grad[:, ~dead] == 0).all())
    assert bool((sae.W_dec.grad[~dead] == 0).all()) and bool((sae.b_enc.grad[~dead] == 0).all())


def test_resampling_rewrites_only_the_dead_features():
    sae = train_sae(sparse_data(256), "x", F, steps=0, progress=False)
    opt = torch.optim.Adam(sae.parameters())
    x = sparse_data(64, seed=2)
    sae(x).pow(2).sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    with torch.no_grad():
        _resample(sae, opt, dead, x, x - sae(x))
    alive = ~dead
    assert torch.equal(sae.W_dec[alive], before["W_dec"][alive]) and torch.equal(
        sae.b_enc[alive], before["b_enc"][alive]
    )
    centred = (x - before["b_dec"]) / (x - before["b_dec"]).norm(dim=-1, keepdim=True)
    for i in (1, 5, 7):
        row = sae.W_dec[i] / sae.W_dec[i].norm()
        assert bool(((centred @ row.detach()) > 1 - 1e-5).any())  # along one input's direction
        torch.testing.assert_close(sae.W_enc[:, i] / sae.W_enc[:, i].norm(), row)
        assert sae.b_enc[i] == 0 and bool((opt.state[sae.W_dec]["exp_avg"][i] == 0).all())


def test_training_from_a_harvested_dataset_and_from_a_model(hf_checkpoint, tmp_path):
    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint("llama-gqa")[0]))
    site = "blocks.1.hook_resid_post"
    tokens = torch.randint(3, model.cfg.d_vocab, (2000,), generator=torch.Generator().manual_seed(0))
    ds = harvest(model, tokens, site, tmp_path / "h", context_size=16, batch_size=8, progress=False)
    sae = train_sae(ds, site, 4 * model.cfg.d_model, "topk", k=8, steps=150, batch_size=128, lr=3e-3, progress=False)
    assert sae.cfg.model_from_pretrained_kwargs == {s: False for s in sae.cfg.model_from_pretrained_kwargs}
    assert sae.cfg.model_name == model.cfg.model_name and sae.cfg.hook_name == site
    ev = evaluate_sae(model, sae, tokens[:320].reshape(20, 16))
    assert ev.explained_variance > 0.3 and ev.ce_loss_recovered > 0 and ev.l0 <= 8
    direct = train_sae(model, site, 64, "jumprelu", data=tokens[:640].reshape(40, 16), steps=20, progress=False)
    assert direct.cfg.architecture == "jumprelu" and direct.cfg.d_in == model.cfg.d_model
    with pytest.raises(ValueError, match="needs k"):
        train_sae(ds, site, 64, "topk")
    with pytest.raises(KeyError, match="no site"):
        train_sae(ds, "blocks.0.hook_resid_post", 64)


def test_top_activating_contexts_and_their_html_page(hf_checkpoint, tmp_path):
    from html.parser import HTMLParser

    from checkpoints import VOCAB
    from tokenizers_util import SENTENCES, tiny_tokenizer

    from transformer_hooks.sae import feature_contexts_html, top_activations

    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint("llama-gqa")[0]))
    model.set_tokenizer(tiny_tokenizer(VOCAB))
    site = "blocks.0.hook_resid_post"
    ds = harvest(
        model,
        SENTENCES * 4 + ["Rome & <Madrid>"],
        site,
        tmp_path / "h",
        context_size=8,
        batch_size=4,
        shard_tokens=32,
        progress=False,
    )
    sae = SAE.for_model(model, site, d_sae=16, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        values = sae.encode(ds.rows(range(len(ds)), site))
    feature = int((values > 0).sum(0).argmax())
    contexts = top_activations(ds, sae, feature, top=5, batch_size=7)
    assert 0 < len(contexts) <= 5 and len({c.context for c in contexts}) == len(contexts)
    acts = [c.activation for c in contexts]
    assert acts == sorted(acts, reverse=True)
    best = values[:, feature].max()
    assert acts[0] == pytest.approx(float(best))
    for c in contexts:
        assert c.activations[c.position] == pytest.approx(c.activation) and max(c.activations) == c.activation
        toks, pos = ds.tokens_of([c.row])
        assert toks[0, : len(c.tokens)].tolist() == c.tokens and int(pos[0]) == c.position
    page = feature_contexts_html(contexts, model.tokenizer, title=f"feature {feature}", path=tmp_path / "f.html")
    assert (tmp_path / "f.html").read_text() == page

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.items, self.tops, self.stack = [], 0, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "li":
                self.items.append(float(a["data-activation"]))
            if tag == "span" and a.get("class") == "tok top":
                self.tops += 1

    p = Parse()
    p.feed(page)
    assert p.items == pytest.approx(acts, rel=1e-5) and p.tops == len(contexts)
    assert "<Madrid>" not in page  # text is escaped


# Issue 23.2 / 27.5: resampling never at the end, the seed's variants, checkpoints, sizes -----------
def _half_dead_sae():
    """An SAE half of whose features can never fire (so resampling has something to do)."""
    sae = train_sae(sparse_data(256), "x", F, steps=0, progress=False)
    with torch.no_grad():
        sae.b_enc[: F // 2] = -1e3
    return sae


def _held_out_metrics(sae):
    held = sparse_data(512, seed=1)
    with torch.no_grad():
        f = sae.encode(held)
        return float((sae.decode(f) - held).pow(2).sum(-1).mean()), float((f > 0).sum(-1).float().mean())


def test_resampling_never_happens_in_the_final_stretch():
    from transformer_hooks.sae.training import resample_steps

    assert resample_steps(300, 280) == []  # 20 steps left: too few to settle
    assert resample_steps(300, 100) == [100, 200] and resample_steps(300, 150) == [150]
    assert resample_steps(1000, 100) == list(range(100, 901, 100)) and resample_steps(300, None) == []
    data = sparse_data()
    plain, late = _half_dead_sae(), _half_dead_sae()
    train_sae(plain, data, steps=300, dead_window=10, progress=False)
    train_sae(late, data, steps=300, dead_window=10, resample_every=280, progress=False)
    # a resample at step 280 used to return fresh features firing on everything (L0 9.7 -> 16.2 here)
    for a, b in zip(plain.parameters(), late.parameters(), strict=True):
        assert torch.equal(a, b)
    mid = _half_dead_sae()
    train_sae(mid, data, steps=300, dead_window=10, resample_every=100, progress=False)
    (mse_plain, l0_plain), (mse_mid, l0_mid) = _held_out_metrics(plain), _held_out_metrics(mid)
    assert mse_mid < mse_plain  # the revived features were put to use ...
    assert l0_mid < 2.5 * l0_plain  # ... and had time to settle


def test_ghost_grad_variants_and_the_bounded_decoder():
    sae = train_sae(sparse_data(256), "x", F, steps=0, progress=False)
    pre = torch.full((4, F), 200.0)  # exp(200) overflows float32
    err, dead = torch.ones(4, D), torch.zeros(F, dtype=torch.bool)
    dead[:3] = True
    mse_ = torch.tensor(1.0)
    assert not torch.isfinite(ghost_loss(sae, pre, err, dead, mse_)).all()
    clamped = ghost_loss(sae, pre, err, dead, mse_, clamp=True)  # exp(min(x, 0)) = 1 here
    assert torch.isfinite(clamped) and clamped > 0
    base = dict(steps=60, dead_window=5, ghost_grads=True, progress=False)
    plain, scaled = _half_dead_sae(), _half_dead_sae()
    plain_log = train_sae(plain, sparse_data(), **base)
    scaled_log = train_sae(scaled, sparse_data(), ghost_grads_dead_fraction=True, ghost_grads_clamp=True, **base)
    assert all(torch.isfinite(p).all() for p in scaled.parameters())
    assert plain_log[:4] == scaled_log[:4] and plain_log != scaled_log  # the same until features die (step 5)
    bounded = train_sae(sparse_data(), "x", F, decoder="max_unit_norm", l1_coefficient=1e-2, steps=100, progress=False)
    norms = bounded.W_dec.norm(dim=-1)
    assert norms.max() <= 1 + 1e-5 and norms.min() < 0.99  # at most 1, not forced to 1


def test_sizes_are_checked_before_training():
    with pytest.raises(ValueError, match="0 rows"):
        train_sae(torch.zeros(0, D), "x", F, steps=5, progress=False)
    for bad in (dict(batch_size=0), dict(batch_size=-1), dict(steps=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            train_sae(sparse_data(64), "x", F, progress=False, **bad)


def test_fewer_rows_than_a_batch_train_on_what_there_is(hf_checkpoint, tmp_path):
    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint("llama-gqa")[0]))
    site = "blocks.1.hook_resid_post"
    tokens = torch.randint(3, model.cfg.d_vocab, (64,), generator=torch.Generator().manual_seed(0))
    ds = harvest(model, tokens, site, tmp_path / "h", context_size=16, batch_size=4, progress=False)
    assert len(ds) < 256
    with pytest.warns(UserWarning, match="fewer than batch_size=256"):
        sae = train_sae(ds, site, 32, "topk", k=4, steps=5, batch_size=256, progress=False)  # used to spin forever
    assert len(sae.training_log) == 5 and all(torch.isfinite(torch.tensor(sae.training_log)))


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path, monkeypatch):
    data = sparse_data(1024)
    recipe = dict(steps=60, batch_size=64, dead_window=5, resample_every=20, checkpoint_every=10, progress=False)
    whole = _half_dead_sae()
    train_sae(whole, data, checkpoint_dir=tmp_path / "whole", **recipe)

    real_step, calls = torch.optim.Adam.step, [0]

    def dies_at_step_37(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 37:
            raise _Killed
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", dies_at_step_37)
    with pytest.raises(_Killed):
        train_sae(_half_dead_sae(), data, checkpoint_dir=tmp_path / "run", **recipe)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "state.safetensors"), "pt") as f:
        assert '"step": 30' in f.metadata()["state"]  # the last checkpoint before the kill
    resumed = _half_dead_sae()
    log = train_sae(resumed, data, checkpoint_dir=tmp_path / "run", **recipe)
    assert len(log) == 60 and log == whole.training_log
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    changed = r"made with other inputs.*\n  lr: was 0\.001, now 0\.01\n.*delete the directory"
    with pytest.raises(ValueError, match=changed):
        train_sae(_half_dead_sae(), data, checkpoint_dir=tmp_path / "run", lr=1e-2, **recipe)
