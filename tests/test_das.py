"""DAS: gradients reach the rotation and never the frozen model, the rotation stays
orthogonal, interchanging all d dims is patching the whole site, and training lowers the
interchange loss."""

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks.interventions.das import (
    RotatedSubspaceInterchange,
    _positions,
    evaluate_das,
    frozen,
    interchange_hook,
    interchange_logits,
    source_activations,
    train_das,
)

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(hooked_model):
    return hooked_model("llama-gqa")


def pairs(n=8, pos=6, seed=0):
    """Base and source prompts that differ in one token (position 2), and targets."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, VOCAB, (n, pos), generator=gen)
    source = base.clone()
    source[:, 2] = torch.randint(0, VOCAB, (n,), generator=gen)
    return base, source, torch.randint(0, VOCAB, (n,), generator=gen)


def no_hooks_left(model):
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def test_gradients_reach_the_rotation_and_not_the_model(model):
    base, source, target = pairs()
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=4)
    flags = [p.requires_grad for p in model.parameters()]
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
        logits = interchange_logits(
            model, das, SITE, base, source_activations(model, SITE, source), base_pos=2, source_pos=2
        )
        torch.nn.functional.cross_entropy(logits, target).backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in das.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert no_hooks_left(model)


def test_interchanging_every_dim_is_patching_the_whole_site(model):
    base, source, _ = pairs()
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=model.cfg.d_model, seed=3)
    src = source_activations(model, SITE, source)

    def patch(act, hook):
        act = act.clone()
        act[:, 2] = src[:, 2]
        return act

    with torch.no_grad():
        patched = model.run_with_hooks(base, fwd_hooks=[(SITE, patch)])[:, -1]
        intervened = interchange_logits(model, das, SITE, base, src, base_pos=2, source_pos=2)
        clean = model(base)[:, -1]
    torch.testing.assert_close(intervened, patched, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(patched, clean, atol=1e-2), "the patch changed nothing: the test would prove little"


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_resuming_from_the_cached_site_gives_the_same_logits_and_gradients(model, site):
    """train_das skips the blocks below a residual site by resuming from its cached value."""
    base, source, target = pairs()
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=6, low_rank=True, seed=2)
    src = source_activations(model, site, source)
    grads = []
    with frozen(model):
        for base_act in (None, source_activations(model, site, base)):
            das.zero_grad()
            logits = interchange_logits(model, das, site, base, src, base_pos=2, source_pos=2, base_act=base_act)
            torch.nn.functional.cross_entropy(logits, target).backward()
            grads.append((logits.detach(), [p.grad.clone() for p in das.parameters()]))
    (full, full_grads), (resumed, resumed_grads) = grads
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=1e-4)
    for a, b in zip(resumed_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert no_hooks_left(model)


@pytest.mark.parametrize("low_rank", [False, True])
def test_a_partial_interchange_touches_only_its_subspace_and_position(model, low_rank):
    base, source, _ = pairs()
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=5, low_rank=low_rank, seed=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(base, names_filter=SITE)
        src = source_activations(model, SITE, source)
        out = interchange_hook(das, src, base_pos=2, source_pos=2)(cache[SITE], model.hook_dict[SITE])
        b = cache[SITE]
        # Outside position 2 nothing moves. At position 2 the coordinates along the k basis
        # vectors become the source's, and the orthogonal complement keeps the base's.
        assert torch.equal(out[:, [0, 1, 3, 4, 5]], b[:, [0, 1, 3, 4, 5]])
        Q = das.basis
        assert Q.shape == (model.cfg.d_model, 5)
        torch.testing.assert_close(out[:, 2] @ Q, src[:, 2] @ Q, atol=1e-4, rtol=1e-4)
        complement = torch.eye(model.cfg.d_model) - Q @ Q.T
        torch.testing.assert_close(out[:, 2] @ complement, b[:, 2] @ complement, atol=1e-4, rtol=1e-4)
        if not low_rank:  # the same in the rotated basis: first k coordinates swapped, the rest kept
            R = das.R
            torch.testing.assert_close((out[:, 2] @ R)[:, :5], (src[:, 2] @ R)[:, :5], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close((out[:, 2] @ R)[:, 5:], (b[:, 2] @ R)[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("low_rank", [False, True])
def test_training_lowers_the_loss_and_keeps_the_rotation_orthogonal(model, low_rank):
    base, source, target = pairs(16)
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=8, low_rank=low_rank)
    before = evaluate_das(model, das, SITE, base, source, target, base_pos=2, source_pos=2)
    losses = train_das(model, das, SITE, base, source, target, base_pos=2, source_pos=2, steps=15, lr=5e-2)
    after = evaluate_das(model, das, SITE, base, source, target, base_pos=2, source_pos=2)
    assert after["loss"] < before["loss"] - 0.1 and losses[-1] < losses[0]
    with torch.no_grad():
        if low_rank:
            torch.testing.assert_close(das.basis.T @ das.basis, torch.eye(8), atol=1e-5, rtol=0)
        else:
            eye = torch.eye(model.cfg.d_model)
            torch.testing.assert_close(das.R @ das.R.T, eye, atol=1e-5, rtol=0)
            torch.testing.assert_close(das.R.T @ das.R, eye, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    assert no_hooks_left(model)


def test_bad_input_is_refused(model):
    base, source, _ = pairs()
    with pytest.raises(ValueError, match="k=0"):
        RotatedSubspaceInterchange(8, k=0)
    with pytest.raises(ValueError, match="basis"):
        _ = RotatedSubspaceInterchange(8, k=2, low_rank=True).R
    das = RotatedSubspaceInterchange(model.cfg.d_model, k=2)
    src = source_activations(model, SITE, source)
    with pytest.raises(ValueError, match="do not match"):
        interchange_logits(model, das, SITE, base[:3], src, base_pos=2, source_pos=2)
    with pytest.raises(IndexError, match="out of range"):
        interchange_logits(model, das, SITE, base, src, base_pos=9)
    with pytest.raises(ValueError, match="one per batch row"):
        interchange_logits(model, das, SITE, base, src, base_pos=[1, 2])
    assert no_hooks_left(model)


def test_padded_prompts_of_different_lengths_give_each_prompt_s_own_result(model):
    """A padded batch (either side) with its mask: each row's intervened logits are those of the
    row alone, unpadded, and training runs on it."""
    base, source, target = pairs(n=3, pos=6, seed=2)
    lengths = [6, 4, 5]
    site = SITE
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 6 - n :] = 1  # left padding
    intervention = RotatedSubspaceInterchange(model.cfg.d_model, 5, seed=1)
    for m, side in ((mask, "left"), (mask.flip(-1), "right")):
        b = base if side == "left" else torch.stack([torch.roll(base[i], -(6 - n)) for i, n in enumerate(lengths)])
        s = source if side == "left" else torch.stack([torch.roll(source[i], -(6 - n)) for i, n in enumerate(lengths)])
        alone = []  # before training moves the rotation
        for i, n in enumerate(lengths):
            src = source_activations(model, site, source[i : i + 1, 6 - n :])
            alone.append(interchange_logits(model, intervention, site, base[i : i + 1, 6 - n :], src, -2, -1)[0])
        src = source_activations(model, site, s, m)
        got = interchange_logits(model, intervention, site, b, src, -2, _positions(-1, m, 3, 6), base_mask=m)
        torch.testing.assert_close(got, torch.stack(alone), atol=1e-4, rtol=1e-4, msg=lambda msg, side=side: side + msg)
        losses = train_das(
            model,
            intervention,
            site,
            b,
            s,
            target,
            base_pos=-2,
            steps=3,
            base_attention_mask=m,
            source_attention_mask=m,
        )
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        assert evaluate_das(model, intervention, site, b, s, target, base_attention_mask=m, source_attention_mask=m)
    assert no_hooks_left(model)
