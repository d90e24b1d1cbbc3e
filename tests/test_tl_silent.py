"""TransformerLens code must give the numbers it gave there: the silent differences of issue 12.

1. a hook owns its tensor (in-place edit == returned edit, other sites untouched);
7. hooks of run_with_hooks / run_with_cache / hooks() belong to the calling thread.
"""

import threading

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer, sites

FAMILIES = ["gpt2", "pythia", "llama-gqa", "gemma2", "olmo2"]  # learned/rotary, parallel, GQA, both/post norms


@pytest.fixture(scope="module")
def models(hf_checkpoint, one_thread):
    made: dict = {}

    def get(name: str) -> HookedTransformer:
        if name not in made:
            made[name] = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint(name)[0]))
        return made[name]

    return get


def tokens(batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


# 1. A hook owns its tensor ----------------------------------------------------------------------
def in_place(act, hook):
    act.mul_(1.5)  # returns None: the edit is made in place


def returned(act, hook):
    return act * 1.5


@pytest.mark.parametrize("family", FAMILIES)
def test_in_place_edit_equals_returned_edit_at_every_site(models, family):
    """At every site, an in-place edit changes the logits and every cached site exactly as
    returning the edited tensor does (bit for bit): no other site sees the edit, whether the
    per-head expansions are observed or not."""
    model = models(family)
    assert model.cfg.parallel_residual == (family == "pythia")
    toks = tokens()
    everything = list(model.hook_dict)
    unexpanded = [n for n in everything if not sites.is_per_head_expansion(n)]
    failures = []
    for cached in (unexpanded, everything):
        for site in cached:

            def run(edit, site=site, cached=cached):
                with model.hooks(fwd_hooks=[(site, edit)]):
                    return model.run_with_cache(toks, names_filter=cached)

            logits_a, cache_a = run(in_place)
            logits_b, cache_b = run(returned)
            if not torch.equal(logits_a, logits_b):
                failures.append((site, "logits"))
            failures += [(site, name) for name in cached if not torch.equal(cache_a[name], cache_b[name])]
    assert not failures, f"in-place edits differ from returned ones at (edited site, differing site): {failures[:8]}"


def test_in_place_edit_of_mlp_in_leaves_the_skip_connection(models):
    """The case found by porting: editing hook_mlp_in in place also edited resid_mid."""
    model = models("gpt2")
    toks = tokens()
    _, clean = model.run_with_cache(toks, names_filter="blocks.0.hook_resid_mid")

    def zero(act, hook):
        act.zero_()

    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", zero)]):
        _, cache = model.run_with_cache(toks, names_filter=["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_in"])
    assert torch.equal(cache["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_mid"])
    assert bool((cache["blocks.0.hook_mlp_in"] == 0).all())


# 7. Threads ---------------------------------------------------------------------------------------
def test_threads_each_see_only_their_own_hooks(models):
    """Threads running the same model at once with different temporary hooks (run_with_hooks,
    run_with_cache, hooks()) each get exactly their single-threaded result; a permanent hook
    (add_hook) is seen by all of them."""
    model = models("llama-gqa")
    toks = tokens()
    n_threads, iterations = 4, 25

    def shift(k):
        def hook(act, hook):
            return act + k

        return hook

    def work(k):
        """Thread k's three kinds of call; k > 0 edits, and observes a different site set."""
        site = f"blocks.{k % 2}.hook_resid_pre"
        a = model.run_with_hooks(toks, fwd_hooks=[(site, shift(k))])
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern") == bool(k % 2))
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda act, hook: act * 0 + k)]):
            b = model(toks)
        return a, {n: v for n, v in cache.items()}, b

    def check(got, want):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert got[1].keys() == want[1].keys()
        assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])

    def scenario(permanent=()):
        expected = {k: work(k) for k in range(n_threads)}
        errors: list = []

        def loop(k):
            try:
                for _ in range(iterations):
                    check(work(k), expected[k])
            except Exception as e:  # noqa: BLE001  (reported below, with the thread)
                errors.append((k, repr(e)[:300]))

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [n for n, hp in model.hook_dict.items() if hp.observed] == list(permanent)

    scenario()
    model.add_hook("blocks.0.hook_mlp_out", lambda act, hook: act * 0.5)  # model-wide: every thread
    try:
        with_permanent = model(toks)
        scenario(["blocks.0.hook_mlp_out"])
        assert torch.equal(model(toks), with_permanent)
        seen = []
        t = threading.Thread(target=lambda: seen.append(model(toks)))
        t.start()
        t.join()
        assert torch.equal(seen[0], with_permanent)
    finally:
        model.reset_hooks(including_permanent=True)
    assert not torch.equal(model(toks), with_permanent)


def test_a_scoped_hook_is_invisible_to_another_thread(models):
    model = models("gpt2")
    toks = tokens()
    clean = model(toks)
    inside, seen_inside = threading.Event(), threading.Event()
    other: list = []

    def other_thread():
        inside.wait()
        other.append((model(toks), model.hook_dict["blocks.0.hook_resid_pre"].observed))
        seen_inside.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act * 0)]):
        assert model.hook_dict["blocks.0.hook_resid_pre"].observed
        inside.set()
        seen_inside.wait()
        assert not torch.equal(model(toks), clean)
    t.join()
    assert torch.equal(other[0][0], clean) and other[0][1] is False


# 5. The explicit attention path in TransformerLens's order -----------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt2-untied-inverse-layer"])
def test_main_demo_pattern_from_q_and_k_equals_the_cached_pattern(models, family):
    """TransformerLens's Main Demo recomputes layer 0's pattern from the cached q and k and
    checks torch.equal with cache["pattern", 0]."""
    model = models(family)
    _, cache = model.run_with_cache(tokens(batch=1, pos=9), remove_batch_dim=True)
    for layer in range(model.cfg.n_layers):
        q, k = cache["q", layer], cache["k", layer]
        seq_len = q.shape[0]
        scores = torch.einsum("qnh,knh->nqk", q, k)  # "seqQ n h, seqK n h -> n seqQ seqK"
        mask = torch.triu(torch.ones((seq_len, seq_len), dtype=torch.bool), diagonal=1)
        scores.masked_fill_(mask, -1e9)
        attn_scale = model.cfg.d_head**0.5 * (layer + 1 if model.cfg.scale_attn_by_inverse_layer_idx else 1)
        pattern = (scores / attn_scale).softmax(-1)
        assert torch.equal(pattern, cache["pattern", layer])


# 6. Per-head sites and broad filters ---------------------------------------------------------------
def test_a_broad_callable_filter_keeps_transformer_lens_shapes(models):
    """``lambda name: "_input" not in name`` (TransformerLens code) must not observe hook_attn_in,
    which would switch ln1 to per-head shapes; a callable selects the switched sites only once
    their set_use_* switch is on, and a name always selects them."""
    model = models("llama-gqa")
    b, p, d = 2, 7, model.cfg.d_model
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: "_input" not in name)
    assert tuple(cache["blocks.0.ln1.hook_scale"].shape) == (b, p, 1)
    assert tuple(cache["blocks.0.ln1.hook_normalized"].shape) == (b, p, d)
    switched = ("hook_attn_in", "hook_mlp_in", "attn.hook_result")
    assert not [n for n in cache.keys() if n.endswith(switched)]
    seen = []
    model.run_with_hooks(tokens(), fwd_hooks=[(lambda n: n.endswith("hook_attn_in"), lambda a, hook: seen.append(1))])
    assert seen == []
    model.set_use_attn_in(True)
    model.set_use_hook_mlp_in(True)
    try:
        _, cache = model.run_with_cache(tokens(), names_filter=lambda name: "_input" not in name)
        assert tuple(cache["blocks.0.hook_attn_in"].shape) == (b, p, model.cfg.n_heads, d)
        assert "blocks.0.hook_mlp_in" in cache and "blocks.0.attn.hook_result" not in cache
    finally:
        model.set_use_attn_in(False)
        model.set_use_hook_mlp_in(False)
    _, named = model.run_with_cache(tokens(), names_filter=["blocks.0.hook_attn_in", "blocks.1.attn.hook_result"])
    assert set(named.keys()) == {"blocks.0.hook_attn_in", "blocks.1.attn.hook_result"}


# 2. Left-padded token batches without attention_mask ----------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_left_padded_tokens_without_a_mask_are_masked_as_transformer_lens_does(hf_checkpoint, family):
    """TransformerLens 3.9 (HookedTransformer.forward, utils.get_attention_mask): token ids
    from a left-padding tokenizer have their leading pads masked; a BOS equal to the pad token
    stays real; a right-padding tokenizer infers no mask."""
    from tokenizers_util import tiny_tokenizer

    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint(family)[0]))
    texts = ["The capital of France is Paris", "The capital", "Mary"]
    for pad_token in ("</s>", "<s>"):  # the second: BOS is the pad token
        tok = tiny_tokenizer(VOCAB)
        tok.pad_token = pad_token
        model.set_tokenizer(tok, default_padding_side="left")
        toks, mask = model.to_tokens_and_mask(texts)
        assert not bool(mask.all()) and bool((toks[:, 0] == tok.pad_token_id).any())
        assert torch.equal(model(toks), model(toks, attention_mask=mask))
        assert torch.equal(model(toks), model(texts))
        for i, text in enumerate(texts):
            alone = model(text)[0]
            torch.testing.assert_close(model(toks)[i, -alone.shape[0] :], alone, atol=1e-5, rtol=0)
        if pad_token == "<s>":  # without prepend_bos, TransformerLens treats the BOS as padding too
            no_bos = mask.clone()
            no_bos[torch.arange(len(texts)), (mask == 0).sum(-1)] = 0
            assert torch.equal(model(toks, prepend_bos=False), model(toks, attention_mask=no_bos))
    tok.padding_side = "right"
    left_padded = model.to_tokens(texts, padding_side="left")
    assert torch.equal(model(left_padded), model(left_padded, attention_mask=torch.ones_like(left_padded)))


# 4. Positions ------------------------------------------------------------------------------------
def test_a_pos_slice_list_past_the_sequence_raises(models):
    from transformer_hooks.utils import IndexOutOfRangeError

    model = models("gpt2")
    _, cache = model.run_with_cache(tokens(pos=5))
    with pytest.raises(IndexOutOfRangeError, match="position/index=5 is out of range"):
        model.run_with_cache(tokens(pos=5), pos_slice=[0, 5])
    with pytest.raises(IndexOutOfRangeError, match="position/index=-6"):
        cache.accumulated_resid(pos_slice=[-6])
    kept = model.run_with_cache(tokens(pos=5), pos_slice=[0, -1])[1]
    assert torch.equal(kept["resid_post", 1], cache["resid_post", 1][:, [0, 4]])


def test_logit_lens_at_the_last_position_reads_each_rows_last_real_token(hf_checkpoint):
    from tokenizers_util import tiny_tokenizer

    from transformer_hooks.analysis.lens import logit_lens

    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint("llama-gqa")[0]))
    model.set_tokenizer(tiny_tokenizer(VOCAB), default_padding_side="right")
    model.tokenizer.pad_token = "</s>"
    texts = ["The capital of France is Paris", "Mary"]
    batch = logit_lens(model, texts, pos_slice=-1, progress=False)
    toks, mask = model.to_tokens_and_mask(texts)
    from_tokens = logit_lens(model, toks, pos_slice=-1, progress=False, attention_mask=mask)
    for i, text in enumerate(texts):
        alone = logit_lens(model, text, pos_slice=-1, progress=False)
        torch.testing.assert_close(batch.top_logits[:, i], alone.top_logits[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(from_tokens.top_logits[:, i], alone.top_logits[:, 0], atol=1e-5, rtol=0)


# 3. accumulated_resid(apply_ln=True) recomputes the final norm per row ------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_accumulated_resid_at_the_final_layer_normalises_each_row_itself(models, family):
    """TransformerLens 3.9: accumulated_resid(apply_ln=True) at the final layer puts each row
    through ln_final (recompute_ln); decompose_resid keeps the cached scale, so its rows still
    add up to the final norm's output (minus its bias)."""
    model = models(family)
    _, cache = model.run_with_cache(tokens())
    raw, labels = cache.accumulated_resid(return_labels=True)
    normed = cache.accumulated_resid(apply_ln=True)
    for i in range(len(labels)):
        torch.testing.assert_close(normed[i], model.ln_final(raw[i]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        normed[-1],
        cache["ln_final.hook_normalized"] * (1 if family == "gpt2" else model.ln_final.w),
        atol=1e-5,
        rtol=1e-5,
    )
    cached_scale = cache.apply_ln_to_stack(raw)  # recompute_ln defaults to False, as in TransformerLens
    assert not torch.allclose(cached_scale[0], normed[0], atol=1e-3)
    assert torch.equal(cache.apply_ln_to_stack(raw, recompute_ln=True), normed)
    bias = getattr(model.ln_final, "b", torch.zeros(()))
    parts = cache.decompose_resid(apply_ln=True)
    torch.testing.assert_close(parts.sum(0) + bias, normed[-1], atol=1e-4, rtol=1e-4)
    earlier = cache.accumulated_resid(1, apply_ln=True)  # not the final layer: the cached scale of ln1
    torch.testing.assert_close(
        earlier[-1] + getattr(model.blocks[1].ln1, "b", torch.zeros(())),
        cache["blocks.1.ln1.hook_normalized"] * (1 if family == "gpt2" else model.blocks[1].ln1.w),
        atol=1e-5,
        rtol=1e-5,
    )
