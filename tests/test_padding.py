"""A padded batch gives, at its real positions, the logits each row gives alone."""

import pytest
import torch
from checkpoints import CONFIGS, VOCAB

from transformer_hooks import HookedTransformer


def pad(rows, side, pad_id=0):
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        tokens[i, cols], mask[i, cols] = r, 1
    return tokens, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_rows_match_rows_alone(hf_checkpoint, name, side):
    path, _ = hf_checkpoint(name)
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (12, 5, 9)]
    tokens, mask = pad(rows, side, pad_id=7)
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row)[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, atol=1e-5, rtol=0)
        # Padding also leaves explicit attention (pattern observed) exact and finite.
        explicit = model.run_with_hooks(
            tokens, attention_mask=mask, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)]
        )
    assert torch.isfinite(explicit).all()
    torch.testing.assert_close(explicit[mask.bool()], batch[mask.bool()], atol=1e-5, rtol=0)


def test_string_batches_pad_on_either_side(embedded_model):
    model = embedded_model
    prompts = ["The capital of France is", "Hello"]
    with torch.no_grad():
        alone = [model(p)[0, -1] for p in prompts]
        for side in ("left", "right"):
            tokens, mask = model.to_tokens_and_mask(prompts, padding_side=side)
            logits = model(prompts, padding_side=side)
            last = mask.sum(-1) - 1 if side == "right" else torch.full((2,), tokens.shape[1] - 1)
            for i in range(2):
                torch.testing.assert_close(logits[i, last[i]], alone[i], atol=1e-4, rtol=0)


def test_tokens_functions_need_only_the_tokenizer_and_config(embedded_model):
    """tokens.py works without a model: a padded batch holds each prompt's own tokens, on
    either side, as the model's methods give them; decoding undoes tokenizing."""
    from transformer_hooks import tokens

    tok, cfg = embedded_model.tokenizer, embedded_model.cfg
    prompts = ["The capital of France is", "Hello"]
    for side in ("left", "right"):
        ids, mask = tokens.tokenize(tok, cfg, prompts, padding_side=side)
        model_ids, model_mask = embedded_model.tokens_and_mask(prompts, padding_side=side)
        assert torch.equal(ids, model_ids.cpu()) and torch.equal(mask, model_mask.cpu())
        for i, prompt in enumerate(prompts):
            assert ids[i][mask[i].bool()].tolist() == tokens.to_tokens(tok, cfg, prompt)[0].tolist()
    text = "The capital of France is"
    assert tokens.to_string(tok, tokens.to_tokens(tok, cfg, text, prepend_bos=False)[0]) == text
    assert "".join(tokens.to_str_tokens(tok, cfg, text, prepend_bos=False)) == text
