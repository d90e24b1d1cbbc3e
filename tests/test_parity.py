"""Logits and every layer's residual stream equal Hugging Face's (fp32, max abs 1e-4),
for every family and every config quirk, with HF's eager and SDPA attention."""

import pytest
import torch
from checkpoints import CONFIGS, VOCAB
from transformers import AutoModelForCausalLM

from transformer_hooks import HookedTransformer

TOL = 1e-4
CASES = [
    (name, impl)
    for name in CONFIGS
    for impl in ("eager", "sdpa")
    if not (name.startswith("gpt-neo") and impl == "sdpa")
]  # HF has no SDPA for GPT-Neo


@pytest.mark.parametrize("name,impl", CASES)
def test_logits_and_residuals_match_hf(hf_checkpoint, name, impl):
    path, _ = hf_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens)

    assert ref.logits.abs().mean() > 0.5, "logits too small for the tolerance to mean anything"
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    # HF's hidden_states[i] enters layer i; the last one is after the final norm.
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache["resid_pre", layer],
            ref.hidden_states[layer],
            atol=TOL,
            rtol=0,
            msg=lambda m, layer=layer: f"layer {layer} resid_pre: {m}",
        )
    # The last hidden state is the last resid_post through the final norm.
    with torch.no_grad():
        torch.testing.assert_close(model.ln_final(cache["resid_post", -1]), ref.hidden_states[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo-local", "pythia", "llama-gqa"])
def test_long_sequence_past_local_window(hf_checkpoint, name):
    """Sequences much longer than the local window and the rope's original context."""
    path, hf = hf_checkpoint(name)
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    tokens = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=TOL, rtol=0)
