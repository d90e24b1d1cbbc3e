"""model.trace: a for-loop over the forward pass that is the forward itself."""

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer, HookShapeError

POS = 5


@pytest.fixture(scope="module")
def model(hf_checkpoint, one_thread):
    path, _ = hf_checkpoint("llama-gqa")
    return HookedTransformer.from_pretrained_no_processing(str(path))


def toks(seed=0):
    return torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(seed))


def no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_reading_every_site_equals_run_with_hooks_and_run_with_cache(model):
    """The trace's hooks may edit, so they take the explicit path, as run_with_hooks with
    ordinary hooks on the same sites does (equal to the bit). The cache's savers only read, so
    run_with_cache keeps the fast path for the output and equals the trace within float rounding."""
    tokens = toks()
    logits, cache = model.run_with_cache(tokens)
    saved = {}

    def save(act, hook):
        saved[hook.name] = act.detach().clone()

    with torch.no_grad():
        hooked_logits = model.run_with_hooks(tokens, fwd_hooks=[(name, save) for name in cache.keys()])
    t = model.trace(tokens)
    seen = {}
    for site in t:
        seen[site.name] = site.value.detach().clone()
        assert site.layer == model.hook_dict[site.name].layer_idx
    assert list(seen) == list(cache.keys()), "forward order, the default cache's sites"
    assert list(seen) == list(saved)
    for name, value in seen.items():
        torch.testing.assert_close(value, saved[name], atol=0, rtol=0)
        torch.testing.assert_close(value, cache[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.output, hooked_logits, atol=0, rtol=0)
    torch.testing.assert_close(t.output, logits, atol=1e-5, rtol=1e-5)
    assert t.finished and no_hooks(model)


def test_masked_injection_equals_run_with_hooks(model):
    tokens = toks(1)
    mask = torch.zeros(model.cfg.n_heads, 1)
    mask[2] = 1.0
    direction = torch.randn(model.cfg.d_model)

    def zero_heads(z, hook):
        return z * mask

    def inject(resid, hook):
        resid = resid.clone()
        resid[:, -1] += 3 * direction
        return resid

    # The trace observes every default site, so attention runs its explicit-softmax path (equal to the
    # fused kernel to rounding); observing the same sites here makes it the same computation, exactly.
    observe = [(n, lambda x, hook: None) for n in model.cache_names(None)]
    expected = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_heads), ("blocks.1.hook_resid_pre", inject)] + observe
    )
    torch.testing.assert_close(
        expected,
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_heads), ("blocks.1.hook_resid_pre", inject)]
        ),
        atol=1e-4,
        rtol=1e-4,
    )
    t = model.trace(tokens)
    for site in t:
        if site.name == "blocks.0.attn.hook_z":
            site.value = site.value * mask
        elif site.name == "blocks.1.hook_resid_pre":
            v = site.value.clone()
            v[:, -1] += 3 * direction
            site.value = v
    torch.testing.assert_close(t.output, expected, atol=0, rtol=0)
    assert not torch.allclose(t.output, model(tokens))
    assert no_hooks(model)


def test_hooks_already_attached_still_fire(model):
    tokens = toks(2)
    fired = []

    def double(x, hook):
        fired.append(hook.name)
        return 2 * x

    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", double)]):
        expected = model(tokens)
        fired.clear()
        t = model.trace(tokens, names_filter=["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"])
        values = {s.name: s.value for s in t}
        assert fired == ["blocks.0.hook_mlp_out"]
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_mlp_out")
    torch.testing.assert_close(values["blocks.0.hook_mlp_out"], cache["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(t.output, expected, atol=0, rtol=0)
    assert no_hooks(model)


def test_break_stops_the_forward_and_leaves_no_hook(model):
    reached = []
    for site in model.trace(toks(), names_filter=lambda n: n.endswith("hook_resid_pre")):
        reached.append(site.name)
        if site.layer == 0:
            break
    assert reached == ["blocks.0.hook_resid_pre"]
    assert no_hooks(model)
    # Nothing later ran: a hook further on never fires.
    t = model.trace(toks(), names_filter=["blocks.0.hook_resid_pre"])
    for _ in t:
        break
    assert t.output is None and not t.finished and no_hooks(model)


def test_wrong_replacement_names_the_site_and_leaves_no_hook(model):
    with pytest.raises(HookShapeError, match=r"blocks\.0\.attn\.hook_z.*shape"):
        for site in model.trace(toks()):
            if site.name == "blocks.0.attn.hook_z":
                site.value = site.value[:, :-1]
    assert no_hooks(model)
    with pytest.raises(HookShapeError, match=r"blocks\.1\.hook_mlp_out.*dtype"):
        for site in model.trace(toks()):
            if site.name == "blocks.1.hook_mlp_out":
                site.value = site.value.double()
    assert no_hooks(model)
    # An exception in the loop body, and one inside the forward, leave nothing behind either.
    with pytest.raises(KeyError):
        for site in model.trace(toks()):
            raise KeyError(site.name)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="return_type"):
        for _ in model.trace(toks(), return_type="nonsense"):
            pass
    assert no_hooks(model)


def test_grad_mode_carries_into_the_forward(model):
    tokens = toks()
    with torch.no_grad():
        for site in model.trace(tokens, names_filter="blocks.0.hook_resid_post"):
            assert not site.value.requires_grad
    x = torch.zeros(model.cfg.d_model, requires_grad=True)
    t = model.trace(tokens, names_filter="blocks.0.hook_resid_post")
    for site in t:
        site.value = site.value + x
    t.output[..., -1, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_thread_count_carries_into_the_forward(model):
    """OpenMP's thread count is per thread: the worker must use the caller's (issue 23.4)."""
    tokens = toks(3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if before == 1 else 1)
        t = model.trace(tokens)
        for _ in t:
            break
        assert t.worker_threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    noop = lambda act, hook: None  # noqa: E731
    t = model.trace(tokens)
    for _ in t:
        pass
    same = model.run_with_hooks(tokens, fwd_hooks=[(n, noop) for n in t.names])
    assert torch.equal(t.output, same)  # bit for bit, with hooks on the same sites


def test_under_autocast_trace_and_run_with_cache_agree_in_dtype_and_value(model):
    """Autocast is per thread: the trace's worker used to run in float32 (issue 27.9). Under
    autocast the trace equals run_with_hooks with hooks on the same sites to the bit, and has
    run_with_cache's dtypes at every site (values within bfloat16 rounding: the cache's read-only
    savers keep the fast attention path, see test_reading_every_site_...)."""
    tokens = toks(4)
    saved = {}

    def save(act, hook):
        saved[hook.name] = act.clone()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = model.run_with_cache(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(name, save) for name in cache.keys()])
        t = model.trace(tokens)
        seen = {site.name: site.value.clone() for site in t}
    assert t.output.dtype == logits.dtype == hooked.dtype == torch.bfloat16
    assert torch.equal(t.output, hooked)
    torch.testing.assert_close(t.output, logits, atol=0.1, rtol=0.05)
    assert list(seen) == list(saved)
    for name, value in seen.items():
        assert value.dtype == cache[name].dtype == saved[name].dtype, name
        assert torch.equal(value, saved[name]), name


def test_nnsight_form_fails_showing_the_loop_that_works(model):
    with pytest.raises(TypeError, match=r"(?s)not nnsight's context manager.*for site in model\.trace\(prompt\)"):
        with model.trace(toks()):
            pass
    assert no_hooks(model)
