"""Text generation with a preallocated KV cache (TransformerLens's ``generate``).

    prompt [batch, prompt_len]   padded on the left, so every row's last token is in the
       │                         last column and its next token lands in one column
       │ prefill: one forward over the prompt but its last token, return_type=None
       │          (it only fills the KV cache)
       ▼
    each step: one forward of one column of tokens (its keys/values written into the
               cache in place; nothing is concatenated) -> logits [batch, d_vocab]
               -> next token -> written into the next column of the token buffer

All buffers are allocated once: the KV cache holds ``prompt_len + max_new_tokens`` key
positions and the output is a [batch, prompt_len + max_new_tokens] token buffer that
each step writes one column of. Hooks attached to the model (``model.hooks(...)``,
``add_hook``) fire on the prefill and on every step, so a steering hook steers the
whole continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int

from .components import KVCache
from .progress import tqdm
from .protocol import HookedModel
from .tokens import is_text, require_tokenizer
from .utils import CheckError

if TYPE_CHECKING:
    from .tokens import ModelInput


# Below this, logits / temperature can overflow float32 (and sampling is argmax anyway).
MIN_TEMPERATURE = 1e-4


def check_temperature(temperature: Any) -> float:
    """``temperature`` if it can be sampled with: 0 (greedy) or a number >= ``MIN_TEMPERATURE``."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature != temperature:
        raise ValueError(f"temperature must be a number (0 is greedy), got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={temperature:g} is too small to sample with: logits / temperature overflow. "
            f"Use temperature=0 (or do_sample=False) for greedy decoding, or a temperature >= {MIN_TEMPERATURE:g}"
        )
    return float(temperature)


def sample_logits(
    final_logits: Float[torch.Tensor, "batch d_vocab"],
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    token_counts: Float[torch.Tensor, "batch d_vocab"] | None = None,
) -> Int[torch.Tensor, " batch"]:
    """One token per row, as TransformerLens samples.

    ``temperature == 0``: argmax. Otherwise logits / temperature, minus
    ``freq_penalty * count`` of each token so far (``token_counts``), restricted to the
    ``top_k`` largest or to the smallest set whose probability reaches ``top_p`` (the
    top token always stays), then sampled from the softmax. ``final_logits``: the last
    position's logits [batch, d_vocab].
    """
    if check_temperature(temperature) == 0.0:
        return final_logits.argmax(dim=-1)
    logits = final_logits.float() / temperature
    if freq_penalty > 0:
        if token_counts is None:
            raise ValueError("freq_penalty needs token_counts (how often each token occurred so far)")
        logits = logits - freq_penalty * token_counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p is a probability mass in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p  # drop a token once the ones before it exceed top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def _stop_tokens(model: HookedModel, eos_token_id: int | Sequence[int] | None) -> tuple[list[int], int]:
    """(tokens that end a row, the token a finished row keeps emitting)."""
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = tokenizer_eos if tokenizer_eos is not None else model.cfg.eos_token_id
    if eos_token_id is None:  # TransformerLens asserts: a CheckError is also an AssertionError
        raise CheckError(
            "stop_at_eos=True but neither the tokenizer nor the config names an end-of-sequence "
            "token: pass eos_token_id=..., or stop_at_eos=False"
        )
    if isinstance(eos_token_id, int):
        return [eos_token_id], eos_token_id
    stops = [int(t) for t in eos_token_id]
    if not stops:
        raise ValueError("eos_token_id is an empty list: give at least one token id, or stop_at_eos=False")
    return stops, tokenizer_eos if tokenizer_eos is not None else stops[0]


def _left_aligned(tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move each row's padding to its left, keeping token order (so the last column is real)."""
    if mask is None or bool(mask[:, -1].all()):
        return tokens, mask
    order = torch.argsort(mask, dim=1, stable=True)  # padding (0) first, then the real tokens in order
    return tokens.gather(1, order), mask.gather(1, order)


@torch.inference_mode()
def generate(
    model: HookedModel,
    input: "ModelInput" = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] | None = "left",
    return_type: Literal["input", "str", "tokens"] = "input",
    verbose: bool = True,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
) -> Any:
    """Continue ``input`` by up to ``max_new_tokens`` tokens.

    ``input``: a string, a list of strings (padded on the left), or tokens [batch, pos]
    (with ``attention_mask`` for padded rows; padding is moved to the left).
    ``do_sample=False`` is greedy (argmax); otherwise see ``sample_logits`` for
    ``temperature``, ``top_k``, ``top_p`` and ``freq_penalty``.
    ``stop_at_eos``: a row that emits an end token (``eos_token_id``, an id or a list of
    ids; default the tokenizer's) keeps emitting it; generation stops when every row has.
    ``return_type``: "str" (decoded text, prompt included, without a prepended BOS or
    padding), "tokens" ([batch, pos + new], prompt included), or "input" (strings for
    string input, tokens for tokens).
    ``use_past_kv_cache=False`` reruns the whole sequence every step (same tokens, slower).
    ``model``: the model to run (its hooks fire on every step). ``prepend_bos`` and
    ``padding_side``: for string input, as in ``model.to_tokens`` (default: the model's BOS
    rule, left padding). ``verbose``: a progress bar over the steps.
    """
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if do_sample:
        check_temperature(temperature)
    text_input = is_text(input)
    if return_type == "input":
        return_type = "str" if text_input else "tokens"
    tokens, mask = model.tokens_and_mask(input, prepend_bos, padding_side, attention_mask)
    tokens, mask = _left_aligned(tokens, mask)
    batch, prompt_len = tokens.shape
    if model.cfg.positional_embedding == "learned" and prompt_len + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds this model's "
            f"context (n_ctx={model.cfg.n_ctx}, learned positions); lower max_new_tokens to at most "
            f"{max(model.cfg.n_ctx - prompt_len, 0)} or shorten the prompt"
        )
    stop_ids, eos_for_padding = _stop_tokens(model, eos_token_id) if stop_at_eos else ([], 0)
    stops = torch.tensor(stop_ids, device=tokens.device)

    out = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=tokens.device)
    out[:, :prompt_len] = tokens
    out_mask = None
    if mask is not None:  # generated tokens are real; only the prompt has padding
        out_mask = torch.ones_like(out)
        out_mask[:, :prompt_len] = mask
    counts = None
    if do_sample and freq_penalty > 0:
        # over the inputs' and the outputs' ids; the penalty reads the logits' (d_vocab_out) columns
        counts = torch.zeros(batch, max(model.cfg.d_vocab, model.cfg.d_vocab_out), device=tokens.device)
        real = torch.ones_like(tokens) if mask is None else mask
        counts.scatter_add_(1, tokens, real.to(counts.dtype))
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)

    cache = None
    if use_past_kv_cache:
        cache = KVCache(
            model.cfg, batch, prompt_len + max_new_tokens, model.device, model.dtype, layer_devices=model.block_devices
        )
        if prompt_len > 1:  # the prompt but its last token: only the cache is needed, not logits
            model(
                tokens[:, :-1],
                attention_mask=None if mask is None else mask[:, :-1],
                past_kv_cache=cache,
                return_type=None,
            )
    end = prompt_len
    for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
        if cache is not None:  # one token (the last column is real in every row: left-aligned)
            final_logits = model(out[:, end - 1 : end], past_kv_cache=cache)[:, -1]
        else:
            final_logits = model(out[:, :end], attention_mask=None if out_mask is None else out_mask[:, :end])[:, -1]
        final_logits = final_logits.to(out.device)  # from the last block's device, when placed over several
        if do_sample:
            penalty_counts = None if counts is None else counts[:, : final_logits.shape[-1]]
            next_tokens = sample_logits(final_logits, top_k, top_p, temperature, freq_penalty, penalty_counts)
        else:
            next_tokens = final_logits.argmax(dim=-1)
        if stop_at_eos:
            next_tokens = next_tokens.masked_fill(finished, eos_for_padding)
            finished |= torch.isin(next_tokens, stops)
        out[:, end] = next_tokens
        if counts is not None:
            counts.scatter_add_(1, next_tokens[:, None], torch.ones_like(counts[:, :1]))
        end += 1
        if stop_at_eos and bool(finished.all()):
            break

    out = out[:, :end]
    if return_type == "tokens":
        return out
    prepended = text_input and (model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos)
    texts = _decode(
        model, out, None if out_mask is None else out_mask[:, :end], prompt_len, prepended, set(stops.tolist())
    )
    return texts[0] if isinstance(input, str) else texts


def _decode(
    model: HookedModel,
    out: torch.Tensor,
    mask: torch.Tensor | None,
    prompt_len: int,
    prepended: bool,
    stops: set[int],
) -> list[str]:
    """Each row as text: no left padding, no prepended BOS, nothing after the first end token."""
    tokenizer = require_tokenizer(model.tokenizer)
    texts = []
    for row in range(out.shape[0]):
        ids = out[row] if mask is None else out[row][mask[row].bool()]
        ids = ids.tolist()  # type: ignore[assignment]  # from here on, a list of ids
        if prepended:
            ids = ids[1:]
        n_prompt = len(ids) - (out.shape[1] - prompt_len)
        for i in range(n_prompt, len(ids)):
            if ids[i] in stops:
                ids = ids[: i + 1]
                break
        texts.append(tokenizer.decode(ids))
    return texts
