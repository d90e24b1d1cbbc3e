"""Hook points: every DESIGN.md site exists with TransformerLens's shapes; hooks edit the
computation exactly as a hand computation says; hooks compose with autograd."""

import pytest
import torch
from checkpoints import VOCAB
from torch import nn

from transformer_hooks import HookedTransformer, HookShapeError, UnknownHookError
from transformer_hooks.cache import ActivationCache
from transformer_hooks.hook_cache import HookCache
from transformer_hooks.hooks import HookedRootModule, HookPoint
from transformer_hooks.sae import SAE, SAEConfig

FAMILIES = ["gpt2", "gpt-neo-local", "pythia", "neox-sequential-full-rotary", "llama-gqa"]
B, P = 2, 7


def load(hf_checkpoint, name):
    path, _ = hf_checkpoint(name)
    return HookedTransformer.from_pretrained_no_processing(str(path))


def tokens(seed=0):
    return torch.randint(0, VOCAB, (B, P), generator=torch.Generator().manual_seed(seed))


def expected_shapes(cfg):
    """DESIGN.md's table of sites and shapes, for one model."""
    d, h, kv, dh, dm = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    top = {"hook_embed": (B, P, d), "ln_final.hook_scale": (B, P, 1), "ln_final.hook_normalized": (B, P, d)}
    top |= {"unembed.hook_in": (B, P, d), "unembed.hook_out": (B, P, cfg.d_vocab)}
    if cfg.positional_embedding == "learned":
        top["hook_pos_embed"] = (B, P, d)
    block = {
        "hook_resid_pre": (B, P, d),
        "ln1.hook_scale": (B, P, 1),
        "ln1.hook_normalized": (B, P, d),
        "attn.hook_q": (B, P, h, dh),
        "attn.hook_k": (B, P, kv, dh),
        "attn.hook_v": (B, P, kv, dh),
        "attn.hook_attn_scores": (B, h, P, P),
        "attn.hook_pattern": (B, h, P, P),
        "attn.hook_z": (B, P, h, dh),
        "attn.hook_result": (B, P, h, d),
        "hook_attn_out": (B, P, d),
        "ln2.hook_scale": (B, P, 1),
        "ln2.hook_normalized": (B, P, d),
        "hook_mlp_in": (B, P, d),
        "mlp.hook_pre": (B, P, dm),
        "mlp.hook_post": (B, P, dm),
        "hook_mlp_out": (B, P, d),
        "hook_resid_post": (B, P, d),
        "hook_attn_in": (B, P, h, d),
        "hook_q_input": (B, P, h, d),
        "hook_k_input": (B, P, kv, d),
        "hook_v_input": (B, P, kv, d),
    }
    if cfg.positional_embedding == "rotary":
        block.update({"attn.hook_rot_q": (B, P, h, dh), "attn.hook_rot_k": (B, P, kv, dh)})
    if cfg.gated_mlp:
        block["mlp.hook_pre_linear"] = (B, P, dm)
    if not cfg.parallel_residual:
        block["hook_resid_mid"] = (B, P, d)
    return {**top, **{f"blocks.{layer}.{k}": v for layer in range(cfg.n_layers) for k, v in block.items()}}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_site_exists_with_its_shape(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    expected = expected_shapes(model.cfg)
    assert set(model.hook_dict) == set(expected)
    # Caching per-head inputs changes ln1's input to [B, P, head, d]; check those sites apart.
    per_head_inputs = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")
    # Lists, not predicates: a predicate leaves out the sites whose TransformerLens switch is off.
    _, cache = model.run_with_cache(tokens(), names_filter=[n for n in expected if not n.endswith(per_head_inputs)])
    _, head_cache = model.run_with_cache(tokens(), names_filter=[n for n in expected if n.endswith(per_head_inputs)])
    shapes = {k: tuple(v.shape) for k, v in {**cache.cache_dict, **head_cache.cache_dict}.items()}
    assert shapes == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_default_cache_leaves_out_per_head_expansions(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    _, cache = model.run_with_cache(tokens())
    expansions = ("attn.hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")
    assert not [k for k in cache.keys() if k.endswith(expansions)]
    # hook_mlp_in too, as TransformerLens (until set_use_hook_mlp_in(True)).
    assert set(cache.keys()) == {k for k in model.hook_dict if not k.endswith((*expansions, "hook_mlp_in"))}
    assert all(not t.requires_grad for t in cache.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_hooks_change_nothing(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    with torch.no_grad():
        clean = model(tokens())
        hooked = model.run_with_hooks(tokens(), fwd_hooks=[(lambda n: True, lambda act, hook: act)])
    # Observing every site switches every optional path on (explicit attention, per-head
    # inputs and results, explicit norms): the numbers agree to float rounding.
    torch.testing.assert_close(hooked, clean, atol=1e-5, rtol=0)
    assert not any(hp.observed for hp in model.hook_points())


@pytest.mark.parametrize("name", FAMILIES)
def test_zeroing_a_neuron_changes_logits_as_computed_by_hand(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    last, neuron = model.cfg.n_layers - 1, 3

    def ablate(post, hook):
        post[..., neuron] = 0.0
        return post

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens())
        patched = model.run_with_hooks(tokens(), fwd_hooks=[(f"blocks.{last}.mlp.hook_post", ablate)])
        # The neuron wrote post[n] * W_out[n] into the last resid_post; take it out by hand.
        contribution = cache["post", last][..., neuron, None] * model.blocks[last].mlp.W_out[neuron]
        by_hand = model.unembed(model.ln_final(cache["resid_post", last] - contribution))
    torch.testing.assert_close(patched, by_hand, atol=1e-5, rtol=0)
    assert (patched - logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_head_results_sum_to_attn_out(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    _, cache = model.run_with_cache(tokens(), names_filter=["blocks.1.attn.hook_result", "blocks.1.hook_attn_out"])
    summed = cache["blocks.1.attn.hook_result"].sum(2) + model.blocks[1].attn.b_O
    torch.testing.assert_close(summed, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=0)


def test_patching_one_heads_query_input_changes_only_that_heads_query(hf_checkpoint):
    model = load(hf_checkpoint, "llama-gqa")
    head = 4

    def shift(q_in, hook):
        q_in[:, :, head] += 1.0
        return q_in

    _, clean = model.run_with_cache(tokens(), names_filter="blocks.0.attn.hook_q")
    with model.hooks([("blocks.0.hook_q_input", shift)]):
        _, patched = model.run_with_cache(tokens(), names_filter="blocks.0.attn.hook_q")
    diff = (patched["blocks.0.attn.hook_q"] - clean["blocks.0.attn.hook_q"]).abs().amax(dim=(0, 1, 3))
    assert diff[head] > 1e-3
    # Other heads: unchanged up to rounding (with q_input observed, q is computed per head).
    assert torch.all(diff[torch.arange(model.cfg.n_heads) != head] < 1e-5)


def test_gradient_through_a_hook_reaches_a_trainable_module(hf_checkpoint):
    model = load(hf_checkpoint, "pythia")
    model.requires_grad_(False)
    steer = torch.nn.Parameter(torch.zeros(model.cfg.d_model))

    def add(resid, hook):
        return resid + steer

    loss = model.run_with_hooks(tokens(), return_type="loss", fwd_hooks=[("blocks.1.hook_resid_pre", add)])
    loss.backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_backward_hooks_give_the_gradient_of_a_site(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    site = "blocks.0.hook_resid_post"
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.clone()

    with model.hooks(bwd_hooks=[(site, save)]):
        model(tokens(), return_type="loss").backward()
    # The same gradient by autograd, on the activation kept attached to its graph.
    loss, cache = model.run_with_cache(tokens(), names_filter=site, detach=False, return_type="loss")
    (expected,) = torch.autograd.grad(loss, cache[site])
    torch.testing.assert_close(grads[site], expected, atol=1e-6, rtol=1e-5)
    assert not any(hp.observed for hp in model.hook_points())


def test_run_with_hooks_keeps_backward_hooks_until_reset(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    seen = []
    with pytest.raises(ValueError, match="reset_hooks_end=False"):
        model.run_with_hooks(tokens(), return_type="loss", bwd_hooks=[("hook_embed", lambda g, hook: seen.append(g))])
    loss = model.run_with_hooks(
        tokens(), return_type="loss", reset_hooks_end=False, bwd_hooks=[("hook_embed", lambda g, hook: seen.append(g))]
    )
    loss.backward()
    model.reset_hooks()
    assert len(seen) == 1 and seen[0].shape == (B, P, model.cfg.d_model)
    assert not any(hp.observed for hp in model.hook_points())


def test_run_with_cache_incl_bwd_stores_gradients(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    _, cache = model.run_with_cache(tokens(), names_filter="blocks.1.hook_resid_pre", incl_bwd=True, return_type="loss")
    assert cache["blocks.1.hook_resid_pre_grad"].shape == cache["blocks.1.hook_resid_pre"].shape
    assert cache["blocks.1.hook_resid_pre_grad"].abs().sum() > 0


def test_names_filter_forms(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    by_str = model.run_with_cache(tokens(), names_filter="blocks.0.hook_resid_pre")[1]
    by_list = model.run_with_cache(tokens(), names_filter=["blocks.0.hook_resid_pre", "hook_embed"])[1]
    by_fn = model.run_with_cache(tokens(), names_filter=lambda n: n.endswith("hook_z"))[1]
    by_glob = model.run_with_cache(tokens(), names_filter="blocks.*.attn.hook_z")[1]
    assert list(by_str.keys()) == ["blocks.0.hook_resid_pre"]
    assert set(by_list.keys()) == {"blocks.0.hook_resid_pre", "hook_embed"}
    assert set(by_fn.keys()) == set(by_glob.keys()) == {f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)}


def test_unknown_hook_names_list_the_closest(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    for call in (
        lambda: model.add_hook("blocks.0.hook_resid_psot", lambda a, hook: a),
        lambda: model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.hook_resid_psot", lambda a, hook: a)]),
        lambda: model.run_with_cache(tokens(), names_filter=["blocks.0.hook_resid_psot"]),
    ):
        with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_post"):
            call()
    assert not any(hp.observed for hp in model.hook_points())


def test_wrong_shape_from_a_hook_names_the_hook_and_both_shapes(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    clean = model(tokens())
    with pytest.raises(HookShapeError, match=r"blocks\.1\.hook_resid_mid.*\(2, 6, 48\).*\(2, 7, 48\)"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.hook_resid_mid", lambda a, hook: a[:, 1:])])
    assert not any(hp.observed for hp in model.hook_points())
    torch.testing.assert_close(model(tokens()), clean, atol=0, rtol=0)


def test_exception_in_a_hook_leaves_no_hook_attached(hf_checkpoint):
    model = load(hf_checkpoint, "llama-gqa")
    clean = model(tokens())

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(
            tokens(), fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a), ("blocks.1.attn.hook_pattern", boom)]
        )
    with pytest.raises(RuntimeError, match="boom"), model.hooks([("blocks.1.hook_mlp_out", boom)]):
        model.run_with_cache(tokens())
    assert not any(hp.observed for hp in model.hook_points())
    torch.testing.assert_close(model(tokens()), clean, atol=0, rtol=0)


def test_add_hook_persists_until_reset(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    clean = model(tokens())
    model.add_hook("blocks.0.hook_resid_post", lambda a, hook: a * 2)
    assert (model(tokens()) - clean).abs().max() > 1e-3
    model.reset_hooks()
    torch.testing.assert_close(model(tokens()), clean, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-gqa"])
def test_start_and_stop_at_layer_compose(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    full = model(tokens())
    _, cache = model.run_with_cache(tokens())
    resid = model(tokens(), stop_at_layer=1)
    # Caching observes the norms (explicit path), so compare to float rounding.
    torch.testing.assert_close(resid, cache["resid_pre", 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(resid, start_at_layer=1), full, atol=1e-6, rtol=0)
    loss = model(resid, start_at_layer=1, tokens=tokens(), return_type="loss")
    torch.testing.assert_close(loss, model(tokens(), return_type="loss"), atol=1e-6, rtol=0)


# The registry works for any module built from HookPoints --------------------------------
class ToyModel(HookedRootModule):
    """TransformerLens's Main Demo toy: two linear layers with a ReLU, a hook on each step."""

    def __init__(self, d=4, hidden=8):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.hook_in, self.hook_mid, self.hook_out = HookPoint(), HookPoint(), HookPoint()
        self.setup()  # TransformerLens's name for setup_hooks()

    def forward(self, x):
        return self.hook_out(self.out_layer(self.hook_mid(torch.relu(self.in_layer(self.hook_in(x))))))


def test_toy_model_caches_and_hooks_like_a_transformer():
    toy = ToyModel()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, cache = toy.run_with_cache(x)
        mid = torch.relu(toy.in_layer(x))
        assert isinstance(cache, HookCache) and not isinstance(cache, ActivationCache)
        assert sorted(cache.keys()) == ["hook_in", "hook_mid", "hook_out"] and len(cache) == 3
        assert "hook_mid" in cache and "hook_nope" not in cache
        torch.testing.assert_close(cache["hook_mid"], mid)
        torch.testing.assert_close(cache["hook_out"], out)
        assert dict(cache.items())["hook_in"] is cache["hook_in"] and len(list(cache.values())) == 3
        with pytest.raises(KeyError, match="'hook_mdi' is not in this cache.*hook_mid"):
            cache["hook_mdi"]
        # An edit at the middle changes the output as the hand computation says.
        ablated = toy.run_with_hooks(x, fwd_hooks=[("hook_mid", lambda a, hook: torch.zeros_like(a))])
        torch.testing.assert_close(ablated, toy.out_layer.bias.expand(3, 4))
        _, store = toy.run_with_cache(x, names_filter="hook_mid", return_cache_object=False)
        assert type(store) is dict and list(store) == ["hook_mid"]
        _, one = toy.run_with_cache(x[:1], remove_batch_dim=True)
        assert one["hook_mid"].shape == (8,) and not one.has_batch_dim
        _, batch_one = toy.run_with_cache(x[:1])
        torch.testing.assert_close(batch_one.remove_batch_dim()["hook_mid"], one["hook_mid"])
        assert batch_one.to("cpu") is batch_one
        picked = cache.apply_slice_to_batch_dim(1)
        assert type(picked) is HookCache and not picked.has_batch_dim
        torch.testing.assert_close(picked["hook_mid"], mid[1])
    assert not any(hp.observed for hp in toy.hook_points())


def test_sae_run_with_cache_and_hooks():
    cfg = SAEConfig(d_in=6, d_sae=10, hook_name="blocks.0.hook_resid_pre")
    sae = SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
        out, cache = sae.run_with_cache(x)
        assert isinstance(cache, HookCache)
        torch.testing.assert_close(cache["hook_sae_acts_post"], sae.encode(x))
        torch.testing.assert_close(cache["hook_sae_output"], out)
        torch.testing.assert_close(out, sae.decode(sae.encode(x)))
        off = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", lambda a, hook: torch.zeros_like(a))])
        torch.testing.assert_close(off, sae.b_dec.expand(2, 3, 6))
