"""Steering adds exactly coeff * vector at the chosen positions, keeps positions absolute
across cached generation steps, changes a real model's continuation, and never stays
attached (also after an exception)."""

import warnings

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import UnknownHookError
from transformer_hooks.interventions.steering import (
    NORM_WARNING_RATIO,
    pad_to_same_length,
    residual_norm,
    steering,
    steering_coeff,
    steering_hook,
    steering_vector,
)

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(hooked_model):
    return hooked_model("llama-gqa")


def tokens(batch=2, pos=7, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model):
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values()) and not model._forward_pre_hooks


def greedy(model, toks, **kwargs):
    return model.generate(toks, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False, **kwargs)


@pytest.mark.parametrize(
    "positions,chosen",
    [(None, range(7)), ("all", range(7)), (2, [2]), (-1, [6]), (slice(1, 4), [1, 2, 3]), ([0, 5], [0, 5])],
)
def test_adds_exactly_coeff_times_vector_at_the_chosen_positions(model, positions, chosen):
    toks = tokens()
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=SITE)
        with steering(model, SITE, vector, coeff=4.0, positions=positions):
            _, steered = model.run_with_cache(toks, names_filter=SITE)
    expected = clean[SITE].clone()
    expected[:, list(chosen)] = expected[:, list(chosen)] + 4.0 * vector
    assert torch.equal(steered[SITE], expected)
    assert no_hooks_left(model)


def test_per_position_vector_and_per_head_site(model):
    toks = tokens()
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=[SITE, "blocks.1.attn.hook_z"])
        rows = torch.randn(3, model.cfg.d_model)
        with steering(model, SITE, rows, coeff=-2.0, positions=[4, 1, 6]):
            _, steered = model.run_with_cache(toks, names_filter=SITE)
        per_head = torch.randn(model.cfg.n_heads, model.cfg.d_head)
        with steering(model, "blocks.1.attn.hook_z", per_head, coeff=0.5, positions=slice(5, None)):
            _, steered_z = model.run_with_cache(toks, names_filter="blocks.1.attn.hook_z")
    expected = clean[SITE].clone()
    for row, p in enumerate([4, 1, 6]):
        expected[:, p] = expected[:, p] + -2.0 * rows[row]
    assert torch.equal(steered[SITE], expected)
    z = clean["blocks.1.attn.hook_z"].clone()
    z[:, 5:] = z[:, 5:] + 0.5 * per_head
    assert torch.equal(steered_z["blocks.1.attn.hook_z"], z)


def test_hook_factory_with_run_with_hooks_equals_context(model):
    toks = tokens()
    vector = torch.randn(model.cfg.d_model)
    with torch.no_grad():
        a = model.run_with_hooks(toks, fwd_hooks=[(SITE, steering_hook(vector, 3.0, slice(2, 5)))])
        with steering(model, SITE, vector, 3.0, slice(2, 5)):
            b = model(toks)
        clean = model(toks)
    assert torch.equal(a, b)
    assert not torch.allclose(a, clean)


@pytest.mark.parametrize("positions", ["all", slice(9, None), [1, 10, 12]])
def test_positions_stay_absolute_across_cached_generation(model, positions):
    """Cached generation sees one token per forward; the same steering without a KV cache
    sees the whole sequence every step. Both must steer the same absolute positions."""
    toks = tokens(2, 9, seed=3)
    vector = 3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    clean = greedy(model, toks)
    with steering(model, SITE, vector, coeff=2.0, positions=positions):
        cached = greedy(model, toks)
        uncached = greedy(model, toks, use_past_kv_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, clean), "steering changed nothing: the comparison above proves little"
    assert no_hooks_left(model)


def test_new_positions_steer_only_forwards_that_continue_a_kv_cache(model):
    toks = tokens(2, 9, seed=5)
    vector = 3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    clean = greedy(model, toks)
    with steering(model, SITE, vector, coeff=2.0, positions="new"):
        steered = greedy(model, toks)
        uncached = greedy(model, toks, use_past_kv_cache=False)  # no forward continues a cache
        with torch.no_grad():
            plain_forward = model(toks)
    assert not torch.equal(steered, clean)
    assert torch.equal(uncached, clean)
    with torch.no_grad():
        assert torch.equal(plain_forward, model(toks))


def test_hooks_removed_after_an_exception(model):
    vector = torch.randn(model.cfg.d_model)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, SITE, vector, coeff=4.0):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    # An error inside the hook itself, mid-forward: wrong vector shape.
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        with steering(model, SITE, torch.randn(5)):
            model(tokens())
    assert no_hooks_left(model)


def test_bad_input_fails_before_any_hook_is_attached(model):
    with pytest.raises(UnknownHookError, match="hook_resid_postt"):
        with steering(model, "blocks.0.hook_resid_postt", torch.randn(model.cfg.d_model)):
            pass
    with pytest.raises(ValueError, match="positions"):
        steering_hook(torch.randn(3), positions="middle")
    with pytest.raises(ValueError, match="context manager"):
        steering_hook(torch.randn(3), positions="new")
    with pytest.raises(ValueError, match="floating point"):
        steering_hook(torch.arange(3))
    with pytest.raises(ValueError, match="3 positions but 2"):
        with steering(model, SITE, torch.randn(3, model.cfg.d_model), positions=[0, 1]):
            model(tokens())
    assert no_hooks_left(model)


# The real model ------------------------------------------------------------------------
def test_steering_vector_is_the_masked_difference_of_activations(embedded_model):
    """Padded lists of prompts give what each prompt gives alone (padding excluded)."""
    m = embedded_model
    site = "blocks.3.hook_resid_pre"
    pos, neg = ["Love", "I love you so much"], ["Hate", "I hate it"]
    with torch.no_grad():
        _, cache = m.run_with_cache(pos + neg + ["I love", "I hate"], names_filter=site, padding_side="right")
    lengths = [len(m.to_str_tokens(p)) for p in pos + neg + ["I love", "I hate"]]
    alone = [cache[site][i, :n] for i, n in enumerate(lengths)]  # each prompt's own positions
    with torch.no_grad():
        _, single = m.run_with_cache(pos[0], names_filter=site)
    torch.testing.assert_close(alone[0], single[site][0], atol=1e-4, rtol=1e-4)

    def mean_of(rows, f):
        return torch.stack([f(a) for a in rows]).mean(0)

    # BOS (position 0), where prompts start with it, is left out by default: equal on both sides,
    # with an outsized norm.
    s = 1 if m.cfg.default_prepend_bos else 0
    mean_ref = mean_of(alone[:2], lambda a: a[s:].mean(0)) - mean_of(alone[2:4], lambda a: a[s:].mean(0))
    last_ref = mean_of(alone[:2], lambda a: a[-1]) - mean_of(alone[2:4], lambda a: a[-1])
    torch.testing.assert_close(steering_vector(m, pos, neg, site, reduce="mean"), mean_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steering_vector(m, pos, neg, site, reduce="last"), last_ref, atol=1e-4, rtol=1e-4)
    per_pos = steering_vector(m, "I love", "I hate", site, reduce=None)
    torch.testing.assert_close(per_pos, (alone[4] - alone[5])[s:], atol=1e-4, rtol=1e-4)
    with_bos = steering_vector(m, "I love", "I hate", site, reduce=None, skip_bos=False)
    torch.testing.assert_close(with_bos, alone[4] - alone[5], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pad the shorter prompt"):
        steering_vector(m, "I love you so much", "Hate", site, reduce=None, pad=False)


def test_steering_changes_a_greedy_continuation_of_the_real_model(embedded_model):
    m = embedded_model
    site = "blocks.6.hook_resid_post"
    prompt = "I think that you are"
    kwargs = dict(max_new_tokens=8, do_sample=False, verbose=False)
    vector = steering_vector(m, "I love", "I hate", site, reduce="mean")
    clean = m.generate(prompt, **kwargs)
    with steering(m, site, vector, coeff=8.0):
        steered = m.generate(prompt, **kwargs)
    assert steered != clean
    assert m.generate(prompt, **kwargs) == clean  # nothing left attached
    assert no_hooks_left(m)


def test_a_vector_for_every_prompt_position_steers_generation(model):
    """One vector per prompt position: the cached generate (whose prefill leaves out the last prompt
    token) steers exactly what a full rerun of the sequence steers."""
    prompt = tokens(batch=1, pos=5, seed=3)
    vector = 20 * torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with steering(model, SITE, vector, positions=slice(0, 5)):
        cached = greedy(model, prompt)
        rerun = greedy(model, prompt, use_past_kv_cache=False)
    assert torch.equal(cached, rerun)
    assert not torch.equal(cached, greedy(model, prompt))
    # The first new token is the argmax of one steered forward over the prompt.
    logits = model.run_with_hooks(prompt, fwd_hooks=[(SITE, steering_hook(vector, positions=slice(0, 5)))])
    assert int(cached[0, 5]) == int(logits[0, -1].argmax())
    assert no_hooks_left(model)


def test_steering_vector_pads_and_masks_prompts_of_different_lengths(embedded_model):
    m = embedded_model
    site = "blocks.1.hook_resid_pre"
    pos, neg = ["I love", "I love you so much"], ["I hate", "I hate it all day"]
    per_pos = steering_vector(m, pos, neg, site, reduce=None)
    with torch.no_grad():
        alone = [m.run_with_cache(p, names_filter=site)[1][site][0] for p in pos + neg]
    n = max(a.shape[0] for a in alone)
    s = 1 if m.cfg.default_prepend_bos else 0
    assert per_pos.shape == (n - s, m.cfg.d_model)  # BOS left out where prompts start with it

    def masked_mean(rows):
        total, count = torch.zeros(n, m.cfg.d_model), torch.zeros(n, 1)
        for a in rows:
            total[: a.shape[0]] += a
            count[: a.shape[0]] += 1
        return total / count

    expected = masked_mean(alone[:2]) - masked_mean(alone[2:])
    torch.testing.assert_close(per_pos, expected[s:], atol=1e-4, rtol=1e-4)
    # prepend_bos reaches the tokenizer: without a BOS the vector has one position fewer.
    no_bos = steering_vector(m, pos, neg, site, reduce=None, prepend_bos=False, skip_bos=False)
    with_bos = steering_vector(m, pos, neg, site, reduce=None, prepend_bos=True, skip_bos=False)
    assert no_bos.shape[0] + 1 == with_bos.shape[0]


def test_actadd_recipe_pads_with_spaces_and_chooses_the_coefficient_by_the_residual_norm(embedded_model):
    """ "Love" is one token and "Hate" two: the shorter is padded with spaces to line up; the
    coefficient from steering_coeff makes the added norm the asked fraction of the residual's."""
    m = embedded_model
    site = "blocks.6.hook_resid_pre"
    a, b = pad_to_same_length(m, "Love", "Hate")
    assert a.startswith("Love") and set(a[4:]) <= {" "} and b == "Hate"
    assert m.to_tokens(a).shape == m.to_tokens(b).shape
    per_pos = steering_vector(m, "Love", "Hate", site, reduce=None)
    assert per_pos.shape == (m.to_tokens(a).shape[1] - (1 if m.cfg.default_prepend_bos else 0), m.cfg.d_model)
    vector = steering_vector(m, "Love", "Hate", site)
    torch.testing.assert_close(vector, per_pos.mean(0), atol=1e-4, rtol=1e-4)
    coeff = steering_coeff(m, site, vector, fraction=0.5)
    assert coeff * float(vector.norm()) == pytest.approx(0.5 * residual_norm(m, site), rel=1e-5)


def test_a_vector_that_dwarfs_the_residual_stream_warns(embedded_model):
    m = embedded_model
    site = "blocks.6.hook_resid_pre"
    vector = steering_vector(m, "Love", "Hate", site)
    big = 2 * NORM_WARNING_RATIO * residual_norm(m, site) / float(vector.norm())
    with pytest.warns(UserWarning, match="replaces the residual stream"):
        with steering(m, site, vector, coeff=big):
            m("I think dogs are")
    fine = steering_coeff(m, site, vector, fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with steering(m, site, vector, coeff=fine):
            m("I think dogs are")
    assert no_hooks_left(m)
