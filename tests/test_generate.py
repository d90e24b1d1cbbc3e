"""generate(): greedy output equals Hugging Face's, padded batches equal rows alone, the
KV cache changes nothing but speed, hooks fire at every step and never stay attached."""

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks.generate import sample_logits
from transformer_hooks.progress import set_progress

FAMILIES = ["gpt2", "gpt-neo-local", "pythia", "neox-sequential-full-rotary", "llama-gqa", "llama3-rope-scaling"]
NEW = 12


@pytest.fixture(scope="module")
def loaded(hooked_model, hf_checkpoint):
    """name -> (our model, HF model), each loaded once per session."""
    return lambda name: (hooked_model(name), hf_checkpoint(name)[1])


def prompt(batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, tokens, new=NEW, **kwargs):
    kwargs = {"eos_token_id": None, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return hf.generate(tokens, do_sample=False, max_new_tokens=new, **kwargs)


def greedy(model, tokens, new=NEW, **kwargs):
    kwargs = {"stop_at_eos": False, **kwargs}
    return model.generate(tokens, max_new_tokens=new, do_sample=False, verbose=False, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_hf_with_and_without_kv_cache(loaded, name):
    model, hf = loaded(name)
    tokens = prompt(4)
    ref = hf_greedy(hf, tokens)
    assert ref[:, tokens.shape[1] :].unique().numel() > 3, "degenerate continuation: the test would prove little"
    torch.testing.assert_close(greedy(model, tokens), ref, atol=0, rtol=0)
    torch.testing.assert_close(greedy(model, tokens, use_past_kv_cache=False), ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo-local", "pythia", "llama-gqa"])
def test_left_padded_batch_equals_each_row_alone(loaded, name):
    model, hf = loaded(name)
    tokens = prompt(3, 8, seed=1)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :6] = 0
    batch_out = greedy(model, tokens, attention_mask=mask)
    torch.testing.assert_close(batch_out, hf_greedy(hf, tokens, attention_mask=mask), atol=0, rtol=0)
    for row in range(3):
        alone = greedy(model, tokens[row : row + 1, int((mask[row] == 0).sum()) :])
        torch.testing.assert_close(batch_out[row, -NEW:], alone[0, -NEW:], atol=0, rtol=0)


def test_right_padding_is_moved_to_the_left(loaded):
    model, _ = loaded("llama-gqa")
    tokens = prompt(2, 8, seed=2)
    right_mask = torch.ones_like(tokens)
    right_mask[1, 5:] = 0
    out = greedy(model, tokens, attention_mask=right_mask)
    alone = greedy(model, tokens[1:, :5])
    torch.testing.assert_close(out[1, -NEW:], alone[0, -NEW:], atol=0, rtol=0)
    torch.testing.assert_close(out[1, 3:8], tokens[1, :5], atol=0, rtol=0)  # the prompt, now left-padded


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_rows_that_reach_eos_keep_emitting_it_like_hf(loaded, name):
    model, hf = loaded(name)
    tokens = prompt(3, 6, seed=3)
    free = greedy(model, tokens)
    eos = int(free[0, tokens.shape[1] + 2])  # a token row 0 emits at its third step
    ref = hf_greedy(hf, tokens, eos_token_id=eos, pad_token_id=eos)
    out = greedy(model, tokens, stop_at_eos=True, eos_token_id=eos)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    first = (out[0, tokens.shape[1] :] == eos).nonzero()[0, 0]
    assert (out[0, tokens.shape[1] + first :] == eos).all()


def test_steering_hook_fires_every_step_and_changes_the_continuation(loaded):
    model, _ = loaded("pythia")
    tokens = prompt(2, 7, seed=4)
    direction = 4.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen_positions = []

    def steer(resid, hook):
        seen_positions.append(resid.shape[1])
        return resid + direction

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", steer)]):
        steered = greedy(model, tokens)
        n_calls = len(seen_positions)
        steered_no_cache = greedy(model, tokens, use_past_kv_cache=False)
    assert seen_positions[:n_calls] == [6] + [1] * NEW  # prefill of the prompt, then one token per step
    assert not (steered == greedy(model, tokens)).all()
    torch.testing.assert_close(steered, steered_no_cache, atol=0, rtol=0)


def test_exception_in_a_hook_during_generate_leaves_no_hook(loaded):
    model, _ = loaded("llama-gqa")
    tokens = prompt()
    before = greedy(model, tokens)
    calls = []

    def fails_at_step_three(act, hook):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", fails_at_step_three)]):
            greedy(model, tokens)
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(greedy(model, tokens), before, atol=0, rtol=0)


def test_sampling_respects_top_k_top_p_and_freq_penalty():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=gen) * 3
    torch.manual_seed(0)
    assert torch.equal(sample_logits(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        assert (sample_logits(logits, top_k=3)[:, None] == top3).any(-1).all()
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    n_needed = (sorted_probs.cumsum(-1) < 0.6).sum(-1) + 1  # smallest prefix with mass >= 0.6
    sampled = sample_logits(logits, top_p=0.6)
    rank = (order == sampled[:, None]).float().argmax(-1)
    assert (rank < n_needed).all()
    counts = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    penalised = sample_logits(logits, temperature=1e-3, freq_penalty=1e4, token_counts=counts)
    assert (penalised != logits.argmax(-1)).all()  # a token used before is not picked under a large penalty


def test_freq_penalty_in_generate_never_repeats_a_token(loaded):
    model, _ = loaded("gpt2")
    tokens = prompt(2, 5, seed=5)
    torch.manual_seed(0)
    out = model.generate(tokens, max_new_tokens=20, freq_penalty=1e4, stop_at_eos=False, verbose=False)
    for row in out:
        assert row.unique().numel() == row.numel(), row


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, _ = loaded("llama-gqa")
    tokens = prompt()
    torch.manual_seed(7)
    a = model.generate(tokens, max_new_tokens=8, stop_at_eos=False, verbose=False, top_p=0.9)
    torch.manual_seed(7)
    b = model.generate(tokens, max_new_tokens=8, stop_at_eos=False, verbose=False, top_p=0.9)
    assert torch.equal(a, b)


def test_text_in_text_out_on_the_real_model(embedded_model, capsys):
    model = embedded_model
    prompts = ["The capital of France is", "Two plus two equals"]
    set_progress(True)  # bars are off where stderr is not a terminal, as under pytest's capture
    try:
        batch = model.generate(prompts, max_new_tokens=3, do_sample=False, verbose=True)
    finally:
        set_progress(None)
    assert "generate" in capsys.readouterr().err  # the progress bar
    assert " Paris" in batch[0]
    first = model.generate(prompts[0], max_new_tokens=3, do_sample=False, verbose=False)
    assert isinstance(first, str) and first == batch[0]
    second = model.generate(prompts[1], max_new_tokens=3, do_sample=False, verbose=False, return_type="tokens")
    prompt_tokens = model.to_tokens(prompts[1])
    n = prompt_tokens.shape[1]
    assert torch.equal(second[:, :n], prompt_tokens) and second.shape[1] > n
    assert batch[1] == prompts[1] + model.to_string(second[0, n:])


def test_bad_arguments_name_the_fix(loaded):
    model, _ = loaded("gpt2")
    with pytest.raises(ValueError, match="return_type"):
        model.generate(prompt(), return_type="logits", verbose=False)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(torch.zeros(1, 5), top_p=1.5)


def test_kv_cache_owns_its_bookkeeping_and_chunks_equal_one_forward(loaded):
    """A left-padded prompt run through the cache in two chunks gives the logits of one
    forward; the cache advances ``length`` by every column and each row's next position by
    its real tokens only. generate.py reaches no private helper of the model."""
    import inspect

    from transformer_hooks import generate as generate_module
    from transformer_hooks.components import KVCache

    model, _ = loaded("llama-gqa")
    tokens = prompt(2, 7)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # row 1 is left-padded by 3
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        cache = KVCache(model.cfg, 2, 7, model.device, model.dtype)
        model(tokens[:, :4], attention_mask=mask[:, :4], past_kv_cache=cache, return_type=None)
        assert cache.length == 4 and cache.next_position.tolist() == [4, 1]
        last = model(tokens[:, 4:], attention_mask=mask[:, 4:], past_kv_cache=cache)
    assert cache.length == 7 and cache.next_position.tolist() == [7, 4]
    torch.testing.assert_close(last, full[:, 4:], atol=1e-4, rtol=1e-4)
    assert "model._" not in inspect.getsource(generate_module)
