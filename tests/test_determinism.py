"""Determinism on CPU: the same input gives bitwise-equal outputs across runs of one model
and across two fresh loads of the same checkpoint, for every family, on the fused and
the explicit attention paths, with and without padding, processed and unprocessed.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer

FAMILY_CHECKPOINTS = ["gpt2", "gpt-neo-local", "neox-sequential-full-rotary", "pythia", "llama-gqa"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return tokens, mask


def outputs(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """Everything a user reads back: logits on both attention paths and the full cache."""
    tokens, mask = padded_batch()
    with torch.no_grad():
        out = {
            "logits": model(tokens),
            "padded": model(tokens, attention_mask=mask),
            "explicit": model.run_with_hooks(
                tokens, attention_mask=mask, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]
            ),
        }
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: True)
    out.update({f"cache:{k}": v for k, v in cache.items()})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: not bitwise equal: {differ}"


@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "processed"])
@pytest.mark.parametrize("name", FAMILY_CHECKPOINTS)
def test_same_input_gives_bitwise_equal_outputs(hf_checkpoint, name, processed):
    path, _ = hf_checkpoint(name)
    load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    first, second = load(str(path)), load(str(path))
    assert_bitwise_equal(first.state_dict(), second.state_dict(), "weights of two loads")
    run1 = outputs(first)
    assert_bitwise_equal(run1, outputs(first), "two runs of one model")
    assert_bitwise_equal(run1, outputs(second), "two fresh loads")


def test_generation_is_reproducible(hf_checkpoint):
    path, _ = hf_checkpoint("llama-gqa")
    model = HookedTransformer.from_pretrained_no_processing(str(path))
    tokens, mask = padded_batch()
    greedy = [
        model.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, verbose=False) for _ in range(2)
    ]
    assert torch.equal(*greedy)
    sampled = []
    for _ in range(2):
        torch.manual_seed(123)
        sampled.append(
            model.generate(tokens, attention_mask=mask, max_new_tokens=6, temperature=1.0, top_k=20, verbose=False)
        )
    assert torch.equal(*sampled), "same seed, same samples"
