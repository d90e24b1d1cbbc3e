"""HF configs in both key formats: transformers 5's ``rope_parameters`` and the older
top-level keys most hub checkpoints carry (``rope_theta``, ``rope_scaling``,
``rotary_pct``, ``rotary_emb_base``)."""

import json
import shutil

import pytest
import torch
from checkpoints import VOCAB
from transformers import AutoModelForCausalLM

import weights_conversion
from transformer_hooks import HookedTransformer


def to_old_format(config: dict) -> dict:
    """Rewrite a transformers-5 config.json as a pre-5 hub checkpoint has it."""
    old = dict(config)
    rope = dict(old.pop("rope_parameters"))
    kind = rope.pop("rope_type", "default")
    rope.pop("type", None)
    if old["model_type"] == "gpt_neox":
        old["rotary_pct"] = rope.pop("partial_rotary_factor")
        old["rotary_emb_base"] = rope.pop("rope_theta")
    else:
        old["rope_theta"] = rope.pop("rope_theta")
    if kind != "default":
        old["rope_scaling"] = {"type" if old["model_type"] == "gpt_neox" else "rope_type": kind, **rope}
    return old


@pytest.mark.parametrize("name", ["pythia", "neox-linear-rope", "llama-head-dim-bias", "llama3-rope-scaling"])
def test_old_and_new_config_keys_give_the_same_model(hf_checkpoint, tmp_path, name):
    path, hf = hf_checkpoint(name)
    new = json.loads((path / "config.json").read_text())
    old = to_old_format(new)
    assert "rope_parameters" not in old
    assert weights_conversion.config_from_hf(old) == weights_conversion.config_from_hf(new)

    old_dir = tmp_path / "old"
    shutil.copytree(path, old_dir)
    (old_dir / "config.json").write_text(json.dumps(old))
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    model = HookedTransformer.from_pretrained_no_processing(str(old_dir))
    hf_old = AutoModelForCausalLM.from_pretrained(old_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_old(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)


def test_rope_scaling_changes_the_frequencies(hf_checkpoint):
    """Guard against a scaling that is parsed but ignored: llama3 scaling must move low frequencies."""
    path, _ = hf_checkpoint("llama3-rope-scaling")
    cfg = weights_conversion.config_from_hf(json.loads((path / "config.json").read_text()))
    from transformer_hooks.components.rotary import inverse_frequencies

    scaled = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    plain = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, None)
    # Wavelengths beyond original_max_position_embeddings / low_freq_factor are divided by factor.
    long = 2 * torch.pi / plain > cfg.rope_scaling.original_max_position_embeddings / cfg.rope_scaling.low_freq_factor
    assert long.any()
    torch.testing.assert_close(scaled[long], plain[long] / cfg.rope_scaling.factor)


def test_unsupported_rope_scaling_is_named():
    config = {
        "model_type": "llama",
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "vocab_size": 10,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    with pytest.raises(ValueError, match="yarn"):
        weights_conversion.config_from_hf(config)


def test_safetensors_writer_and_reader_agree_with_the_reference_reader(tmp_path):
    """One dtype table serves both directions: every dtype written by ``write_safetensors``
    reads back bit for bit through ``SafetensorsFile`` and through the safetensors package."""
    from safetensors.torch import load_file

    from transformer_hooks.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NUMPY
    from weights_conversion.sources import SafetensorsFile, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in SAFETENSORS_DTYPES.items():
        values = torch.randn(3, 5, generator=g) * 4
        tensors[name] = (values > 0) if dtype == torch.bool else values.to(dtype)
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors)
    ours, reference = SafetensorsFile(path), load_file(str(path))
    assert set(ours.keys()) == set(reference) == set(tensors)
    for name, t in tensors.items():
        for read in (ours.read(name), reference[name]):
            assert read.dtype == t.dtype and read.shape == t.shape
            assert torch.equal(read.view(torch.uint8), t.view(torch.uint8)), name
        if name in SAFETENSORS_NUMPY:  # the memory map (activation datasets) has the same bytes
            mapped = torch.from_numpy(ours.memmap(name).copy())
            assert tuple(mapped.shape) == tuple(t.shape)
            assert torch.equal(mapped.view(torch.uint8), t.view(torch.uint8)), name
