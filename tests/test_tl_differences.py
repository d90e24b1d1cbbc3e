"""The silent differences from TransformerLens 3.9 that its own test suite exposed (issue 28):
each test computes TransformerLens's formula independently and compares."""

from __future__ import annotations

import pytest
import torch

from transformer_hooks import HookedTransformer, HookedTransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_vocab=50, n_ctx=16, seed=0, act_fn="gelu", d_mlp=64)


def randomise_norms(model: HookedTransformer, seed: int = 1) -> HookedTransformer:
    """Norm weights away from 1 and biases away from 0 (a fresh model has 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5 + (1.0 if name.endswith(".w") else 0.0))
    return model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(seed))


# 1. LayerNorm hook_normalized is before the weight and bias (TransformerLens 3.x) --------------
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_hook_normalized_is_before_the_weight_and_bias(norm):
    model = randomise_norms(HookedTransformer(HookedTransformerConfig(**SMALL, normalization_type=norm)))
    _, cache = model.run_with_cache(tokens())
    for layer in range(2):
        x = cache[f"blocks.{layer}.hook_resid_pre"]
        if norm == "LN":
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        torch.testing.assert_close(cache[f"blocks.{layer}.ln1.hook_normalized"], x / scale)
        torch.testing.assert_close(cache[f"blocks.{layer}.ln1.hook_scale"], scale)
    # fold_ln leaves it unchanged
    folded = HookedTransformer(HookedTransformerConfig(**SMALL, normalization_type=norm))
    folded.load_state_dict(model.state_dict())
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    _, folded_cache = folded.run_with_cache(tokens())
    for name in ("blocks.1.ln2.hook_normalized", "ln_final.hook_normalized"):
        torch.testing.assert_close(folded_cache[name], cache[name], atol=1e-5, rtol=1e-5)


# 4. A 0-d index drops the dimension, as an int does -------------------------------------------
def test_zero_dim_slice_drops_the_dimension():
    from transformer_hooks.utils import Slice, to_numpy

    x = torch.arange(12).reshape(3, 4)
    for index in (torch.tensor(1), torch.tensor(-1), __import__("numpy").int64(1)):
        assert Slice(index).apply(x, 1).shape == (3,)
        torch.testing.assert_close(Slice(index).apply(x, 1), x[:, int(index)])
    assert Slice(2).indices().tolist() == [2] and Slice(torch.tensor(2)).indices(5).tolist() == [2]
    with pytest.raises(ValueError, match="max_ctx"):
        Slice([0, 2]).indices()
    assert to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype.name == "float32"


def test_pos_slice_as_a_zero_dim_tensor_gives_no_extra_axis():
    model = HookedTransformer(HookedTransformerConfig(**SMALL))
    _, cache = model.run_with_cache(tokens())
    as_int = cache.accumulated_resid(pos_slice=-1)
    as_tensor = cache.accumulated_resid(pos_slice=torch.tensor(-1))
    assert as_tensor.shape == as_int.shape == (2 + 1, 2, 32)
    torch.testing.assert_close(as_tensor, as_int)


# Issue 27 point 11: TransformerLens configs that would load without a word -------------------
@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(use_local_attn=True, attn_types=["global", "locale"], window_size=4), r"attn_types\[1\]='locale'"),
        (dict(use_local_attn=True, attn_types=["global"], window_size=4), "one entry per layer"),
        (dict(use_local_attn=True, attn_types=["local", "global"], window_size=0), "window_size=0"),
    ],
)
def test_local_attention_settings_are_checked(fields, named):
    with pytest.raises(ValueError, match=named):
        HookedTransformer(HookedTransformerConfig(**SMALL, **fields))


def test_two_state_dicts_in_one_checkpoint_directory_are_refused(tmp_path):
    import json

    from weights_conversion.transformer_lens import to_transformer_lens_state_dict

    cfg = HookedTransformerConfig(**SMALL)
    model = HookedTransformer(cfg)
    torch.save(to_transformer_lens_state_dict(model), tmp_path / "model_final.pth")
    torch.save(to_transformer_lens_state_dict(HookedTransformer(cfg)), tmp_path / "other.pth")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "dtype"}))
    with pytest.raises(ValueError, match=r"model_final\.pth, other\.pth"):
        HookedTransformer.from_pretrained_no_processing(str(tmp_path))


# 5. OLMo 2/3 in a HookedTransformerConfig: post-norm blocks, as TransformerLens builds them --------
@pytest.mark.parametrize("architecture", ["Olmo2ForCausalLM", "Olmo3ForCausalLM"])
def test_olmo_config_builds_post_norm_blocks(architecture):
    fields = dict(SMALL, act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary")
    model = randomise_norms(HookedTransformer(HookedTransformerConfig(**fields, original_architecture=architecture)))
    assert model.cfg.norm_placement == "post" and model.cfg.qk_norm == "all"
    _, cache = model.run_with_cache(tokens())
    block = model.blocks[0]
    # resid_mid = resid_pre + RMSNorm(attn(resid_pre)): the norm is on the branch's output
    attn_raw = cache["blocks.0.attn.hook_z"].flatten(-2) @ block.attn.W_O.flatten(0, 1) + block.attn.b_O
    x = attn_raw.float()
    normed = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt() * block.ln1_post.w
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], normed, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]
    )


# 3. A config-built gated MLP adds b_in after the product, as TransformerLens's GatedMLP ---------
def test_config_built_gated_mlp_adds_b_in_after_the_product():
    fields = dict(SMALL, act_fn="silu", gated_mlp=True, normalization_type="RMS")
    model = HookedTransformer(HookedTransformerConfig(**fields))
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.b_in.normal_(generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens())
    x = cache["blocks.0.ln2.hook_normalized"] * model.blocks[0].ln2.w
    expected_post = torch.nn.functional.silu(x @ mlp.W_gate) * (x @ mlp.W_in) + mlp.b_in  # TransformerLens 3.9
    torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], expected_post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache["blocks.0.hook_mlp_out"], expected_post @ mlp.W_out + mlp.b_out, atol=1e-5, rtol=1e-5
    )


# 2. Decompositions with apply_ln=True leave out the norm's weight and bias, as TransformerLens ----
def test_norm_decompositions_on_an_unfolded_model_are_transformer_lens_s():
    model = randomise_norms(HookedTransformer(HookedTransformerConfig(**SMALL)))
    _, cache = model.run_with_cache(tokens())
    x = cache["blocks.1.hook_resid_post"]
    x = x - x.mean(-1, keepdim=True)
    scale = cache["ln_final.hook_scale"]
    stack = cache.decompose_resid(apply_ln=True)
    raw = cache.decompose_resid()
    torch.testing.assert_close(stack, (raw - raw.mean(-1, keepdim=True)) / scale)  # TransformerLens's formula
    torch.testing.assert_close(stack.sum(0), x / scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stack.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    full = cache.get_full_resid_decomposition(apply_ln=True)
    torch.testing.assert_close(full.sum(0), cache["ln_final.hook_normalized"], atol=1e-4, rtol=1e-4)
    heads = cache.stack_head_results(apply_ln=True)
    raw_heads = cache.stack_head_results()
    torch.testing.assert_close(heads, (raw_heads - raw_heads.mean(-1, keepdim=True)) / scale)
    # logit attributions still add up to the logits (the unembedding reads w * x̂ + b)
    logits = model(tokens())
    attrs = cache.logit_attrs(raw, tokens()[:, -1:].expand(-1, 6)).sum(0)
    direct = logits.gather(-1, tokens()[:, -1:].expand(-1, 6)[..., None])[..., 0]
    const = model.ln_final.b @ model.W_U[:, tokens()[:, -1:].expand(-1, 6)].permute(1, 2, 0).unsqueeze(-1)
    torch.testing.assert_close(
        attrs + const[..., 0] + model.b_U[tokens()[:, -1:].expand(-1, 6)], direct, atol=1e-4, rtol=1e-4
    )


# 6. model(x) and run_with_cache(x) give the same logits to the bit ----------------------------------
@pytest.mark.parametrize("variant", ["gelu", "rotary-gqa-gated-rms"])
def test_cached_forward_is_bit_equal_to_the_plain_forward(variant):
    extra = {
        "gelu": {},
        "rotary-gqa-gated-rms": dict(
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_key_value_heads=2,
        ),
    }[variant]
    model = randomise_norms(HookedTransformer(HookedTransformerConfig(**{**SMALL, **extra})))
    toks = tokens()
    logits, cache = model.run_with_cache(toks)
    assert torch.equal(logits, model(toks))
    # the cached pattern is still the explicit softmax of the cached scores
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_attn_scores"].softmax(-1))

    # a hook that edits still runs the explicit path and its edit takes effect
    def double(pattern, hook):
        return pattern * 2

    edited = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_pattern", double)])
    assert not torch.allclose(edited, logits)
