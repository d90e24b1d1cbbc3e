"""TransformerLens methods that ported code calls. On the model: ``process_weights_`` (equal
to loading processed), the ``set_use_*`` switches (which decide only what the default cache
holds), ``all_head_labels``, ``loss_fn``, the ``QK``/``OV`` circuits, ``mod_dict``,
``W_E_pos``, ``set_tokenizer``, ``cfg.device``. On the cache: ``toggle_autodiff``. In utils:
``test_prompt``, ``to_numpy``."""

import pytest
import torch
from checkpoints import CONFIGS, VOCAB
from tokenizers_util import tiny_tokenizer

from transformer_hooks import HookedTransformer

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gpt2(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")
    return HookedTransformer.from_pretrained_no_processing(str(path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_process_weights_in_place_equals_loading_processed(hf_checkpoint, name):
    path, _ = hf_checkpoint(name)
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    loaded = HookedTransformer.from_pretrained(str(path))

    assert model.process_weights_() is model
    assert model.cfg == loaded.cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert model.hook_dict.keys() == loaded.hook_dict.keys()
    assert all(model.hook_dict[n].name == n for n in model.hook_dict)
    tied = loaded.unembed.W_U.untyped_storage().data_ptr() == loaded.embed.W_E.untyped_storage().data_ptr()
    assert tied == (model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr())

    logits, cache = model.run_with_cache(TOKENS)  # the new hook points are wired in
    torch.testing.assert_close(logits, loaded(TOKENS), atol=1e-5, rtol=0)
    assert "blocks.1.hook_resid_post" in cache


def test_process_weights_twice_and_by_step(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    before = model(TOKENS).log_softmax(-1)
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    assert model.cfg.processing == ("fold_ln",)
    model.process_weights_()  # the rest, skipping fold_ln
    assert model.cfg.processing == ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    params = {n: p for n, p in model.named_parameters()}
    model.process_weights_()  # nothing left: the same tensors
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(TOKENS).log_softmax(-1), before, atol=1e-4, rtol=0)


def test_process_weights_keeps_frozen_parameters_frozen(hf_checkpoint):
    path, _ = hf_checkpoint("pythia")
    model = HookedTransformer.from_pretrained_no_processing(str(path)).requires_grad_(False)
    model.process_weights_()
    assert not any(p.requires_grad for p in model.parameters())


def test_process_weights_refuses_with_hooks_attached_and_leaves_the_model(gpt2):
    model = gpt2
    model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: None)
    params = dict(model.named_parameters())
    try:
        with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*reset_hooks"):
            model.process_weights_()
        assert dict(model.named_parameters()) == params
        assert model.cfg.processing == ()
        with pytest.raises(NotImplementedError, match="refactor_factored_attn_matrices"):
            model.process_weights_(refactor_factored_attn_matrices=True)
    finally:
        model.reset_hooks()


SWITCHES = {
    "set_use_attn_result": ["attn.hook_result"],
    "set_use_split_qkv_input": ["hook_q_input", "hook_k_input", "hook_v_input"],
    "set_use_attn_in": ["hook_attn_in"],
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_set_use_switches_decide_what_the_default_cache_holds(gpt2, switch):
    def sites(cache):
        return {k for k in cache.keys() if k.endswith(tuple(SWITCHES[switch]))}

    expected = {f"blocks.{layer}.{suffix}" for layer in range(gpt2.cfg.n_layers) for suffix in SWITCHES[switch]}
    logits_off, off = gpt2.run_with_cache(TOKENS)
    assert sites(off) == set()
    getattr(gpt2, switch)(True)
    try:
        logits_on, on = gpt2.run_with_cache(TOKENS)
        assert sites(on) == expected
        assert set(on.keys()) - expected == set(off.keys())  # nothing else changes
        torch.testing.assert_close(logits_on, logits_off, atol=1e-5, rtol=0)  # head-by-head sum order
        named = gpt2.run_with_cache(TOKENS, names_filter=sorted(expected))[1]  # fused attention: 1e-6 apart
        for name in expected:
            torch.testing.assert_close(on[name], named[name], atol=1e-5, rtol=0)
    finally:
        getattr(gpt2, switch)(False)
    assert sites(gpt2.run_with_cache(TOKENS)[1]) == set()


def test_cached_head_results_sum_to_the_attention_output(gpt2):
    gpt2.set_use_attn_result(True)
    try:
        _, cache = gpt2.run_with_cache(TOKENS)
    finally:
        gpt2.set_use_attn_result(False)
    for layer in range(gpt2.cfg.n_layers):
        summed = cache["result", layer].sum(-2) + gpt2.blocks[layer].attn.b_O
        torch.testing.assert_close(summed, cache["attn_out", layer], atol=1e-5, rtol=0)


def test_set_use_hook_mlp_in_decides_whether_the_default_cache_holds_mlp_in(gpt2):
    """As TransformerLens: hook_mlp_in is left out until set_use_hook_mlp_in(True)."""
    assert "blocks.0.hook_mlp_in" not in gpt2.run_with_cache(TOKENS)[1]
    gpt2.set_use_hook_mlp_in(True)
    try:
        _, cache = gpt2.run_with_cache(TOKENS)
        assert "blocks.0.hook_mlp_in" in cache
    finally:
        gpt2.set_use_hook_mlp_in(False)
    assert "blocks.0.hook_mlp_in" in gpt2.run_with_cache(TOKENS, names_filter="blocks.0.hook_mlp_in")[1]


def test_all_head_labels_match_the_stacked_head_results(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    _, labels = cache.stack_head_results(return_labels=True)
    assert gpt2.all_head_labels() == labels
    assert len(labels) == gpt2.cfg.n_layers * gpt2.cfg.n_heads


def test_loss_fn_equals_the_forward_loss(gpt2):
    logits = gpt2(TOKENS)
    torch.testing.assert_close(gpt2.loss_fn(logits, TOKENS), gpt2(TOKENS, return_type="loss"), atol=1e-6, rtol=0)
    per_token = gpt2.loss_fn(logits, TOKENS, per_token=True)
    assert per_token.shape == (2, TOKENS.shape[1] - 1)
    torch.testing.assert_close(per_token.mean(), gpt2.loss_fn(logits, TOKENS), atol=1e-6, rtol=0)


def test_W_E_pos_stacks_token_and_position_embeddings(gpt2):
    assert gpt2.W_E_pos.shape == (gpt2.cfg.d_vocab + gpt2.cfg.n_ctx, gpt2.cfg.d_model)
    torch.testing.assert_close(gpt2.W_E_pos[: gpt2.cfg.d_vocab], gpt2.W_E, atol=0, rtol=0)
    torch.testing.assert_close(gpt2.W_E_pos[gpt2.cfg.d_vocab :], gpt2.W_pos, atol=0, rtol=0)


def test_set_tokenizer_sets_the_padding_side(gpt2):
    old = gpt2.tokenizer
    try:
        gpt2.set_tokenizer(tiny_tokenizer(VOCAB), default_padding_side="left")
        tokens, mask = gpt2.to_tokens_and_mask(["The capital of", "The"], prepend_bos=False)
        assert mask[1].tolist()[-1] == 1 and mask[1].tolist()[0] == 0  # padded on the left
        with pytest.raises(ValueError, match="'left' or 'right'"):
            gpt2.set_tokenizer(tiny_tokenizer(VOCAB), default_padding_side="middle")
    finally:
        gpt2.tokenizer = old


def test_cache_toggle_autodiff_switches_torch_autograd(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        assert not gpt2(TOKENS).requires_grad
        cache.toggle_autodiff(True)
        assert torch.is_grad_enabled()
        assert gpt2(TOKENS).requires_grad
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_QK_and_OV_circuits_reproduce_scores_and_head_outputs(hf_checkpoint, name):
    """QK[l, h] gives the head's scores from its (normalised) input and OV[l, h] its
    output from the pattern, for MHA and for grouped key/value heads."""
    path, _ = hf_checkpoint(name)
    model = HookedTransformer.from_pretrained(str(path))  # processed: no query/key biases to add
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(TOKENS)
    layer, head = 1, model.cfg.n_heads - 1
    assert (
        model.QK.shape
        == model.OV.shape
        == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    )
    x = cache["normalized", layer, "ln1"]  # [batch, pos, d_model]
    if model.cfg.positional_embedding == "learned":
        q_part = x @ model.QK[layer, head].A + model.b_Q[layer, head]
        k_part = x @ model.QK[layer, head].B.T + model.b_K_per_query_head[layer, head]
        scores = q_part @ k_part.transpose(-1, -2) * model.cfg.scores_scale
        causal = torch.ones(TOKENS.shape[1], TOKENS.shape[1], dtype=torch.bool).tril()
        torch.testing.assert_close(
            scores[:, causal], cache["attn_scores", layer][:, head][:, causal], atol=1e-4, rtol=0
        )
    values = x @ model.OV[layer, head].A + model.b_V_per_query_head[layer, head]  # [batch, pos, d_head]
    written = cache["pattern", layer][:, head] @ values @ model.W_O[layer, head]
    torch.testing.assert_close(written, cache["result", layer][:, :, head], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.OV[layer, head].AB, model.W_V_per_query_head[layer, head] @ model.W_O[layer, head])


def test_test_prompt_ranks_each_answer_token_where_it_is_predicted(embedded_model, capsys):
    from transformer_hooks import utils  # as a module: pytest would collect a bare test_prompt

    model, prompt = embedded_model, "The capital of France is"
    ranks = utils.test_prompt(prompt, [" Paris", "the city of Paris"], model, top_k=3)
    printed = capsys.readouterr().out

    prompt_tokens = model.to_tokens(prompt)[0]
    for answer, answer_ranks in zip([" Paris", " the city of Paris"], ranks, strict=True):
        answer_tokens = model.to_tokens(answer, prepend_bos=False)[0]
        logits = model(torch.cat([prompt_tokens, answer_tokens])[None])[0]
        expected = []
        for i, token in enumerate(answer_tokens.tolist()):
            predicted = logits[len(prompt_tokens) - 1 + i]
            expected.append((model.to_string([token]), int((predicted > predicted[token]).sum())))
            top = model.to_string([int(predicted.argmax())])
            assert f"Top 0th token. Logit: {predicted.max():5.2f}" in printed and f"Token: |{top}|" in printed
        assert answer_ranks == expected
        assert f"Ranks of the answer tokens: {expected}" in printed
    assert len(ranks[1]) > 1  # a multi-token answer is scored token by token
    assert "Tokenized prompt: " + str(model.to_str_tokens(prompt_tokens)) in printed


def test_to_numpy_and_mod_dict(gpt2):
    from transformer_hooks.utils import to_numpy

    x = torch.randn(3, 4, requires_grad=True)
    assert (to_numpy(x) == x.detach().numpy()).all()
    assert to_numpy([1, 2]).tolist() == [1, 2]
    assert gpt2.mod_dict["blocks.0.attn"] is gpt2.blocks[0].attn
    assert set(gpt2.hook_dict) <= set(gpt2.mod_dict)


def test_cfg_device_follows_the_model(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    assert model.cfg.device == "cpu"
    assert "device" not in model.cfg.to_dict()  # not saved with a converted checkpoint
    model.to("meta")
    assert model.cfg.device == "meta"
    assert model.cfg == model.cfg.replace(device="cpu")  # not an architecture fact
