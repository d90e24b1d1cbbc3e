"""Bad configurations and arguments: each is refused up front (before any weight file is read,
and never on the first forward) with a ValueError that names the field or argument, the value
found and what is accepted. Never a bare KeyError, TypeError or AttributeError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformer_hooks import HookedTransformer, ModelConfig
from weights_conversion.common import InvalidConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpt2_dir(hf_checkpoint, tmp_path) -> Path:
    path, _ = hf_checkpoint("gpt2")
    return Path(shutil.copytree(path, tmp_path / "gpt2"))


@pytest.fixture
def llama_dir(hf_checkpoint, tmp_path) -> Path:
    path, _ = hf_checkpoint("llama-gqa")
    return Path(shutil.copytree(path, tmp_path / "llama"))


@pytest.fixture(scope="module")
def gpt2(hf_checkpoint) -> HookedTransformer:
    path, _ = hf_checkpoint("gpt2")
    return HookedTransformer.from_pretrained_no_processing(str(path))


def load(path: Path, **kwargs) -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(str(path), **kwargs)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def refused(path: Path, match: str, error: type[Exception] = InvalidConfigError, **kwargs) -> None:
    """Loading ``path`` raises ``error`` matching ``match``, even with the weights gone
    (the config is checked before the weights are looked for)."""
    with pytest.raises(error, match=match):
        load(path, **kwargs)
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(error, match=match):
        load(path, **kwargs)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(n_layer=...), r"config\.json has no 'n_layer'.*model_type='gpt2'"),
        (dict(n_layer=2.5), r"n_layer must be an integer, found 2\.5 \(float\)"),
        (dict(n_layer=2.0), r"n_layer must be an integer, found 2\.0 \(float\)"),
        (dict(n_embd="48"), r"n_embd must be an integer, found '48' \(str\)"),
        (dict(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a number, found '1e-5' \(str\)"),
        (dict(n_layer=0), r"n_layer must be a positive integer \(at least 1\), found 0"),
        (dict(n_layer=-2), r"n_layer must be a positive integer \(at least 1\), found -2"),
        (dict(vocab_size=True), r"vocab_size must be an integer, found True \(bool\)"),
        (dict(bos_token_id="<s>"), r"bos_token_id must be a token id \(an integer\) or null, found '<s>'"),
    ],
    ids=["missing", "float", "float-whole", "string-int", "string-float", "zero-layers", "negative", "bool", "bos"],
)
def test_bad_gpt2_config_values(gpt2_dir, changes, match):
    edit_config(gpt2_dir, **changes)
    if "n_layer" in changes and changes["n_layer"] is ...:
        with pytest.raises(InvalidConfigError, match=match):
            load(gpt2_dir)
        return
    refused(gpt2_dir, match)


def test_heads_that_do_not_divide_the_width(gpt2_dir):
    edit_config(gpt2_dir, n_head=5)  # n_embd=48
    with pytest.raises(ValueError, match=r"n_embd=48 is not a multiple of n_head=5"):
        load(gpt2_dir)


@pytest.mark.parametrize(
    "rope_scaling, match",
    [
        ("linear", r"rope_scaling must be a dict like .*found 'linear' \(str\)"),
        ([2.0], r"rope_scaling must be a dict .*found \[2\.0\] \(list\)"),
        ({"rope_type": "linear"}, r"rope_scaling has rope_type 'linear' but no 'factor'"),
        ({"type": "linear", "factor": "2"}, r"rope_scaling: factor must be a number, found '2' \(str\)"),
    ],
)
def test_bad_rope_scaling(llama_dir, rope_scaling, match):
    edit_config(llama_dir, rope_scaling=rope_scaling)
    refused(llama_dir, match)


def test_unknown_model_type_names_the_supported_families_before_looking_for_weights(gpt2_dir):
    edit_config(gpt2_dir, model_type="bloom")
    refused(gpt2_dir, r"model_type='bloom'.*implements gpt2, gpt_neo, gpt_neox, llama", error=ValueError)


# Converted checkpoints ------------------------------------------------------------------
@pytest.fixture
def converted_dir(gpt2, tmp_path) -> Path:
    from weights_conversion.converted import write_converted

    directory = tmp_path / "converted"
    directory.mkdir()
    write_converted(directory, gpt2)
    return directory


def edit_meta(directory: Path, edit) -> None:
    path = directory / "transformer_hooks_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


def test_converted_checkpoint_loads_as_the_original(converted_dir, gpt2):
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(load(converted_dir)(tokens), gpt2(tokens), atol=0, rtol=0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: {k: v for k, v in m.items() if k != "model_config"}, r"has no 'model_config' object"),
        (lambda m: {**m, "model_config": "gpt2"}, r"has no 'model_config' object \(found 'gpt2'\)"),
        (lambda m: [m], r"should hold a JSON object, found list"),
        (lambda m: {**m, "format_version": None}, r"format_version None.*reads version 1"),
        (
            lambda m: {**m, "model_config": {k: v for k, v in m["model_config"].items() if k != "n_heads"}},
            r"model_config is malformed: ModelConfig fields missing: \['n_heads'\]",
        ),
        (lambda m: {**m, "model_config": {**m["model_config"], "n_layers": 2.0}}, r"n_layers must be an integer"),
        (lambda m: {**m, "model_config": {**m["model_config"], "d_model": 0}}, r"d_model must be a positive integer"),
        (lambda m: {**m, "model_config": {**m["model_config"], "eps": "x"}}, r"eps must be a positive number"),
    ],
    ids=["no-model-config", "model-config-string", "not-object", "no-version", "missing-field", "float", "zero", "str"],
)
def test_converted_checkpoint_with_bad_metadata(converted_dir, edit, match):
    if "should hold" in match:  # _read_json refuses a non-object itself
        match = r"should hold a JSON object, not list"
    edit_meta(converted_dir, edit)
    with pytest.raises(ValueError, match=match):
        load(converted_dir)
    (converted_dir / "model.safetensors").unlink()  # the metadata is checked first
    with pytest.raises(ValueError, match=match):
        load(converted_dir)


# Weight files ------------------------------------------------------------------------------
def test_legacy_non_zip_bin_checkpoint_loads(gpt2_dir, gpt2):
    """torch < 1.6 wrote .bin files that cannot be memory-mapped: they are read into memory."""
    tensors = load_file(gpt2_dir / "model.safetensors")
    (gpt2_dir / "model.safetensors").unlink()
    torch.save(tensors, gpt2_dir / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    tokens = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(load(gpt2_dir)(tokens), gpt2(tokens), atol=0, rtol=0)


def test_bin_checkpoint_that_is_not_a_state_dict(gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], gpt2_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot read .*pytorch_model\.bin: it holds a list, not a state dict"):
        load(gpt2_dir)


# Arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_model_dtype(hf_checkpoint, dtype):
    path, _ = hf_checkpoint("gpt2")
    with pytest.raises(ValueError, match=rf"dtype={dtype} is not a floating-point type.*torch\.float32"):
        load(path, dtype=dtype)


def test_dtype_name_that_is_not_a_float(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2")
    with pytest.raises(ValueError, match=r"unsupported dtype 'int32'.*'bfloat16'"):
        load(path, dtype="int32")


@pytest.mark.parametrize("stop", [1.0, "1", 1.5])
def test_stop_at_layer_that_is_not_an_integer(gpt2, stop):
    with pytest.raises(
        ValueError, match=rf"stop_at_layer must be an int, got {type(stop).__name__} {stop!r} \(valid: -2\.\.2\)"
    ):
        gpt2(torch.tensor([[1, 2, 3]]), stop_at_layer=stop)


def test_stop_at_layer_as_a_zero_dim_tensor_is_an_int(gpt2):
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(gpt2(tokens, stop_at_layer=torch.tensor(1)), gpt2(tokens, stop_at_layer=1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-8, 5e-5])
def test_absurdly_small_temperature(gpt2, temperature):
    with pytest.raises(ValueError, match=r"temperature=.* is too small to sample with.*temperature=0"):
        gpt2.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=temperature, verbose=False)


@pytest.mark.parametrize("temperature", ["hot", None, float("nan")])
def test_temperature_that_is_not_a_number(gpt2, temperature):
    with pytest.raises(ValueError, match=r"temperature must be a number"):
        gpt2.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=temperature, verbose=False)


def test_zero_and_small_sane_temperatures_still_generate(gpt2):
    tokens = torch.tensor([[1, 2, 3]])
    greedy = gpt2.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    assert torch.equal(gpt2.generate(tokens, max_new_tokens=3, temperature=0.0, verbose=False), greedy)
    assert gpt2.generate(tokens, max_new_tokens=3, temperature=1e-3, verbose=False).shape == (1, 6)


def test_string_the_tokenizer_cannot_encode(embedded_model):
    with pytest.raises(ValueError, match=r"cannot encode '\\udcff hi'.*surrogate.*character 0"):
        embedded_model.to_tokens("\udcff hi")
    with pytest.raises(ValueError, match=r"cannot encode"):
        embedded_model(["fine", "bad \udcff"])


def test_model_config_values_are_checked_where_they_are_made():
    good = dict(
        d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=10, n_ctx=8, act_fn="gelu",
        normalization_type="LN", eps=1e-5, positional_embedding="learned",
    )  # fmt: skip
    ModelConfig(**good)
    for field, value, match in [
        ("n_layers", 0, r"n_layers must be a positive integer.*got 0"),
        ("n_heads", 2.0, r"n_heads must be an integer, got 2\.0 \(float\)"),
        ("d_vocab", "10", r"d_vocab must be an integer, got '10' \(str\)"),
        ("eps", -1.0, r"eps must be a positive number, got -1\.0"),
        ("positional_embedding", "standard", r"positional_embedding must be 'learned' or 'rotary'"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**good, field: value})
    with pytest.raises(ValueError, match=r"rope_scaling .* is malformed.*'factor'"):
        ModelConfig(**{**good, "positional_embedding": "rotary", "rope_scaling": {"kind": "linear"}})


def test_das_on_a_bfloat16_model_trains_its_float32_rotation(hf_checkpoint):
    from transformer_hooks.interventions.das import RotatedSubspaceInterchange, evaluate_das, train_das

    path, _ = hf_checkpoint("gpt2")
    model = load(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    base, source = torch.randint(0, 50, (4, 5), generator=g), torch.randint(0, 50, (4, 5), generator=g)
    target = torch.randint(0, 50, (4,), generator=g)
    das = RotatedSubspaceInterchange(model.cfg.d_model, 2, low_rank=True)
    assert das.rotation.weight.dtype == torch.float32
    losses = train_das(model, das, "blocks.0.hook_resid_post", base, source, target, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert evaluate_das(model, das, "blocks.0.hook_resid_post", base, source, target)["loss"] > 0
    # A rotation in the model's dtype cannot be parametrized: the error says to keep float32.
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16: the rotation must be float32.*Keep the default"):
        RotatedSubspaceInterchange(model.cfg.d_model, 2, low_rank=True, dtype=torch.bfloat16)
