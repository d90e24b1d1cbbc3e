"""Every SAE format and architecture: encode/decode equal a reference written from the
published formulas, files load, splices cache features under SAELens's names, steering
with a feature adds its decoder row, and SAEs that do not fit the model fail clearly."""

import json

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from safetensors.torch import save_file

from transformer_hooks import HookedTransformer
from transformer_hooks.hooks import UnknownHookError
from transformer_hooks.sae import SAE, SAEConfig, check_sae_fits, evaluate_sae, splice_sae, steer_with_feature

SITE = "blocks.1.hook_resid_post"
D, F = 16, 40


@pytest.fixture(scope="module")
def model(hf_checkpoint, one_thread):
    path, _ = hf_checkpoint("llama-gqa")
    return HookedTransformer.from_pretrained_no_processing(str(path))


def toks(batch=2, pos=7, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def weights(arch, d=D, f=F, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d, f, generator=g) / d**0.5,
        "W_dec": torch.randn(f, d, generator=g) / f**0.5,
        "b_dec": torch.randn(d, generator=g) * 0.1,
    }
    if arch == "gated":
        w.update(
            b_gate=torch.randn(f, generator=g) * 0.1,
            b_mag=torch.randn(f, generator=g) * 0.1,
            r_mag=torch.randn(f, generator=g) * 0.1,
        )
    else:
        w["b_enc"] = torch.randn(f, generator=g) * 0.1
    if arch == "jumprelu":
        w["threshold"] = torch.rand(f, generator=g) * 0.3
    return w


def reference(arch, w, x, norm="none", apply_b_dec=True, k=5, rescale=False, s=None):
    """SAELens's published formulas, written out once per case."""
    if norm == "constant_norm_rescale":
        c = D**0.5 / x.norm(dim=-1, keepdim=True)
        xin, out = x * c, (lambda y: y / c)
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xin, out = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
    elif norm == "expected_average_only_in":
        xin, out = x * s, (lambda y: y / s)
    else:
        xin, out = x, (lambda y: y)
    if apply_b_dec:
        xin = xin - w["b_dec"]
    if arch == "standard":
        f = torch.relu(xin @ w["W_enc"] + w["b_enc"])
    elif arch == "gated":
        f = ((xin @ w["W_enc"] + w["b_gate"]) > 0).float() * torch.relu(
            xin @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        )
    elif arch == "jumprelu":
        h = xin @ w["W_enc"] + w["b_enc"]
        f = torch.relu(h) * (h > w["threshold"]).float()
    else:  # topk
        h = xin @ w["W_enc"] + w["b_enc"]
        if rescale:
            h = h * w["W_dec"].norm(dim=-1)
        kth = h.topk(k, dim=-1).values[..., -1:]
        f = torch.relu(h) * (h >= kth).float()
        if rescale:
            return f, out((f / w["W_dec"].norm(dim=-1)) @ w["W_dec"] + w["b_dec"])
    return f, out(f @ w["W_dec"] + w["b_dec"])


def save_saelens(path, cfg, w):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: t.contiguous() for n, t in w.items()}, str(path / "sae_weights.safetensors"))
    return path


CASES = [
    ("standard", "none", True),
    ("standard", "constant_norm_rescale", True),
    ("gated", "none", True),
    ("gated", "layer_norm", False),
    ("jumprelu", "none", False),
    ("jumprelu", "expected_average_only_in", True),
    ("topk", "none", True),
    ("topk", "layer_norm", False),
]


@pytest.mark.parametrize("arch,norm,apply_b_dec", CASES)
def test_saelens_directories_of_every_architecture_match_the_formulas(tmp_path, arch, norm, apply_b_dec):
    w = weights(arch)
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": F,
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": norm,
        "k": 5,
        "metadata": {"hook_name": SITE, "hook_layer": 1},
    }
    if norm == "expected_average_only_in":
        cfg["norm_scaling_factor"] = 1.7
    sae = SAE.load_from_disk(save_saelens(tmp_path / "sae", cfg, w))
    x = torch.randn(3, 4, D) * 2
    f_ref, recon_ref = reference(arch, w, x, norm, apply_b_dec, s=1.7)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f), recon_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), recon_ref, atol=1e-5, rtol=1e-5)
    assert (f == 0).any() and (f > 0).any()
    if arch == "topk":
        assert bool(((f > 0).sum(-1) <= 5).all())
    sae.save_model(tmp_path / "again")  # round trip keeps everything
    again = SAE.load_from_disk(tmp_path / "again")
    assert again.cfg.architecture == arch and again.cfg.normalize_activations == norm
    with torch.no_grad():
        torch.testing.assert_close(again(x), recon_ref, atol=1e-5, rtol=1e-5)


def test_topk_rescaled_by_decoder_norm_and_batchtopk_checkpoints(tmp_path):
    w = weights("topk")
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": F,
        "k": 4,
        "rescale_acts_by_decoder_norm": True,
        "hook_name": SITE,
    }
    sae = SAE.load_from_disk(save_saelens(tmp_path / "topk", cfg, w))
    x = torch.randn(5, D)
    f_ref, recon_ref = reference("topk", w, x, k=4, rescale=True)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), recon_ref, atol=1e-5, rtol=1e-5)
    # A BatchTopK training checkpoint (scalar topk_threshold) runs as the JumpReLU SAELens saves.
    w = weights("standard")
    w["topk_threshold"] = torch.tensor(0.2)
    sae = SAE.load_from_disk(
        save_saelens(
            tmp_path / "btk", {"architecture": "batchtopk", "d_in": D, "d_sae": F, "k": 4, "hook_name": SITE}, w
        )
    )
    assert sae.cfg.architecture == "jumprelu"
    f_ref, _ = reference("jumprelu", {**w, "threshold": torch.full((F,), 0.2)}, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref)


def test_older_saelens_topk_activation_and_log_threshold(tmp_path):
    w = weights("standard")
    cfg = {"d_in": D, "d_sae": F, "hook_point": SITE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}
    sae = SAE.load_from_disk(save_saelens(tmp_path / "old", cfg, w))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    w = weights("jumprelu")
    w["log_threshold"] = w.pop("threshold").log()
    sae = SAE.load_from_disk(
        save_saelens(tmp_path / "log", {"architecture": "jumprelu", "d_in": D, "d_sae": F, "hook_name": SITE}, w)
    )
    torch.testing.assert_close(sae.threshold.detach(), w["log_threshold"].exp())


def test_gemma_scope_params_npz(tmp_path):
    w = weights("jumprelu")
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in w.items()})
    with pytest.raises(ValueError, match="hook_name"):
        SAE.load_from_disk(tmp_path)
    sae = SAE.load_from_disk(tmp_path, hook_name=SITE)
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(6, D)
    f_ref, recon_ref = reference("jumprelu", w, x, apply_b_dec=False)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref)
        torch.testing.assert_close(sae(x), recon_ref)


def test_llama_scope_directory(tmp_path):
    w = weights("standard")
    (tmp_path / "checkpoints").mkdir()
    save_file(
        {
            "encoder.weight": w["W_enc"].T.contiguous(),
            "encoder.bias": w["b_enc"],
            "decoder.weight": w["W_dec"].T.contiguous(),
            "decoder.bias": w["b_dec"],
        },
        str(tmp_path / "checkpoints" / "final.safetensors"),
    )
    (tmp_path / "hyperparams.json").write_text(
        json.dumps(
            {
                "d_model": D,
                "d_sae": F,
                "hook_point_in": SITE,
                "jump_relu_threshold": 0.1,
                "dataset_average_activation_norm": {"in": 8.0},
            }
        )
    )
    sae = SAE.load_from_disk(tmp_path)
    s = D**0.5 / 8.0
    x = torch.randn(6, D) * 3
    f_ref, recon_ref = reference(
        "jumprelu",
        {**w, "threshold": torch.full((F,), 0.1 * s)},
        x,
        norm="expected_average_only_in",
        apply_b_dec=False,
        s=s,
    )
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref)
        torch.testing.assert_close(sae(x), recon_ref)


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
@pytest.mark.parametrize("site", [SITE, "blocks.0.attn.hook_z"])
def test_splice_caches_features_under_saelens_names(model, arch, site):
    d_in = model.cfg.d_model if site == SITE else model.cfg.n_heads * model.cfg.d_head
    sae = SAE.from_state_dict(
        weights(arch, d=d_in),
        SAEConfig(d_in=d_in, d_sae=F, hook_name=site, architecture=arch, k=5, normalize_activations="layer_norm"),
    )
    assert sae.cfg.reshape_activations == ("hook_z" if site.endswith("hook_z") else "none")
    t = toks()
    feats_site = f"{site}.hook_sae_acts_post"
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(t, names_filter=site)
        with splice_sae(model, sae, use_error_term=True):
            logits, cache = model.run_with_cache(t, names_filter=[feats_site, site])
        with splice_sae(model, sae):
            _, spliced = model.run_with_cache(t, names_filter=site)
    x = clean[site].flatten(2) if site.endswith("hook_z") else clean[site]
    f_ref, recon_ref = reference(arch, sae.state_dict(), x, "layer_norm", True)
    torch.testing.assert_close(cache[feats_site], f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, clean_logits)  # the error term gives back the clean model
    torch.testing.assert_close(spliced[site], recon_ref.reshape(clean[site].shape), atol=1e-5, rtol=1e-5)
    assert feats_site not in model.hook_dict and sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_steering_with_a_feature_adds_its_decoder_row(model):
    for site, shape in ((SITE, (model.cfg.d_model,)), ("blocks.0.attn.hook_z", (model.cfg.n_heads, model.cfg.d_head))):
        d_in = int(np.prod(shape))
        sae = SAE.from_state_dict(weights("standard", d=d_in), SAEConfig(d_in=d_in, d_sae=F, hook_name=site))
        t = toks()
        with torch.no_grad():
            _, clean = model.run_with_cache(t, names_filter=site)
            with steer_with_feature(model, sae, 3, coeff=2.5):
                _, steered = model.run_with_cache(t, names_filter=site)
        torch.testing.assert_close(
            steered[site] - clean[site],
            (2.5 * sae.W_dec[3].detach()).reshape(shape).expand_as(clean[site]),
            atol=1e-5,
            rtol=1e-5,
        )
    with pytest.raises(IndexError, match="d_sae=40"):
        steer_with_feature(model, sae, F)


def test_saes_that_do_not_fit_the_model_fail_clearly(model):
    wrong_width = SAE(SAEConfig(d_in=model.cfg.d_model + 1, d_sae=8, hook_name=SITE))
    with pytest.raises(ValueError, match=f"d_in={model.cfg.d_model + 1}.*width {model.cfg.d_model}"):
        with splice_sae(model, wrong_width):
            pass
    with pytest.raises(ValueError, match="d_in"):
        evaluate_sae(model, wrong_width, toks())
    typo = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=8, hook_name="blocks.1.hook_resid_pots"))
    with pytest.raises(UnknownHookError, match="Closest: blocks.1.hook_resid_post"):
        check_sae_fits(model, typo)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_mean_ablation_baseline_uses_the_mean_over_the_evaluation_tokens(model):
    sae = SAE.from_state_dict(
        weights("standard", d=model.cfg.d_model), SAEConfig(d_in=model.cfg.d_model, d_sae=F, hook_name=SITE)
    )
    t = toks(4, 8)
    ev = evaluate_sae(model, sae, t, batch_size=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(t, names_filter=SITE)
        mean = cache[SITE].reshape(-1, model.cfg.d_model).mean(0)
        with model.hooks(fwd_hooks=[(SITE, lambda a, hook: mean.expand_as(a).clone())]):
            mean_loss = float(model(t, return_type="loss"))
        feats = sae.encode(cache[SITE]).reshape(-1, F)
    assert ev.mean_ablation_loss == pytest.approx(mean_loss, rel=1e-5)
    assert ev.ce_loss_recovered_vs_mean == pytest.approx(
        (ev.mean_ablation_loss - ev.spliced_loss) / (ev.mean_ablation_loss - ev.clean_loss), rel=1e-6
    )
    freq = (feats > 0).float().mean(0)
    assert ev.dead_fraction == pytest.approx(float((freq == 0).float().mean()))
    assert ev.dense_fraction == pytest.approx(float((freq > 0.1).float().mean()))
