"""A tiny word-level tokenizer for random test checkpoints (no network).

Words carry their leading space as SentencePiece does (``" Paris"`` is the token
``"▁Paris"``), so prompts and answers behave like a real model's: ``" Paris"`` is one
token and ``" Paris London"`` two. Unknown words become ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SENTENCES = [
    "The capital of France is Paris",
    "The capital of England is London",
    "The capital of Italy is Rome and the capital of Spain is Madrid",
    "When Mary and John went to the store John gave a drink to Mary",
    "In 1492 Columbus sailed the ocean blue",
]
SPECIAL = ["<unk>", "<s>", "</s>"]


def tiny_tokenizer(vocab_size: int, adds_bos: bool = True) -> PreTrainedTokenizerFast:
    """A tokenizer over the words of ``SENTENCES`` with at most ``vocab_size`` ids. Like
    Llama's and Mistral's, it puts its BOS ``<s>`` first (``adds_bos``), so the BOS rule
    (``tokens.default_prepend_bos``) prepends it; ``adds_bos=False`` is SmolLM2's kind."""
    words = list(dict.fromkeys(w for s in SENTENCES for w in s.split()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"▁{w}" for w in words])}
    if len(vocab) > vocab_size:
        raise ValueError(f"the tiny tokenizer needs {len(vocab)} ids, the model has {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def add_tokenizer(checkpoint: Path, vocab_size: int, adds_bos: bool = True) -> Path:
    """Save the tiny tokenizer into an HF checkpoint directory; returns the directory."""
    tiny_tokenizer(vocab_size, adds_bos).save_pretrained(str(checkpoint))
    return checkpoint
