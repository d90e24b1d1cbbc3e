"""From patching to circuits: AtP* (QK fix, GradDrop) against exact activation patching."""

import pytest
import torch

from checkpoints import VOCAB
from transformer_hooks import HookedTransformer
from transformer_hooks import patching as P

BATCH, POS = 4, 8


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


@pytest.fixture(scope="module")
def models(hf_checkpoint, one_thread):
    made = {}

    def get(name):
        if name not in made:
            path, _ = hf_checkpoint(name)
            made[name] = HookedTransformer.from_pretrained_no_processing(str(path))
        return made[name]

    return get


def pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, POS), generator=g), torch.randint(0, VOCAB, (BATCH, POS), generator=g)


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-gqa"])
def test_atp_star_tracks_exact_patching_better_where_attention_saturates(models, name):
    model = models(name)
    clean, corrupted = pair()
    _, cache = model.run_with_cache(clean)
    _, patterns = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("hook_pattern"))
    # The case AtP* is for: most rows put most of their weight on one key (a saturated softmax).
    top = torch.stack([patterns[f"blocks.{l}.attn.hook_pattern"].amax(-1).mean() for l in range(model.cfg.n_layers)])
    assert float(top.mean()) > 0.5
    with torch.no_grad():
        base = metric(model(corrupted))
    for act, attr in [
        (P.get_act_patch_attn_head_k_by_pos, P.get_attr_patch_attn_head_k_by_pos),
        (P.get_act_patch_attn_head_q_by_pos, P.get_attr_patch_attn_head_q_by_pos),
    ]:
        exact = act(model, corrupted, cache, metric, progress=False) - base
        atp = attr(model, corrupted, cache, metric)
        star = attr(model, corrupted, cache, metric, method="atp*")
        assert star.shape == atp.shape == exact.shape
        assert pearson(star, exact) > pearson(atp, exact), attr.__name__
        assert (star - exact).abs().mean() < (atp - exact).abs().mean(), attr.__name__
    assert no_hooks(model)


def test_atp_star_key_estimate_is_the_exact_pattern_change_times_the_gradient(models):
    """For one key patch, AtP*'s closed-form softmax equals the pattern of the real patched run."""
    model = models("llama-gqa")
    clean, corrupted = pair(1)
    _, cache = model.run_with_cache(clean)
    layer, s, kv = 1, 3, 1
    site, pattern = f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_pattern"
    kept = {}

    def keep(x, hook):
        x = x.detach().requires_grad_(True)
        kept["A"] = x
        return x

    with model.hooks(fwd_hooks=[(pattern, keep)]):
        value = metric(model(corrupted))
    (g,) = torch.autograd.grad(value, kept["A"])

    def patch(k, hook):
        k = k.clone()
        k[:, s, kv] = cache[site][:, s, kv]
        return k

    with model.hooks(fwd_hooks=[(site, patch)]):
        _, patched = model.run_with_cache(corrupted, names_filter=pattern)
    expected = ((patched[pattern] - kept["A"].detach()) * g).sum()
    star = P.get_attr_patch_attn_head_k_by_pos(model, corrupted, cache, metric, method="atp*")
    torch.testing.assert_close(star[layer, s, kv].double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert no_hooks(model)


def test_grad_drop(models):
    model = models("gpt2")  # 2 layers
    clean, corrupted = pair(2)
    _, cache = model.run_with_cache(clean)
    atp = P.get_attr_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    gd = P.get_attr_patch_attn_head_out_all_pos(model, corrupted, cache, metric, grad_drop=True)
    assert gd.shape == atp.shape and (gd >= 0).all()
    # A last-layer head reaches the logits only through its own block's attn_out: dropping that
    # block leaves 0, dropping the block below changes nothing; so the score is |AtP| / (n_layers - 1).
    torch.testing.assert_close(gd[-1], atp[-1].abs() / (model.cfg.n_layers - 1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(gd[0], atp[0].abs())
    every = P.get_attr_patch_attn_head_all_pos_every(model, corrupted, cache, metric, method="atp*", grad_drop=True)
    torch.testing.assert_close(every[0], gd)
    with pytest.raises(ValueError, match="method"):
        P.get_attr_patch_attn_head_out_all_pos(model, corrupted, cache, metric, method="atp+")
    assert no_hooks(model)
