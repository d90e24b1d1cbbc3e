"""From patching to circuits: AtP* (QK fix, GradDrop) against exact activation patching."""

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer
from transformer_hooks.interventions import patching as P

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
    top = torch.stack(
        [patterns[f"blocks.{layer}.attn.hook_pattern"].amax(-1).mean() for layer in range(model.cfg.n_layers)]
    )
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


@pytest.mark.parametrize("which", ["k", "q"])
def test_atp_star_all_position_estimate_is_the_exact_pattern_change_times_the_gradient(models, which):
    """One key head (shared by a group of query heads) or one query head patched at every
    position at once: the QK fix is sum over the heads it feeds of (A' - A) . dmetric/dA,
    with A' the exact softmax of the patched scores (brute force: the real patched run)."""
    model = models("llama-gqa")
    assert model.cfg.group_size > 1
    clean, corrupted = pair(3)
    _, cache = model.run_with_cache(clean)
    star = getattr(P, f"get_attr_patch_attn_head_{which}_all_pos")(model, corrupted, cache, metric, method="atp*")
    n_heads = model.cfg.n_kv_heads if which == "k" else model.cfg.n_heads
    assert star.shape == (model.cfg.n_layers, n_heads)
    for layer in range(model.cfg.n_layers):
        site, pattern = f"blocks.{layer}.attn.hook_{which}", f"blocks.{layer}.attn.hook_pattern"
        kept: dict = {}

        def keep(x, hook, kept=kept):
            kept["A"] = x.detach().requires_grad_(True)
            return kept["A"]

        with model.hooks(fwd_hooks=[(pattern, keep)]):
            value = metric(model(corrupted))
        (g,) = torch.autograd.grad(value, kept["A"])
        for head in range(n_heads):

            def patch(x, hook, head=head, clean=cache[site]):
                x = x.clone()
                x[:, :, head] = clean[:, :, head]  # every position at once
                return x

            with model.hooks(fwd_hooks=[(site, patch)]):
                _, patched = model.run_with_cache(corrupted, names_filter=pattern)
            moved = patched[pattern] - kept["A"].detach()  # [batch, head, q, k]; only this head's group moves
            fed = range(head * model.cfg.group_size, (head + 1) * model.cfg.group_size) if which == "k" else [head]
            assert moved[:, [h for h in range(model.cfg.n_heads) if h not in fed]].abs().max() == 0
            expected = (moved.double() * g.double()).sum()
            torch.testing.assert_close(star[layer, head].double(), expected, atol=1e-5, rtol=1e-5)
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


# Edges, circuits, path patching ------------------------------------------------------------
from transformer_hooks.analysis import circuits as C  # noqa: E402


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "pythia"])
def test_eap_scores_decompose_and_full_and_empty_circuits_are_the_two_runs(models, name):
    model = models(name)
    clean, corrupted = pair(3)
    graph = C.attribute_edges(model, clean, corrupted, metric, method="EAP")
    cfg = model.cfg
    n_q = cfg.n_layers * cfg.n_heads
    n_senders = 1 + cfg.n_layers * (cfg.n_heads + 1)
    assert len({(e.sender, e.receiver) for e in graph.edges}) == len(graph.edges)
    # Every sender feeds the logits; the EAP scores into it add up to the whole change of the
    # final residual times the gradient there (the residual stream is the sum of the senders).
    into_logits = [e for e in graph.edges if e.receiver == "logits"]
    assert len(into_logits) == n_senders
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    kept = {}

    def keep(x, hook):
        x = x.detach().requires_grad_(True)
        kept["x"] = x
        return x

    with model.hooks(fwd_hooks=[(final, keep)]):
        (g,) = torch.autograd.grad(metric(model(clean)), kept["x"])
    _, c1 = model.run_with_cache(clean, names_filter=final)
    _, c2 = model.run_with_cache(corrupted, names_filter=final)
    whole = ((c2[final] - c1[final]) * g).sum()
    torch.testing.assert_close(torch.tensor(sum(e.score for e in into_logits)), whole, atol=1e-3, rtol=1e-4)
    assert any(e.receiver.endswith("<k>") for e in graph.edges) and n_q > 0

    every = C.make_circuit(graph, [(e.sender, e.receiver) for e in graph.edges])
    nothing = C.make_circuit(graph, [])
    with torch.no_grad():
        torch.testing.assert_close(C.run_circuit(model, clean, corrupted, every), model(clean), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            C.run_circuit(model, clean, corrupted, nothing), model(corrupted), atol=1e-4, rtol=1e-4
        )
    report = C.evaluate_circuit(model, clean, corrupted, C.prune(graph, len(graph.edges)), metric)
    assert abs(report["faithfulness"] - 1) < 1e-3
    assert no_hooks(model)


def test_eap_ig_one_step_is_eap_and_more_steps_differ(models):
    model = models("llama-gqa")
    clean, corrupted = pair(4)
    eap = {(e.sender, e.receiver): e.score for e in C.attribute_edges(model, clean, corrupted, metric, "EAP").edges}
    ig1 = {
        (e.sender, e.receiver): e.score for e in C.attribute_edges(model, clean, corrupted, metric, "EAP-IG", 1).edges
    }
    assert eap.keys() == ig1.keys()
    torch.testing.assert_close(torch.tensor(list(ig1.values())), torch.tensor([eap[k] for k in ig1]))
    ig = C.attribute_edges(model, clean, corrupted, metric, "EAP-IG", ig_steps=4)
    top = C.prune(ig, 20)
    assert len(top.edges) == 20
    report = C.evaluate_circuit(model, clean, corrupted, top, metric)
    assert set(report) >= {"clean", "corrupted", "circuit", "faithfulness"}
    assert no_hooks(model)


def test_bad_circuits_name_the_node(models):
    model = models("llama-gqa")
    clean, corrupted = pair(5)
    graph = C.Graph(model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads)
    with pytest.raises(ValueError, match=r"'a7\.h0'"):
        C.make_circuit(graph, [("a7.h0", "logits")])
    with pytest.raises(ValueError, match=r"a1\.h5<k>"):
        C.make_circuit(graph, [("input", "a1.h5<k>")])  # 2 kv heads
    with pytest.raises(ValueError, match="m9"):
        C.run_circuit(model, clean, corrupted, C.Circuit(graph, {("m9", "logits")}))
    assert no_hooks(model)


def test_path_patching(models):
    model = models("gpt2")
    clean, corrupted = pair(6)
    with torch.no_grad():
        m_clean = metric(model(clean))
    # Receivers before their senders, or senders whose corrupted output is the clean one: no effect.
    same = C.path_patch(model, clean, clean, [(0, 1)], [(1, 2)], metric)
    torch.testing.assert_close(same, m_clean, atol=1e-5, rtol=0)
    later = C.path_patch(model, clean, corrupted, [(1, 0)], [(0, 2), (1, 3)], metric)
    torch.testing.assert_close(later, m_clean, atol=1e-5, rtol=0)
    effects = torch.stack(
        [C.path_patch(model, clean, corrupted, [(0, h)], [(1, r)], metric) for h in range(4) for r in range(4)]
    )
    assert (effects - m_clean).abs().max() > 1e-3
    # Only q: the sum over q, k, v differs from q alone somewhere.
    q_only = C.path_patch(model, clean, corrupted, [(0, 0), (0, 1)], [(1, 0)], metric, receiver_input="q")
    assert q_only.shape == ()
    with pytest.raises(IndexError, match="sender head=9"):
        C.path_patch(model, clean, corrupted, [(0, 9)], [(1, 0)], metric)
    assert no_hooks(model)


def test_plot_circuit(models):
    import matplotlib

    matplotlib.use("Agg")
    model = models("gpt2")
    clean, corrupted = pair(7)
    graph = C.attribute_edges(model, clean, corrupted, metric, "EAP")
    ax = C.plot_circuit(C.prune(graph, 10))
    assert len(ax.texts) >= 2
