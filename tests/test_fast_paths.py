"""The fast paths give the numbers of the observable ones, and run only when nothing
needs the other path: fused attention vs the explicit pattern, shared vs per-head
inputs, one matmul vs per-head results, fused vs explicit norms; caching stores only
what was asked; stop_at_layer stops."""

import pytest
import torch
from checkpoints import CONFIGS, VOCAB

from transformer_hooks.components import Attention, KVCache

TOL = 1e-5


@pytest.fixture(scope="module")
def loaded(hooked_model):
    return hooked_model


def tokens(batch: int = 3, pos: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def padding_mask(side: str, batch: int = 3, pos: int = 16, pads: tuple[int, ...] = (0, 4, 11)) -> torch.Tensor:
    mask = torch.ones(batch, pos, dtype=torch.long)
    for row, n_pad in enumerate(pads[:batch]):
        if n_pad:
            mask[row, :n_pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, pos - n_pad :] = 0
    return mask


def identity(act, hook):
    return None


@pytest.fixture
def attention_paths(monkeypatch):
    """Which layers ran the fused kernel and which the explicit pattern."""
    ran = {"fused": [], "explicit": []}
    for path in ran:
        original = getattr(Attention, f"_{path}")

        def counted(self, *args, _original=original, _path=path, **kwargs):
            ran[_path].append(self.layer)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Attention, f"_{path}", counted)
    return ran


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_and_explicit_attention_agree(loaded, attention_paths, name, padding):
    model = loaded(name)
    toks = tokens(pos=24)
    mask = None if padding is None else padding_mask(padding, pos=24)
    with torch.no_grad():
        fused = model(toks, attention_mask=mask)
        with model.hooks(fwd_hooks=[("blocks.*.attn.hook_pattern", identity)]):
            explicit = model(toks, attention_mask=mask)
    n = model.cfg.n_layers
    assert attention_paths == {"fused": list(range(n)), "explicit": list(range(n))}
    real = torch.ones_like(toks, dtype=torch.bool) if mask is None else mask.bool()
    assert fused[real].abs().mean() > 0.5
    torch.testing.assert_close(explicit[real], fused[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo-local", "pythia", "llama-gqa"])
def test_fused_and_explicit_agree_while_decoding_with_a_kv_cache(loaded, name):
    """Cached keys, one query at a time, with left padding in the prompt."""
    model = loaded(name)
    toks, mask = tokens(pos=12), padding_mask("left", pos=12, pads=(0, 3, 7))  # padding in the prompt only

    def decode() -> torch.Tensor:
        cache = KVCache(model.cfg, 3, 12, dtype=model.dtype)
        steps = [model(toks[:, :8], attention_mask=mask[:, :8], past_kv_cache=cache)[:, -1]]
        steps += [model(toks[:, i : i + 1], past_kv_cache=cache)[:, -1] for i in range(8, 12)]
        return torch.stack(steps, 1)

    with torch.no_grad():
        fused = decode()
        with model.hooks(fwd_hooks=[("blocks.*.attn.hook_attn_scores", identity)]):
            explicit = decode()
        whole = model(toks, attention_mask=mask)[:, 7:]
    torch.testing.assert_close(explicit, fused, atol=TOL, rtol=0)
    torch.testing.assert_close(fused, whole, atol=1e-4, rtol=0)


def test_observing_one_layer_makes_only_that_layer_explicit(loaded, attention_paths):
    model = loaded("gpt-neo-local")  # 4 layers
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.2.attn.hook_pattern", identity)]):
        model(tokens())
    assert attention_paths == {"fused": [0, 1, 3], "explicit": [2]}
    attention_paths["fused"].clear(), attention_paths["explicit"].clear()
    # The cache only reads: every layer's output keeps the fused kernel (so model(x) and
    # run_with_cache(x) agree to the bit) and layer 1's scores are computed for the cache beside it.
    _, cache = model.run_with_cache(tokens(), names_filter="blocks.1.attn.hook_attn_scores")
    assert attention_paths == {"fused": [0, 1, 2, 3], "explicit": []}
    assert list(cache.keys()) == ["blocks.1.attn.hook_attn_scores"]
    attention_paths["fused"].clear(), attention_paths["explicit"].clear()
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", identity)]):
        model(tokens())  # a hook that may edit: that layer runs explicitly
    assert attention_paths == {"fused": [0, 2, 3], "explicit": [1]}


PER_HEAD_AND_NORM_SITES = [
    "attn.hook_result",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_mlp_in",
    "ln1.hook_scale",
    "ln2.hook_normalized",
]


@pytest.mark.parametrize("name", ["gpt2", "pythia", "neox-sequential-full-rotary", "llama-gqa", "llama-head-dim-bias"])
@pytest.mark.parametrize("site", PER_HEAD_AND_NORM_SITES)
def test_observing_a_site_does_not_change_the_numbers(loaded, attention_paths, name, site):
    model = loaded(name)
    toks = tokens()
    with torch.no_grad():
        plain = model(toks)
        observed = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.*.{site}", identity)])
    torch.testing.assert_close(observed, plain, atol=TOL, rtol=0)
    assert not attention_paths["explicit"]  # none of these needs the pattern


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_per_head_sites_hold_what_they_claim(loaded, name):
    """sum_head result + b_O = attn_out; each head's input is the block's input."""
    model = loaded(name)
    _, cache = model.run_with_cache(
        tokens(),
        names_filter=[
            "blocks.*.attn.hook_result",
            "blocks.*.hook_attn_out",
            "blocks.*.hook_q_input",
            "blocks.*.hook_k_input",
            "blocks.*.hook_resid_pre",
        ],
    )
    g = model.cfg.group_size
    for layer, block in enumerate(model.blocks):
        result, resid = cache["result", layer], cache["resid_pre", layer]
        assert result.shape[-2:] == (model.cfg.n_heads, model.cfg.d_model)
        torch.testing.assert_close(result.sum(-2) + block.attn.b_O, cache["attn_out", layer], atol=TOL, rtol=0)
        torch.testing.assert_close(cache["q_input", layer], resid[:, :, None].expand_as(cache["q_input", layer]))
        assert cache["k_input", layer].shape[2] == model.cfg.n_heads // g


def test_editing_one_heads_input_changes_only_what_reads_it(loaded):
    """Per-head inputs are separate copies: zeroing head 0's query input moves head 0's z only."""
    model = loaded("gpt2")
    toks = tokens()

    def zero_head_0(x, hook):
        x[:, :, 0] = 0
        return x

    _, plain = model.run_with_cache(toks, names_filter="blocks.0.attn.hook_z")
    with model.hooks(fwd_hooks=[("blocks.0.hook_q_input", zero_head_0)]):
        _, edited = model.run_with_cache(toks, names_filter="blocks.0.attn.hook_z")
    z0, z1 = plain["z", 0], edited["z", 0]
    assert not torch.allclose(z1[:, 1:, 0], z0[:, 1:, 0])  # (position 0 attends only to itself)
    torch.testing.assert_close(z1[:, :, 1:], z0[:, :, 1:], atol=0, rtol=0)


def test_run_with_cache_stores_only_the_selected_sites_detached(loaded, attention_paths):
    model = loaded("llama-gqa")
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_scale"]
    assert all(p.requires_grad for p in model.parameters())
    logits, cache = model.run_with_cache(tokens(), names_filter=names)
    assert sorted(cache.keys()) == sorted(names)
    assert all(not t.requires_grad for t in cache.values())
    assert logits.requires_grad  # the output keeps its graph; only the cache is detached
    assert attention_paths["explicit"] == []  # caching z needs no pattern
    _, kept = model.run_with_cache(tokens(), names_filter=names, detach=False)
    assert all(t.requires_grad for t in kept.values())


def test_a_zero_bias_that_needs_a_gradient_still_gets_one(loaded):
    """components/linear.py skips all-zero biases, but never one that is being trained."""
    model = loaded("llama-gqa")  # a bias-free checkpoint: every b_* here is zero
    b_O = model.blocks[0].attn.b_O
    assert b_O.requires_grad and not b_O.any()
    try:
        model(tokens(), return_type="loss").backward()
        assert b_O.grad is not None and b_O.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_default_cache_skips_per_head_expansions_and_holds_each_site_once(loaded):
    model = loaded("pythia")
    _, cache = model.run_with_cache(tokens())
    expected = {
        n
        for n in model.hook_dict
        if not n.endswith(
            ("attn.hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")
        )
    }
    assert set(cache.keys()) == expected
    # Sites that are the same tensor (resid_post of layer L is resid_pre of L + 1) share storage.
    assert cache["resid_post", 0].data_ptr() == cache["resid_pre", 1].data_ptr()


def test_stop_at_layer_runs_no_later_block(loaded):
    model = loaded("gpt-neo-local")
    ran = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: ran.append(name))
        for name, m in [
            *((f"block{i}", b) for i, b in enumerate(model.blocks)),
            ("ln_final", model.ln_final),
            ("unembed", model.unembed),
        ]
    ]
    try:
        toks = tokens()
        with torch.no_grad():
            resid = model(toks, stop_at_layer=2)
        assert ran == ["block0", "block1"]
        _, cache = model.run_with_cache(toks, names_filter="blocks.2.hook_resid_pre")
        torch.testing.assert_close(resid, cache["resid_pre", 2], atol=0, rtol=0)
    finally:
        for h in handles:
            h.remove()
