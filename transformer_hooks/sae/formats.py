"""SAE files: reading and writing SAELens directories, Gemma Scope ``params.npz`` and Llama
Scope directories.

Readers return (state dict, SAEConfig fields); ``sae.core`` builds the SAE from them.
Every field of a config is checked for its type before it is used (a bool must be a JSON
bool: ``"false"`` is not false), and every malformed file gives a ValueError that names the
file and the field: invalid JSON, a missing or negative size, a dtype that is not a float
type, TopK's ``k`` above ``d_sae``, an npz without ``W_enc``. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# The dtype spellings SAELens writes (str(torch.float32), the short names) and the common short forms.
DTYPE_SPELLINGS = {
    **{name: name for name in ("float32", "float16", "bfloat16", "float64")},
    **{f"torch.{name}": name for name in ("float32", "float16", "bfloat16", "float64")},
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}


def _field(d: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    """``d[key]`` (``default`` when absent or null), refused unless one of ``kinds``; a bool is no int."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = what or " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"SAE config field {key!r} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _size(d: dict[str, Any], key: str, required: bool = True) -> int | None:
    value = d.get(key)
    if value is None:
        if required:
            raise ValueError(f"SAE config field {key!r} is missing: an SAE config needs d_in and d_sae")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"SAE config field {key!r} must be a positive int, got {value!r} ({type(value).__name__})")
    return value


def config_fields(d: Any) -> dict[str, Any]:
    """The SAELens cfg.json ``d`` as ``SAEConfig``'s fields: flat (SAELens <= 5) or with a
    ``metadata`` / ``meta`` block (6+); every field's type checked.
    """
    if not isinstance(d, dict):
        raise ValueError(f"an SAE config is a JSON object, got {type(d).__name__}")
    meta: dict[str, Any] = {}
    for block in ("meta", "metadata"):
        meta.update(_field(d, block, (dict,), {}))
    merged = {**meta, **{k: v for k, v in d.items() if v is not None}}

    act = _field(d, "activation_fn_str", (str,)) or _field(d, "activation_fn", (str,), "relu")
    arch = _field(d, "architecture", (str,)) or "standard"
    if act == "topk" and arch == "standard":  # SAELens <= 5: topk as an activation of a standard SAE
        arch = "topk"
    elif act != "relu" and act != "topk":
        raise ValueError(f"SAE activation {act!r} is not supported; known: relu (standard, gated, jumprelu), topk")
    kwargs = _field(d, "activation_fn_kwargs", (dict,), {})
    k = d.get("k") if d.get("k") is not None else kwargs.get("k")
    if arch == "batchtopk" and isinstance(k, float):  # SAELens allows a mean k; at inference it is a JumpReLU
        k = math.ceil(k)
    k = _size({"k": k}, "k", required=False)
    if merged.get("hook_head_index") is not None:
        raise ValueError("SAEs on a single head (hook_head_index) are not supported")
    hook_name = _field(merged, "hook_name", (str,)) or _field(merged, "hook_point", (str,))
    if not hook_name:
        raise ValueError("the SAE config names no hook: it needs 'hook_name' (or the older 'hook_point')")
    scaling = _field(d, "norm_scaling_factor", (int, float), what="a positive number")
    if scaling is not None and not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"SAE config field 'norm_scaling_factor' must be a positive number, got {scaling!r}")
    known = {
        *("d_in", "d_sae", "hook_name", "hook_point", "apply_b_dec_to_input", "normalize_activations", "dtype"),
        *("model_name", "model_from_pretrained_kwargs", "meta", "metadata", "architecture", "k"),
        *("rescale_acts_by_decoder_norm", "reshape_activations", "norm_scaling_factor", "hook_layer"),
    }
    d_in, d_sae = _size(d, "d_in"), _size(d, "d_sae")
    assert d_in is not None and d_sae is not None
    return dict(
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        apply_b_dec_to_input=_field(d, "apply_b_dec_to_input", (bool,), True, "a JSON bool (true or false)"),
        normalize_activations=_field(d, "normalize_activations", (str,), "none"),
        dtype=_field(d, "dtype", (str,), "float32", "the name of a float dtype"),
        model_name=_field(merged, "model_name", (str,), ""),
        model_from_pretrained_kwargs=_field(merged, "model_from_pretrained_kwargs", (dict,)),
        architecture=arch,
        k=k,
        rescale_acts_by_decoder_norm=_field(
            d, "rescale_acts_by_decoder_norm", (bool,), False, "a JSON bool (true or false)"
        ),
        reshape_activations=_field(d, "reshape_activations", (str,)),
        norm_scaling_factor=None if scaling is None else float(scaling),
        hook_layer=_field(merged, "hook_layer", (int,)),
        extra={k: v for k, v in d.items() if k not in known},
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the SAE's config is damaged") from None


def read_sae_files(path: str | Path, **overrides: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and config fields of a local SAE directory or file, in any of these layouts:

    - SAELens: ``cfg.json`` + ``sae_weights.safetensors``;
    - Gemma Scope: ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``;
      JumpReLU, no b_dec on the input). It carries no config: pass ``hook_name=...``
      (and any other SAEConfig field) as keyword arguments;
    - Llama Scope: ``hyperparams.json`` + ``checkpoints/final.safetensors``.

    ``path``: the directory or file; ``**overrides``: ``SAEConfig`` fields that replace the
    file's (or, for Gemma Scope, supply them).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.name == "params.npz" or (path / "params.npz").is_file():
        return read_gemma_scope(path if path.name == "params.npz" else path / "params.npz", **overrides)
    if (path / "hyperparams.json").is_file():
        return read_llama_scope(path, **overrides)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} has no {name}; a SAELens SAE directory holds "
                f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} (Gemma Scope: params.npz; "
                f"Llama Scope: hyperparams.json and checkpoints/final.safetensors)"
            )
    raw = _read_json(path / SAE_CFG_FILENAME)
    try:
        cfg = config_fields({**raw, **overrides} if isinstance(raw, dict) else raw)
    except ValueError as e:
        raise ValueError(f"{path / SAE_CFG_FILENAME}: {e}") from None
    try:
        state = load_file(str(path / SAE_WEIGHTS_FILENAME))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path / SAE_WEIGHTS_FILENAME} cannot be read as safetensors ({e})") from None
    return state, cfg


def write_sae_files(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``tensors`` to ``sae_weights.safetensors`` and ``config`` to ``cfg.json`` (SAELens's
    layout) in the directory ``path``; returns the two paths.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights, cfg = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
    save_file({n: p.detach().contiguous().cpu() for n, p in tensors.items()}, str(weights))
    cfg.write_text(json.dumps(config, indent=2))
    return weights, cfg


GEMMA_SCOPE_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def read_gemma_scope(
    path: str | Path, hook_name: str | None = None, **cfg: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Gemma Scope ``params.npz`` at ``path`` (the file or its directory): JumpReLU,
    ``f = h * 1[h > threshold]``, ``h = ReLU(x @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``.
    Read without pickle. The file names no site: ``hook_name`` is required; ``**cfg``: other
    ``SAEConfig`` fields.
    """
    import numpy as np

    if not hook_name:
        raise ValueError(
            "a params.npz file names no hook: pass hook_name=..., e.g. 'blocks.12.hook_resid_post' "
            "(Gemma Scope's res SAEs), 'blocks.12.hook_mlp_out' (mlp) or 'blocks.12.attn.hook_z' (att)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {
                ("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])).float() for k in data
            }
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} cannot be read as an npz of arrays ({e})") from None
    missing = [name for name in GEMMA_SCOPE_TENSORS if name not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; a Gemma Scope params.npz holds {list(GEMMA_SCOPE_TENSORS)}")
    if state["W_enc"].ndim != 2:
        raise ValueError(f"{path}: W_enc has shape {tuple(state['W_enc'].shape)}, expected [d_in, d_sae]")
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError("this params.npz has a finetuning scaling_factor other than 1, which is not supported")
    d_in, d_sae = state["W_enc"].shape
    config = dict(
        d_in=d_in, d_sae=d_sae, hook_name=hook_name, architecture="jumprelu", apply_b_dec_to_input=False, **cfg
    )
    return state, config


def read_llama_scope(path: str | Path, **cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Llama Scope directory ``path`` (``hyperparams.json``, ``checkpoints/final.safetensors``
    with ``encoder.weight`` [d_sae, d_in] etc.), converted as SAELens does: JumpReLU with one
    threshold ``jump_relu_threshold * s`` and ``expected_average_only_in`` with
    ``s = sqrt(d_in) / dataset_average_activation_norm['in']``; ``**cfg``: ``SAEConfig``
    fields that replace the file's.
    """
    from safetensors.torch import load_file

    path = Path(path)
    hp = _read_json(path / "hyperparams.json")
    if not isinstance(hp, dict):
        raise ValueError(f"{path / 'hyperparams.json'} is not a JSON object")
    try:
        d_in, d_sae = _size(hp, "d_model"), _size(hp, "d_sae")
        norms = _field(hp, "dataset_average_activation_norm", (dict,), {})
        norm_in = _field(norms, "in", (int, float), what="a positive number")
        threshold = _field(hp, "jump_relu_threshold", (int, float), what="a number")
        hook = _field(hp, "hook_point_in", (str,))
        if norm_in is None or threshold is None or hook is None or norm_in <= 0:
            raise ValueError(
                "needs d_model, d_sae, jump_relu_threshold, hook_point_in and a positive "
                "dataset_average_activation_norm['in']"
            )
    except ValueError as e:
        raise ValueError(f"{path / 'hyperparams.json'}: {e}") from None
    assert d_in is not None and d_sae is not None
    raw = load_file(str(path / "checkpoints" / "final.safetensors"))
    s = d_in**0.5 / float(norm_in)
    state = {
        "W_enc": raw["encoder.weight"].T.float(),
        "W_dec": raw["decoder.weight"].T.float(),
        "b_enc": raw["encoder.bias"].float(),
        "b_dec": raw["decoder.bias"].float(),
        "threshold": torch.full((d_sae,), float(threshold) * s),
    }
    config = {
        "d_in": d_in,
        "d_sae": d_sae,
        "hook_name": hook,
        "architecture": "jumprelu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": s,
        **cfg,
    }
    return state, config
