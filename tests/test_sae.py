"""SAE: SAELens's encode/decode conventions, SAELens-style files, a splice whose error term
gives back the clean model exactly, evaluation numbers that mean what they say, and a
processing table (which sites each weight-processing step changes) checked against the
real processed models."""

import json
import warnings

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer
from transformer_hooks.sae import (
    PROCESSING_STEPS,
    SAE,
    SAEConfig,
    check_sae_processing,
    evaluate_sae,
    sites_changed_by,
    splice_sae,
    train_sae,
)

SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model(hooked_model):
    return hooked_model("llama-gqa")


def tokens(batch=3, pos=10, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def random_sae(d_in, d_sae=64, hook_name=SITE, seed=0, **cfg):
    gen = torch.Generator().manual_seed(seed)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    return SAE.from_state_dict(state, SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook_name, **cfg))


def no_hooks_left(model):
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_follow_saelens_conventions(apply_b_dec):
    sae = random_sae(16, 40, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(2, 5, 16)
    x_in = x - sae.b_dec if apply_b_dec else x
    feats = torch.relu(x_in @ sae.W_enc + sae.b_enc)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), feats)
        torch.testing.assert_close(sae.decode(feats), feats @ sae.W_dec + sae.b_dec)
        torch.testing.assert_close(sae(x), feats @ sae.W_dec + sae.b_dec)
    assert (feats == 0).any() and (feats > 0).any()


def test_saelens_files_round_trip_and_other_cfg_layouts(tmp_path):
    sae = random_sae(16, 40, model_name="m", model_from_pretrained_kwargs={"center_writing_weights": True})
    sae.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == SITE and cfg["metadata"]["hook_name"] == SITE and cfg["architecture"] == "standard"
    loaded = SAE.load_from_disk(tmp_path / "sae")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name))
    assert loaded.cfg.expected_processing == ("center_writing_weights",)

    newer = {
        "d_in": 16,
        "d_sae": 40,
        "architecture": "standard",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.3.hook_resid_post", "model_from_pretrained_kwargs": {}},
    }
    assert SAEConfig.from_dict(newer).hook_name == "blocks.3.hook_resid_post"
    assert SAEConfig.from_dict(newer).expected_processing == ()
    older = {"d_in": 16, "d_sae": 40, "hook_point": "blocks.2.hook_resid_pre", "dtype": "torch.float32"}
    assert SAEConfig.from_dict(older).hook_name == "blocks.2.hook_resid_pre"
    assert SAEConfig.from_dict(older).expected_processing is None


def test_bad_sae_files_fail_with_a_reason(tmp_path):
    # jumprelu and expected_average_only_in are supported now; unknown ones name the known.
    with pytest.raises(ValueError, match="unknown SAE architecture 'jumpy'.*jumprelu"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "hook_name": "x", "architecture": "jumpy"})
    with pytest.raises(ValueError, match="hook_name"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8})
    with pytest.raises(ValueError, match="unknown normalize_activations='rms'.*expected_average_only_in"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "hook_name": "x", "normalize_activations": "rms"})
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "hook_name": "x", "architecture": "topk"})
    cfg = SAEConfig(d_in=4, d_sae=8, hook_name="x")
    with pytest.raises(ValueError, match=r"W_dec has shape \(8, 5\)"):
        SAE.from_state_dict(
            {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 5), "b_dec": torch.zeros(4)},
            cfg,
        )
    with pytest.raises(KeyError, match="b_dec"):
        SAE.from_state_dict({"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4)}, cfg)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load_from_disk(tmp_path)


def test_splice_with_error_term_gives_back_the_clean_model_exactly(model):
    toks = tokens()
    sae = random_sae(model.cfg.d_model)
    with torch.no_grad():
        clean = model(toks)
        with splice_sae(model, sae, use_error_term=True):
            with_error = model(toks)
        with splice_sae(model, sae):
            spliced, cache = model.run_with_cache(toks, names_filter=SITE)
        _, clean_cache = model.run_with_cache(toks, names_filter=SITE)
    assert torch.equal(with_error, clean)
    assert not torch.allclose(spliced, clean, atol=1e-3)
    torch.testing.assert_close(cache[SITE], sae(clean_cache[SITE]))
    assert no_hooks_left(model) and sae.use_error_term is False


def test_error_term_keeps_feature_edits(model):
    """Zeroing a feature moves the site by exactly that feature's decoder contribution."""
    toks = tokens()
    sae = random_sae(model.cfg.d_model)
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=SITE)
        feats = sae.encode(clean[SITE])
        top = int(feats.sum((0, 1)).argmax())

        def ablate(acts, hook):
            acts = acts.clone()
            acts[..., top] = 0
            return acts

        with sae.hooks(fwd_hooks=[("hook_sae_acts_post", ablate)]), splice_sae(model, sae, use_error_term=True):
            _, edited = model.run_with_cache(toks, names_filter=SITE)
    expected = clean[SITE] - feats[..., top, None] * sae.W_dec[top]
    torch.testing.assert_close(edited[SITE], expected, atol=1e-5, rtol=1e-5)


def test_error_term_gradients_flow_through_the_features(model):
    sae = random_sae(model.cfg.d_model)
    sae.use_error_term = True
    x = torch.randn(2, 3, model.cfg.d_model, requires_grad=True)
    sae(x).sum().backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    # d out / d x = W_dec^T-path through the features only (the error term is a constant).
    x2 = x.detach().clone().requires_grad_(True)
    (sae.decode(sae.encode(x2))).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_evaluation_of_a_perfect_and_an_empty_sae(model):
    d = model.cfg.d_model
    eye = torch.eye(d)
    # relu(x) - relu(-x) = x: reconstructs exactly.
    perfect = SAE.from_state_dict(
        {
            "W_enc": torch.cat([eye, -eye], 1),
            "b_enc": torch.zeros(2 * d),
            "W_dec": torch.cat([eye, -eye], 0),
            "b_dec": torch.zeros(d),
        },
        SAEConfig(d_in=d, d_sae=2 * d, hook_name=SITE),
    )
    toks = tokens(5)
    ev = evaluate_sae(model, perfect, toks, batch_size=2)
    assert ev.mse == 0 and ev.explained_variance == 1.0 and ev.spliced_loss == pytest.approx(ev.clean_loss, abs=1e-6)
    assert ev.ce_loss_recovered == pytest.approx(1.0, abs=1e-5) and ev.n_tokens == toks.numel()
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=SITE)
        assert ev.l0 == pytest.approx(float((cache[SITE] != 0).sum(-1).float().mean()))
        assert ev.clean_loss == pytest.approx(float(model(toks, return_type="loss")), rel=1e-5)

    empty = SAE(SAEConfig(d_in=d, d_sae=8, hook_name=SITE))  # all zeros: reconstructs 0
    ev = evaluate_sae(model, empty, toks)
    assert ev.l0 == 0 and ev.explained_variance < 0
    assert ev.spliced_loss == pytest.approx(ev.zero_ablation_loss) and ev.ce_loss_recovered == pytest.approx(0.0)
    assert no_hooks_left(model)


def test_evaluation_matches_the_definitions_on_a_random_sae(model):
    sae = random_sae(model.cfg.d_model)
    toks = tokens(4)
    ev = evaluate_sae(model, sae, toks, batch_size=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=SITE)
        x = cache[SITE].reshape(-1, model.cfg.d_model)
        recon = sae(x)
        with splice_sae(model, sae):
            spliced = float(model(toks, return_type="loss"))
    assert ev.mse == pytest.approx(float((x - recon).pow(2).sum(-1).mean()), rel=1e-4)
    assert ev.mse_per_element == pytest.approx(float((x - recon).pow(2).mean()), rel=1e-4)
    assert ev.l0 == pytest.approx(float((sae.encode(x) > 0).sum(-1).float().mean()))
    ev_ref = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev.explained_variance == pytest.approx(float(ev_ref), rel=1e-4)
    assert ev.spliced_loss == pytest.approx(spliced, rel=1e-5)
    assert ev.ce_loss_recovered == pytest.approx(
        (ev.zero_ablation_loss - spliced) / (ev.zero_ablation_loss - ev.clean_loss), rel=1e-4
    )


def test_padded_prompts_count_only_real_tokens(model):
    sae = random_sae(model.cfg.d_model)
    a, b = tokens(1, 6, seed=1), tokens(1, 9, seed=2)
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0, :6], padded[1] = a[0], b[0]
    mask = torch.ones_like(padded)
    mask[0, 6:] = 0
    with torch.no_grad():
        _, ca = model.run_with_cache(a, names_filter=SITE)
        _, cb = model.run_with_cache(b, names_filter=SITE)
    x = torch.cat([ca[SITE][0], cb[SITE][0]])
    ev = evaluate_sae(model, sae, padded, attention_mask=mask)
    assert ev.n_tokens == 15
    with torch.no_grad():
        assert ev.mse == pytest.approx(float((x - sae(x)).pow(2).sum(-1).mean()), rel=1e-4)


def test_positions_limit_the_splice_the_ablation_and_the_measurement(model):
    sae = random_sae(model.cfg.d_model)
    toks = tokens(3, 10)
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=SITE)
        with splice_sae(model, sae, positions=slice(1, None)):
            spliced_loss = float(model(toks, return_type="loss"))
            _, spliced = model.run_with_cache(toks, names_filter=SITE)
        x = clean[SITE][:, 1:].reshape(-1, model.cfg.d_model)
        recon = sae(x)
    assert torch.equal(spliced[SITE][:, 0], clean[SITE][:, 0])
    torch.testing.assert_close(spliced[SITE][:, 1:], sae(clean[SITE][:, 1:]).detach())
    ev = evaluate_sae(model, sae, toks, positions=slice(1, None))
    assert ev.n_tokens == 3 * 9
    assert ev.mse == pytest.approx(float((x - recon).pow(2).sum(-1).mean()), rel=1e-4)
    assert ev.mse_per_element == pytest.approx(float((x - recon).pow(2).mean()), rel=1e-4)
    assert ev.spliced_loss == pytest.approx(spliced_loss, rel=1e-5)
    with torch.no_grad(), model.hooks(fwd_hooks=[(SITE, lambda a, hook: torch.cat([a[:, :1], 0 * a[:, 1:]], 1))]):
        assert ev.zero_ablation_loss == pytest.approx(float(model(toks, return_type="loss")), rel=1e-5)


def test_training_lowers_the_loss(model):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(8, 16), names_filter=SITE)
    sae = SAE.for_model(model, SITE, d_sae=96)
    assert sae.cfg.model_from_pretrained_kwargs == {s: False for s in PROCESSING_STEPS}
    losses = train_sae(sae, cache[SITE], steps=80, batch_size=64, lr=3e-3, l1_coefficient=1e-3)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    ev = evaluate_sae(model, sae, tokens(8, 16))
    assert ev.explained_variance > 0.5 and ev.ce_loss_recovered > 0


# Weight processing ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama-head-dim-bias"])
@pytest.mark.parametrize("step", PROCESSING_STEPS)
def test_processing_table_matches_what_each_step_does(hf_checkpoint, name, step):
    """Every site the table lists changes under the step; every other site keeps its value."""
    path, _ = hf_checkpoint(name)
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    flags = {s: s == step for s in PROCESSING_STEPS}
    processed = HookedTransformer.from_pretrained(str(path), **flags)
    toks = tokens(2, 12)
    with torch.no_grad():
        _, a = plain.run_with_cache(toks, names_filter=lambda n: True)
        _, b = processed.run_with_cache(toks, names_filter=lambda n: True)
    changed = sites_changed_by(step, plain.cfg.normalization_type)
    assert set(a.keys()) == set(b.keys())
    for site in a.keys():
        differs = not torch.allclose(a[site], b[site], atol=1e-4, rtol=1e-4)
        listed = any(site.endswith(suffix) for suffix in changed)
        assert differs == listed, f"{step} on {name}: {site} {'changed' if differs else 'kept its value'}"


def test_processing_check_warns_only_when_the_site_changes(hf_checkpoint):
    gpt2 = HookedTransformer.from_pretrained(str(hf_checkpoint("gpt2")[0]))
    llama = HookedTransformer.from_pretrained(str(hf_checkpoint("llama-gqa")[0]))
    unprocessed = {s: False for s in PROCESSING_STEPS}

    def sae_on(model, site):
        return random_sae(model.cfg.d_model, hook_name=site, model_from_pretrained_kwargs=unprocessed)

    with pytest.warns(UserWarning, match="center_writing_weights.*from_pretrained_no_processing"):
        problems = check_sae_processing(gpt2, sae_on(gpt2, "blocks.1.hook_resid_pre"))
    assert len(problems) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # fold_ln changes no site (hook_normalized is before the norm's weight and bias, as in
        # TransformerLens 3); on RMSNorm models center_writing_weights is not applied.
        assert check_sae_processing(gpt2, sae_on(gpt2, "blocks.0.ln2.hook_normalized")) == []
        assert check_sae_processing(llama, sae_on(llama, "blocks.1.hook_resid_pre")) == []
        assert check_sae_processing(gpt2, sae_on(gpt2, "blocks.1.mlp.hook_post")) == []
        unknown = random_sae(gpt2.cfg.d_model, hook_name="blocks.1.hook_resid_pre")
        assert check_sae_processing(gpt2, unknown) == []
    with pytest.warns(UserWarning, match="center_writing_weights"):
        with splice_sae(gpt2, sae_on(gpt2, "blocks.1.hook_resid_pre")):
            pass
