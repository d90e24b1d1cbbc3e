"""Weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases):
each step, and all of them together, leave the log-probs unchanged for every family;
the processed weights have the property each step promises; the model records what
was applied; streaming group by group equals processing the whole state dict at once."""

import pytest
import torch
from checkpoints import CONFIGS, VOCAB, save_checkpoint

from transformer_hooks import HookedTransformer
from transformer_hooks.processing import STEPS, ProcessingOptions, process_group, processed_config

TOL = 1e-4
NO_PROCESSING = {step: False for step in STEPS}


def tokens(n: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


def log_probs(model: HookedTransformer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).log_softmax(-1)


def norms(model: HookedTransformer) -> set[str]:
    mods = [model.ln_final, *(m for block in model.blocks for m in (block.ln1, block.ln2))]
    return {type(m).__name__ for m in mods}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_processed_model_gives_the_same_log_probs(hf_checkpoint, name):
    path, _ = hf_checkpoint(name)
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    processed = HookedTransformer.from_pretrained(str(path))

    torch.testing.assert_close(log_probs(processed), log_probs(plain), atol=TOL, rtol=0)
    layer_norm = plain.cfg.normalization_type == "LN"
    assert norms(plain) == ({"LayerNorm"} if layer_norm else {"RMSNorm"})
    assert norms(processed) == ({"LayerNormPre"} if layer_norm else {"RMSNormPre"})
    assert processed.cfg.normalization_type == ("LNPre" if layer_norm else "RMSPre")
    # center_writing_weights needs every reader to subtract the mean: LayerNorm models only.
    expected = STEPS if layer_norm else tuple(s for s in STEPS if s != "center_writing_weights")
    assert processed.cfg.processing == expected
    assert plain.cfg.processing == ()


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo-untied", "pythia", "llama-head-dim-bias"])
@pytest.mark.parametrize("step", STEPS)
def test_each_step_alone_keeps_log_probs_and_is_recorded(hf_checkpoint, name, step):
    path, _ = hf_checkpoint(name)
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    model = HookedTransformer.from_pretrained(str(path), **{**NO_PROCESSING, step: True})

    torch.testing.assert_close(log_probs(model), log_probs(plain), atol=TOL, rtol=0)
    skipped = step == "center_writing_weights" and plain.cfg.normalization_type == "RMS"
    assert model.cfg.processing == (() if skipped else (step,))
    for block, plain_block in zip(model.blocks, plain.blocks, strict=True):
        assert type(block.ln1).__name__.endswith("Pre") == (step == "fold_ln")
        if step != "fold_ln":  # only fold_ln touches the readers of the residual stream
            torch.testing.assert_close(block.attn.W_Q, plain_block.attn.W_Q, atol=0, rtol=0)


def test_processed_weights_have_the_promised_properties(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2-untied-inverse-layer")
    model = HookedTransformer.from_pretrained(str(path))
    zero = dict(atol=1e-5, rtol=0)
    # fold_ln (LayerNorm): readers of the normalised residual have zero mean over d_model.
    for W in (model.W_Q, model.W_K, model.W_V):  # [layer, head, d_model, d_head]
        torch.testing.assert_close(W.mean(-2), torch.zeros_like(W.mean(-2)), **zero)
    torch.testing.assert_close(model.W_in.mean(-2), torch.zeros_like(model.W_in.mean(-2)), **zero)
    # center_writing_weights: every write into the residual stream has zero mean.
    for W in (model.W_E, model.W_pos, model.W_O, model.W_out, model.b_O, model.b_out):
        torch.testing.assert_close(W.mean(-1), torch.zeros_like(W.mean(-1)), **zero)
    # center_unembed: every residual direction moves the logits by zero in total.
    torch.testing.assert_close(model.W_U.mean(-1), torch.zeros(model.cfg.d_model), **zero)
    torch.testing.assert_close(model.b_U.mean(), torch.tensor(0.0), **zero)
    # fold_value_biases: no value bias left.
    assert not model.b_V.any()


def test_fold_value_biases_with_grouped_query_attention(tmp_path):
    """GQA with biases: each query head's output gets its own kv head's value bias."""
    path, hf = save_checkpoint("llama-gqa", tmp_path, attention_bias=True)
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    model = HookedTransformer.from_pretrained(str(path), **{**NO_PROCESSING, "fold_value_biases": True})
    assert plain.cfg.group_size > 1 and plain.b_V.abs().min() > 0

    # b_O' = b_O + sum_head b_V[head // group_size] · W_O[head], layer by layer
    b_V = plain.b_V.repeat_interleave(plain.cfg.group_size, dim=1)  # [layer, head, d_head]
    expected = plain.b_O + torch.einsum("lhd,lhdm->lm", b_V, plain.W_O)
    torch.testing.assert_close(model.b_O, expected, atol=1e-5, rtol=0)
    assert not model.b_V.any()
    torch.testing.assert_close(log_probs(model), log_probs(plain), atol=TOL, rtol=0)


def test_tied_embeddings_are_shared_only_while_both_sides_are_unprocessed(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")  # tied
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    assert plain.W_U.data_ptr() == plain.W_E.data_ptr(), "an unprocessed tied model keeps one copy"

    only_values = HookedTransformer.from_pretrained(str(path), **{**NO_PROCESSING, "fold_value_biases": True})
    assert only_values.W_U.data_ptr() == only_values.W_E.data_ptr()

    # Centring W_E alone must not centre the unembedding that shared its memory.
    centred = HookedTransformer.from_pretrained(str(path), **{**NO_PROCESSING, "center_writing_weights": True})
    assert centred.W_U.data_ptr() != centred.W_E.data_ptr()
    torch.testing.assert_close(centred.W_U, plain.W_U, atol=0, rtol=0)
    torch.testing.assert_close(log_probs(centred), log_probs(plain), atol=TOL, rtol=0)


def test_streamed_groups_equal_processing_the_whole_state_dict(hf_checkpoint):
    """The loader processes one group at a time; doing all of it at once gives the same weights,
    and the input tensors are never modified."""
    path, _ = hf_checkpoint("pythia")
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    streamed = HookedTransformer.from_pretrained(str(path))

    state = {name: p.detach().clone() for name, p in plain.named_parameters()}
    originals = {name: t.clone() for name, t in state.items()}
    options = ProcessingOptions()
    whole = process_group(plain.cfg, dict(state), options)
    assert all(torch.equal(state[n], originals[n]) for n in state), "process_group modified its input"

    expected = dict(streamed.named_parameters())
    assert set(whole) == set(expected)
    for name, tensor in whole.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert processed_config(plain.cfg, options) == streamed.cfg


def test_processing_an_already_processed_config_applies_only_what_is_missing(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")
    folded = HookedTransformer.from_pretrained(str(path), **{**NO_PROCESSING, "fold_ln": True})
    cfg = processed_config(folded.cfg, ProcessingOptions())
    assert cfg.processing == STEPS
    assert cfg.normalization_type == "LNPre"


@pytest.mark.parametrize("centre", [True, False], ids=["LayerNorm", "RMSNorm"])
def test_the_one_normalisation_formula_matches_torch_and_a_cached_scale(centre):
    """``normalize`` (used by the norms, ``apply_ln_to_stack`` and the logit lens) equals
    torch's layer_norm / rms_norm, and gives the same result from a given scale."""
    import torch.nn.functional as F

    from transformer_hooks.components.norms import normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 48, generator=g) * 3 + 1
    w, b = torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g)
    seen = []
    out = normalize(x, centre, 1e-5, w, b if centre else None, hook_scale=lambda s: seen.append(s) or s)
    expected = F.layer_norm(x, (48,), w, b, 1e-5) if centre else F.rms_norm(x, (48,), w, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (scale,) = seen
    assert scale.shape == (2, 7, 1)
    torch.testing.assert_close(normalize(x, centre, w=w, b=b if centre else None, scale=scale), out)
