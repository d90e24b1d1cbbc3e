"""The newer families (Mistral, Qwen 2/3, Gemma 1/2/3, OLMo 2) on the reference skeleton:
logits and every layer's residual stream equal HF's (fp32, 1e-4, eager and SDPA, fused and
explicit attention), every quirk in the test configs changes the output (so parity tests it),
weight processing keeps the log-probs, the cache's decompositions still sum exactly (through
post-norms and soft-capping), configs in the older key formats read the same, and the
``parity`` command runs on them."""

import json
import shutil

import pytest
import torch
from checkpoints import FAMILY_CONFIGS, VOCAB, scale_weights
from transformers import AutoModelForCausalLM

from transformer_hooks import HookedTransformer
from transformer_hooks.cli import main
from transformer_hooks.components import KVCache
from transformer_hooks.components.softcap import softcap
from weights_conversion import config_from_hf

TOL = 1e-4
# HF has no SDPA for Gemma 2 (SDPA cannot soft-cap scores): eager only, as GPT-Neo.
CASES = [(name, impl) for name in FAMILY_CONFIGS for impl in ("eager", "sdpa") if (name, impl) != ("gemma2", "sdpa")]


def tokens(batch: int = 2, pos: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def loaded(hooked_model, hf_checkpoint):
    """name -> (unprocessed model, processed model, path), loaded once per session."""

    def get(name: str):
        return hooked_model(name), hooked_model(name, processed=True), hf_checkpoint(name)[0]

    return get


@pytest.mark.parametrize("name,impl", CASES)
def test_logits_and_residuals_match_hf(loaded, one_thread, name, impl):
    model, _, path = loaded(name)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
    toks = tokens()
    with torch.no_grad():
        ref = hf(toks, output_hidden_states=True)
        logits, cache = model.run_with_cache(toks)  # explicit attention (patterns cached)
        fused = model(toks)

    assert ref.logits.abs().mean() > 0.5, "logits too small for the tolerance to mean anything"
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(fused, ref.logits, atol=TOL, rtol=0)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache["resid_pre", layer],
            ref.hidden_states[layer],
            atol=TOL,
            rtol=0,
            msg=lambda m, layer=layer: f"layer {layer} resid_pre: {m}",
        )
    with torch.no_grad():
        torch.testing.assert_close(model.ln_final(cache["resid_post", -1]), ref.hidden_states[-1], atol=TOL, rtol=0)


# Each quirk the configs turn on, switched off: the output must change, so parity above checks it.
QUIRKS = [
    ("mistral", dict(attn_windows=None)),
    ("qwen2-windowed-untied", dict(attn_windows=None)),
    ("qwen3", dict(attn_windows=None)),
    ("gemma", dict(embed_scale=1.0)),
    ("gemma2", dict(attn_windows=None)),
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(attn_scale=None)),
    ("gemma3", dict(local_rope_theta=None)),
    ("gemma3", dict(attn_windows=None)),
    ("gemma3", dict(rope_scaling=None)),
]


@pytest.mark.parametrize("name,change", QUIRKS)
def test_each_quirk_changes_the_output(loaded, one_thread, name, change):
    model, _, _ = loaded(name)
    other = HookedTransformer(model.cfg.replace(**change))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(tokens()) - model(tokens())).abs().max() > 100 * TOL


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_processing_keeps_log_probs(loaded, one_thread, name):
    plain, processed, _ = loaded(name)
    with torch.no_grad():
        torch.testing.assert_close(
            processed(tokens()).log_softmax(-1), plain(tokens()).log_softmax(-1), atol=TOL, rtol=0
        )
    capped = plain.cfg.final_logit_softcap is not None
    # center_unembed would change a soft-capped model's log-probs: skipped, and not recorded.
    assert ("center_unembed" in processed.cfg.processing) == (not capped)
    assert "fold_ln" in processed.cfg.processing
    for block in processed.blocks:  # post-norms cannot be folded: they keep their weights
        for norm in (block.ln1_post, block.ln2_post):
            assert type(norm).__name__ in ("Identity", "RMSNorm")


@pytest.mark.parametrize("processed", [False, True])
@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_decompositions_sum_to_the_residual_stream(loaded, one_thread, name, processed):
    model = loaded(name)[int(processed)]
    toks = tokens(pos=16)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    final = cache["resid_post", -1]
    exact = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.decompose_resid().sum(0), final, **exact)
    for expand in (True, False):
        torch.testing.assert_close(cache.get_full_resid_decomposition(expand_neurons=expand).sum(0), final, **exact)
    heads = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(heads.sum(0), final, **exact)
    # Inside the model: the stream each block's MLP reads, and what its ln1 makes of resid_pre.
    torch.testing.assert_close(
        cache.get_full_resid_decomposition(1, mlp_input=True).sum(0), cache["resid_mid", 1], **exact
    )
    with torch.no_grad():
        torch.testing.assert_close(
            cache.decompose_resid(1, apply_ln=True).sum(0), model.blocks[1].ln1(cache["resid_pre", 1]), **exact
        )
    # Through the final norm and the unembedding (and its soft-cap) back to the logits.
    normed = cache.get_full_resid_decomposition(apply_ln=True).sum(0)
    unembedded = normed @ model.W_U + model.b_U
    cap = model.cfg.final_logit_softcap
    torch.testing.assert_close(unembedded if cap is None else softcap(unembedded, cap), logits, **exact)
    # Each head's direct contribution is what it adds through its block's post-norm.
    if model.cfg.norm_placement != "pre":
        per_head = cache.stack_head_results(1)  # layer 0's heads
        scale = cache["blocks.0.ln1_post.hook_scale"]
        attn_out_minus_bias = cache["attn_out", 0] - model.blocks[0].attn.b_O * model.blocks[0].ln1_post.w / scale
        torch.testing.assert_close(per_head.sum(0), attn_out_minus_bias, **exact)


def test_post_norm_models_refuse_a_position_independent_bias(loaded):
    model, _, _ = loaded("gemma2")
    with pytest.raises(ValueError, match="post-norms.*get_full_resid_decomposition"):
        model.accumulated_bias(1)


def test_hook_names_follow_transformer_lens(loaded):
    gemma2, gemma3, olmo2, qwen3 = (loaded(n)[0] for n in ("gemma2", "gemma3", "olmo2", "qwen3"))
    for name in ("blocks.0.ln1_post.hook_normalized", "blocks.0.ln2_post.hook_scale", "blocks.0.ln1.hook_scale"):
        assert name in gemma2.hook_dict
    for model in (gemma3, qwen3, olmo2):
        assert {"blocks.1.attn.q_norm.hook_normalized", "blocks.1.attn.k_norm.hook_scale"} <= set(model.hook_dict)
    assert "blocks.0.ln1_post.hook_scale" in olmo2.hook_dict and "blocks.0.ln1.hook_scale" not in olmo2.hook_dict
    assert "blocks.0.attn.q_norm.hook_normalized" not in gemma2.hook_dict


def _older(hf: dict) -> dict:
    """A transformers-5 config.json in the older key format most hub checkpoints carry."""
    old = {k: v for k, v in hf.items() if k not in ("layer_types", "rope_parameters")}
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope:  # Gemma 3
        full = dict(rope["full_attention"])
        old["rope_theta"] = full.pop("rope_theta")
        old["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        old["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        old["sliding_window_pattern"] = 2
    elif rope:
        old["rope_theta"] = rope["rope_theta"]
    if hf["model_type"] == "gemma":
        old["hidden_act"], old["hidden_activation"] = "gelu", None  # Gemma 1's original config
    return old


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_older_config_format_reads_the_same(hf_checkpoint, tmp_path, name):
    path, hf_model = hf_checkpoint(name)
    hf = json.loads((path / "config.json").read_text())
    old = _older(hf)
    assert "layer_types" not in old and "rope_parameters" not in old
    assert config_from_hf(old) == config_from_hf(hf)
    # ... and HF reads the older keys as the same model too (so _older means what it says).
    old_dir = tmp_path / "old"
    shutil.copytree(path, old_dir)
    (old_dir / "config.json").write_text(json.dumps(old))
    hf_old = AutoModelForCausalLM.from_pretrained(old_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_old(tokens()).logits, hf_model(tokens()).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "olmo2"])
def test_parity_command_passes(hf_checkpoint, capsys, name):
    path, _ = hf_checkpoint(name)
    code = main(["parity", "--model", str(path), "--tol", str(TOL)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "logits" in out and "FAIL" not in out


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_padded_rows_and_kv_cache_decoding_equal_full_forwards(loaded, one_thread, name):
    """Windows, per-layer rotary bases and soft-caps stay exact with left padding and cached keys."""
    model, _, _ = loaded(name)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (14, 6, 11)]
    toks, mask = torch.zeros(3, 14, dtype=torch.long), torch.zeros(3, 14, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding
        toks[i, 14 - len(row) :], mask[i, 14 - len(row) :] = row, 1
    with torch.no_grad():
        whole = model(toks, attention_mask=mask)
        for i, row in enumerate(rows):
            torch.testing.assert_close(whole[i, 14 - len(row) :], model(row)[0], atol=TOL, rtol=0)
        cache = KVCache(model.cfg, 3, 14, dtype=model.dtype)
        steps = [model(toks[:, :8], attention_mask=mask[:, :8], past_kv_cache=cache)[:, -1]]
        steps += [model(toks[:, i : i + 1], past_kv_cache=cache)[:, -1] for i in range(8, 14)]
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, 7:], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "olmo2"])
def test_logit_lens_of_the_last_residual_is_the_model_output(loaded, name):
    from transformer_hooks.analysis.lens import logit_lens

    for model in loaded(name)[:2]:
        toks = tokens(batch=1, pos=12)
        with torch.no_grad():
            logits = model(toks)
        lens = logit_lens(model, toks, sites=("resid_post",), top_k=3, progress=False)
        top = logits.topk(3, dim=-1)
        torch.testing.assert_close(lens.top_logits[-1], top.values, atol=TOL, rtol=0)
        torch.testing.assert_close(lens.top_probs[-1], logits.softmax(-1).gather(-1, top.indices), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def gemma3_multimodal(checkpoint_dir):
    """A tiny Gemma 3 with a vision tower (model_type "gemma3", as the 4B+ checkpoints)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    cls, kwargs = FAMILY_CONFIGS["gemma3"]
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Gemma3Config(
        text_config=cls(vocab_size=VOCAB + 3, **kwargs),
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=VOCAB,
        eoi_token_index=VOCAB + 1,
        image_token_index=VOCAB + 2,
    )
    torch.manual_seed(0)
    path = checkpoint_dir / "gemma3-multimodal"
    scale_weights(Gemma3ForConditionalGeneration(config)).save_pretrained(path)
    return path


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gemma3_multimodal_checkpoint_loads_its_language_model(gemma3_multimodal, one_thread, impl):
    hf = AutoModelForCausalLM.from_pretrained(gemma3_multimodal, attn_implementation=impl).eval()
    with pytest.warns(UserWarning, match="not used: .*vision_tower"):
        model = HookedTransformer.from_pretrained_no_processing(str(gemma3_multimodal))
    toks = tokens()
    with torch.no_grad():
        ref = hf(toks, output_hidden_states=True)
        logits, cache = model.run_with_cache(toks)
    assert ref.logits.abs().mean() > 0.5
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], ref.hidden_states[layer], atol=TOL, rtol=0)


def test_gemma3_hub_config_reads_as_hf_reads_it():
    """The hub's multimodal configs leave most text_config keys out; HF fills in its defaults."""
    from transformers import Gemma3Config

    hub = {
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    parsed = Gemma3Config(**json.loads(json.dumps(hub))).to_dict()
    ours = config_from_hf(hub)
    assert ours == config_from_hf(parsed)
    assert ours.attn_windows == (1024,) * 5 + (None,) + (1024,) * 5 + (None,) + ours.attn_windows[12:]
    assert ours.local_rope_theta == 10000.0 and ours.rope_theta == 1e6 and ours.rope_scaling.factor == 8.0


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_greedy_generation_equals_hf(hf_checkpoint, loaded, one_thread, name):
    """21 tokens, past the window: HF's sliding-window caches and our windowed mask agree."""
    _, hf = hf_checkpoint(name)
    model, _, _ = loaded(name)
    toks = tokens(batch=3, pos=9)
    with torch.no_grad():
        ref = hf.generate(toks, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert ref[:, 9:].unique().numel() > 3, "degenerate continuation: the test would prove little"
    ours = model.generate(toks, max_new_tokens=12, do_sample=False, verbose=False, stop_at_eos=False)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_center_unembed_is_skipped_with_a_warning_under_a_logit_softcap(loaded, caplog):
    from transformer_hooks.processing import ProcessingOptions, processed_config

    cfg = loaded("gemma2")[0].cfg
    with caplog.at_level("WARNING", logger="transformer_hooks.processing"):
        processed = processed_config(cfg, ProcessingOptions())
    assert "center_unembed" not in processed.processing and "fold_ln" in processed.processing
    assert "center_unembed skipped" in caplog.text and "soft-caps" in caplog.text


def test_dla_command_attributes_the_logit_difference_before_the_soft_cap(checkpoint_dir, capsys, tmp_path):
    """Gemma 2: the parts sum to the logit difference before the final soft-cap (which is
    not linear); the model's own, capped, difference is printed too."""
    import re

    from checkpoints import save_checkpoint
    from tokenizers_util import add_tokenizer

    path, _ = save_checkpoint("gemma2", tmp_path / "with_tokenizer")
    add_tokenizer(path, VOCAB)
    prompt = "The capital of France is"
    code = main(
        [
            "dla",
            "--prompt",
            prompt,
            "--answer",
            " Paris",
            "--contrast",
            " London",
            "--model",
            str(path),
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    model = HookedTransformer.from_pretrained(str(path))
    a, b = model.to_single_token(" Paris"), model.to_single_token(" London")
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt)
        unembedded = model.ln_final(cache["resid_post", -1])[0, -1] @ model.W_U + model.b_U
        before = unembedded[a] - unembedded[b]
        capped = model(prompt)[0, -1]
    number = r"(-?\d+\.\d+)"
    assert (
        abs(float(re.search(rf"^logit difference = {number}$", out, re.M).group(1)) - float(capped[a] - capped[b]))
        < 1e-4
    )
    printed_before = float(re.search(rf"before the final soft-cap .* = {number}$", out, re.M).group(1))
    assert abs(printed_before - float(before)) < 1e-4
    assert abs(float(re.search(rf"\(sum {number}\)", out).group(1)) - float(before)) < 1e-4
    assert abs(before - (capped[a] - capped[b])) > 1e-3  # the cap matters here


@pytest.mark.parametrize("name", ["gemma2", "olmo2"])
@pytest.mark.parametrize("no_processing", [False, True])
def test_converted_checkpoints_load_to_the_same_model(hf_checkpoint, loaded, tmp_path, name, no_processing):
    from weights_conversion.__main__ import main as convert_main

    path, _ = hf_checkpoint(name)
    plain = loaded(name)[0]
    assert convert_main([str(path), str(tmp_path / "converted")] + (["--no-processing"] if no_processing else [])) == 0
    converted = HookedTransformer.from_pretrained(str(tmp_path / "converted"))
    with torch.no_grad():
        torch.testing.assert_close(
            converted(tokens()).log_softmax(-1), plain(tokens()).log_softmax(-1), atol=TOL, rtol=0
        )
    assert converted.cfg.norm_placement == plain.cfg.norm_placement
