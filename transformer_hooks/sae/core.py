"""The SAE module: SAELens's architectures, normalisations and files.

Every architecture shares the input processing and the decoder (SAELens's order)::

    x        [..., d_in]   (hook_z SAEs: [..., head, d_head] flattened to head*d_head)
    sae_in = norm_in(x) - b_dec * apply_b_dec_to_input
    f      = act(sae_in)                                   [..., d_sae]
    x_hat  = norm_out(f @ W_dec + b_dec)                    [..., d_in]

and differ only in ``act`` (one small class each, in ``ARCHITECTURES``):

    standard   ReLU(sae_in @ W_enc + b_enc)
    gated      1[sae_in @ W_enc + b_gate > 0] * ReLU(sae_in @ (W_enc * exp(r_mag)) + b_mag)
    jumprelu   h * 1[h > threshold],  h = ReLU(sae_in @ W_enc + b_enc)   (threshold per feature)
    topk       the k largest of h = sae_in @ W_enc + b_enc per token, ReLU'd, others 0
               (``rescale_acts_by_decoder_norm``: choose on h * ||W_dec[i]||, decode f / ||W_dec[i]||)
    batchtopk  at inference a JumpReLU with one threshold for all features (SAELens saves it so)

Normalisations (``normalize_activations``):

    none                       identity
    expected_average_only_in   norm_in(x) = s * x, norm_out(y) = y / s with the dataset's
                               s = sqrt(d_in) / E||x|| (``norm_scaling_factor``; unknown: 1, as SAELens)
    constant_norm_rescale      c = sqrt(d_in) / ||x|| per token; norm_in = c * x, norm_out = y / c
    layer_norm                 mu, std (unbiased) per token; norm_in = (x - mu) / (std + 1e-5),
                               norm_out = y * std + mu

The per-token statistics of ``constant_norm_rescale`` and ``layer_norm`` are taken in
``encode`` and used by the next ``decode``, as in SAELens.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from .. import sites
from ..hooks import HookedRootModule, HookPoint
from ..processing import STEPS

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
PROCESSING_STEPS = STEPS  # processing.py's step names, in order
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
LN_EPS = 1e-5


# Architectures: the activation of each, and its extra parameters ------------------------
class Activation:
    """``encode(sae, sae_in) -> (pre, post)``; ``params``: extra tensors beyond W_enc/W_dec/b_dec."""

    params: dict[str, str] = {"b_enc": "d_sae"}

    def encode(self, sae: "SAE", sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decoder_scale(self, sae: "SAE") -> torch.Tensor | None:
        """A [d_sae] factor the features are multiplied by before decoding (None: 1)."""
        return None


class ReLUActivation(Activation):
    def encode(self, sae, sae_in):
        pre = sae_in @ sae.W_enc + sae.b_enc
        return pre, F.relu(pre)


class GatedActivation(Activation):
    params = {"b_gate": "d_sae", "b_mag": "d_sae", "r_mag": "d_sae"}

    def encode(self, sae, sae_in):
        gate = (sae_in @ sae.W_enc + sae.b_gate) > 0
        pre = sae_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        return pre, gate.to(pre.dtype) * F.relu(pre)


# JumpReLU's straight-through threshold gradients (Rajamanoharan et al. 2024), used while training.
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """ReLU(pre) * 1[pre > theta] (= pre * 1[pre > theta] for theta >= 0, which training keeps);
    gradient to pre where active, to theta by the kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre.clamp_min(0) * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        d_pre = ((pre > threshold) & (pre > 0)).to(grad.dtype) * grad
        d_theta = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return d_pre, d_theta.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - theta); gradient to theta only, by the kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        d_theta = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), d_theta.reshape(-1, threshold.shape[-1]).sum(0), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(pre, threshold, bandwidth)


class JumpReLUActivation(Activation):
    params = {"b_enc": "d_sae", "threshold": "d_sae"}

    def encode(self, sae, sae_in):
        pre = sae_in @ sae.W_enc + sae.b_enc
        if sae.training and torch.is_grad_enabled():
            return pre, jumprelu(pre, sae.threshold, sae.bandwidth)  # straight-through threshold gradients
        return pre, F.relu(pre) * (pre > sae.threshold).to(pre.dtype)


class TopKActivation(Activation):
    def encode(self, sae, sae_in):
        pre = sae_in @ sae.W_enc + sae.b_enc
        if sae.cfg.rescale_acts_by_decoder_norm:
            pre = pre * sae.W_dec.norm(dim=-1)
        top = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        return pre, torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def decoder_scale(self, sae):
        return 1 / sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None


ARCHITECTURES: dict[str, Activation] = {
    "standard": ReLUActivation(),
    "gated": GatedActivation(),
    "jumprelu": JumpReLUActivation(),
    "topk": TopKActivation(),
}


# Config -------------------------------------------------------------------------------
@dataclass
class SAEConfig:
    """What an SAE needs to run, and where it came from (SAELens's field names)."""

    d_in: int
    d_sae: int
    hook_name: str
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    model_name: str = ""
    # SAELens loads the model it trains on with from_pretrained_no_processing(**these).
    # None: unknown (no processing check).
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    architecture: str = "standard"
    k: int | None = None  # topk
    rescale_acts_by_decoder_norm: bool = False  # topk
    reshape_activations: str | None = None  # "hook_z": input [..., head, d_head] flattened (default for hook_z)
    norm_scaling_factor: float | None = None  # expected_average_only_in
    hook_layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other cfg.json fields, kept for saving

    def __post_init__(self) -> None:
        if self.architecture == "batchtopk":  # SAELens runs (and saves) a BatchTopK SAE as a JumpReLU
            self.architecture = "jumprelu"
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; known: {sorted(ARCHITECTURES) + ['batchtopk']}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalize_activations={self.normalize_activations!r}; known: {NORMALIZATIONS}"
                + (
                    ". Fold the whitening into the weights first (SAELens's "
                    "fold_activation_whitening) and set it to 'none'"
                    if "whiten" in str(self.normalize_activations)
                    else ""
                )
            )
        if self.architecture == "topk" and not self.k:
            raise ValueError("a topk SAE needs k (the number of active features per token) in its config")
        if self.reshape_activations is None:
            self.reshape_activations = "hook_z" if self.hook_name.endswith("hook_z") else "none"
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")
        if self.hook_layer is None:
            self.hook_layer = sites.split_name(self.hook_name)[0]

    @property
    def expected_processing(self) -> tuple[str, ...] | None:
        """The processing steps of the model this SAE was trained on (None if unknown)."""
        if self.model_from_pretrained_kwargs is None:
            return None
        return tuple(s for s in PROCESSING_STEPS if self.model_from_pretrained_kwargs.get(s, False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Read a SAELens cfg.json: flat (SAELens <= 5) or with a ``metadata``/``meta`` block (6+)."""
        meta = {**d.get("meta", {}), **d.get("metadata", {})}

        def get(key: str, default: Any = None) -> Any:
            return d[key] if d.get(key) is not None else meta.get(key, default)

        act = d.get("activation_fn_str", d.get("activation_fn", "relu"))
        arch = d.get("architecture") or "standard"
        if act == "topk" and arch == "standard":  # SAELens <= 5: topk as an activation of a standard SAE
            arch = "topk"
        elif act not in ("relu", "topk", None):
            raise ValueError(f"SAE activation {act!r} is not supported; known: relu (standard, gated, jumprelu), topk")
        k = d.get("k") or (d.get("activation_fn_kwargs") or {}).get("k")
        if get("hook_head_index") is not None:
            raise ValueError("SAEs on a single head (hook_head_index) are not supported")
        hook_name = get("hook_name") or get("hook_point")
        if not hook_name:
            raise ValueError("the SAE config names no hook: it needs 'hook_name' (or the older 'hook_point')")
        known = {
            "d_in",
            "d_sae",
            "hook_name",
            "hook_point",
            "apply_b_dec_to_input",
            "normalize_activations",
            "dtype",
            "model_name",
            "model_from_pretrained_kwargs",
            "meta",
            "metadata",
            "architecture",
            "k",
            "rescale_acts_by_decoder_norm",
            "reshape_activations",
            "norm_scaling_factor",
            "hook_layer",
        }
        return cls(
            d_in=int(d["d_in"]),
            d_sae=int(d["d_sae"]),
            hook_name=hook_name,
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
            normalize_activations=d.get("normalize_activations") or "none",
            dtype=str(d.get("dtype", "float32")).replace("torch.", ""),
            model_name=get("model_name", "") or "",
            model_from_pretrained_kwargs=get("model_from_pretrained_kwargs"),
            architecture=arch,
            k=int(k) if k else None,
            rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm", False)),
            reshape_activations=d.get("reshape_activations"),
            norm_scaling_factor=d.get("norm_scaling_factor"),
            hook_layer=get("hook_layer"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """SAELens-compatible: flat fields plus the ``metadata`` block newer SAELens reads."""
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        meta: dict[str, Any] = {k: d[k] for k in ("model_name", "hook_name", "model_from_pretrained_kwargs") if k in d}
        if "hook_layer" in d:
            meta["hook_layer"] = d["hook_layer"]
        return {**self.extra, **d, "metadata": meta}


# The SAE ------------------------------------------------------------------------------
class SAE(HookedRootModule):
    """An SAE of any of SAELens's architectures (see the module docstring). Hook points
    (SAELens names): ``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post`` (the
    features), ``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``."""

    bandwidth = 0.05  # JumpReLU training: width of the rectangle kernel (SAELens's default)
    # Declared for the type checker only: parameters only some architectures have (set from
    # ``Activation.params`` in __init__), and the per-step losses ``train_sae`` records.
    b_enc: nn.Parameter
    threshold: nn.Parameter
    training_log: list[float]

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        self.activation = ARCHITECTURES[cfg.architecture]
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        for name, dim in self.activation.params.items():
            setattr(self, name, nn.Parameter(torch.zeros(getattr(cfg, dim), dtype=dtype)))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.setup_hooks()
        self._norm_state: tuple[torch.Tensor, ...] | None = None
        self._head_shape: tuple[int, ...] | None = None
        if cfg.normalize_activations == "expected_average_only_in" and cfg.norm_scaling_factor is None:
            warnings.warn(
                "normalize_activations='expected_average_only_in' without norm_scaling_factor: the "
                "activations are used unscaled (as SAELens does); set cfg.norm_scaling_factor = "
                "sqrt(d_in) / E||x|| of the training data",
                stacklevel=2,
            )

    @classmethod
    def for_model(
        cls,
        model: Any,
        hook_name: str,
        d_sae: int,
        d_in: int | None = None,
        seed: int = 0,
        architecture: str = "standard",
        k: int | None = None,
        dtype: str = "float32",
        **cfg: Any,
    ) -> "SAE":
        """A freshly initialised SAE for ``model``'s site, recording the model's processing.

        Init as SAELens's defaults: decoder rows of norm 0.1 in random directions,
        ``W_enc = W_dec.T``, zero biases (JumpReLU thresholds 0.001).
        """
        names = model.resolve_hook_names(hook_name)
        if d_in is None:
            d_in = site_width(model, names[0])
        kwargs = {s: s in model.cfg.processing for s in PROCESSING_STEPS}
        config = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            hook_name=hook_name,
            model_name=model.cfg.model_name,
            model_from_pretrained_kwargs=kwargs,
            architecture=architecture,
            k=k,
            dtype=dtype,
            **cfg,
        )
        sae = cls(config).to(model.device)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(d_sae, d_in, generator=gen)
            sae.W_dec.copy_(0.1 * w / w.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            if hasattr(sae, "threshold"):
                threshold = sae.threshold
                assert isinstance(threshold, torch.Tensor)
                threshold.fill_(0.001)
        return sae

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # SAELens's conventions ----------------------------------------------------------
    def _hook(self, hook: HookPoint, x: torch.Tensor) -> torch.Tensor:
        return hook(x) if self._hooks_on else x

    _hooks_on = True

    @contextlib.contextmanager
    def _hooks_disabled(self) -> Iterator[None]:
        previous, self._hooks_on = self._hooks_on, False
        try:
            yield
        finally:
            self._hooks_on = previous

    def _flatten_heads(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.cfg.d_in:
            self._head_shape = None
            return x
        if self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.cfg.d_in:
            self._head_shape = tuple(x.shape[-2:])
            return x.flatten(-2)
        raise ValueError(f"the SAE has d_in={self.cfg.d_in}, but its input has shape {tuple(x.shape)}")

    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            s = self.cfg.norm_scaling_factor or 1.0
            self._norm_state = (torch.tensor(s, dtype=x.dtype, device=x.device),)
            return x * s
        if mode == "constant_norm_rescale":
            c = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            self._norm_state = (c,)
            return x * c
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            self._norm_state = (mu, std)
            return (x - mu) / (std + LN_EPS)
        return x

    def _norm_out(self, y: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "none":
            return y
        if self._norm_state is None:
            raise RuntimeError(
                f"decode() of an SAE with normalize_activations={mode!r} needs the statistics of "
                f"the encode() before it: call encode first (or forward)"
            )
        if mode == "layer_norm":
            mu, std = self._norm_state
            return y * std + mu
        return y / self._norm_state[0]

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """norm_in(x) - b_dec (when ``apply_b_dec_to_input``), after flattening heads."""
        sae_in = self._hook(self.hook_sae_input, self._flatten_heads(x.to(self.W_enc.dtype)))
        sae_in = self._norm_in(sae_in)
        return sae_in - self.b_dec if self.cfg.apply_b_dec_to_input else sae_in

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, pre-activations), both [..., d_sae]."""
        pre, post = self.activation.encode(self, self.process_sae_in(x))
        pre = self._hook(self.hook_sae_acts_pre, pre)
        return self._hook(self.hook_sae_acts_post, post), pre

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """The features of ``x`` (see the module docstring for each architecture)."""
        return self.encode_with_hidden_pre(x)[0]

    def decode(self, feature_acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """norm_out(feature_acts @ W_dec + b_dec), heads unflattened for hook_z SAEs."""
        scale = self.activation.decoder_scale(self)
        f = feature_acts if scale is None else feature_acts * scale
        out = self._norm_out(self._hook(self.hook_sae_recons, f @ self.W_dec + self.b_dec))
        return out.unflatten(-1, self._head_shape) if self._head_shape is not None else out

    def forward(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """decode(encode(x)); with ``use_error_term``, ``x + (recon - recon_clean)``, where
        recon_clean is the reconstruction without this SAE's hooks (so it is exactly x when
        no hook edits the features)."""
        recon = self.decode(self.encode(x))
        if self.use_error_term:
            if any(hp.observed for hp in self.hook_points()):
                with torch.no_grad(), self._hooks_disabled():
                    clean = self.decode(self.encode(x))
            else:
                clean = recon.detach()
            self._hook(self.hook_sae_error, (x.to(recon.dtype) - clean).detach())
            # The error term is a constant for autograd, as in SAELens; gradients reach x
            # only through the features.
            recon = x.detach().to(recon.dtype) + (recon - clean)
        return self._hook(self.hook_sae_output, recon)

    # Loading and saving -------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], cfg: SAEConfig | dict[str, Any]) -> "SAE":
        """From ``W_enc``, ``W_dec``, ``b_dec`` and the architecture's tensors (shapes checked)."""
        cfg = cfg if isinstance(cfg, SAEConfig) else SAEConfig.from_dict(cfg)
        state_dict = dict(state_dict)
        if "log_threshold" in state_dict and "threshold" not in state_dict:  # older SAELens JumpReLU
            state_dict["threshold"] = state_dict.pop("log_threshold").exp()
        if "topk_threshold" in state_dict and "threshold" not in state_dict:  # a BatchTopK training checkpoint
            state_dict["threshold"] = state_dict.pop("topk_threshold").reshape(()).expand(cfg.d_sae).clone()
        sae = cls(cfg)
        expected = {n: tuple(p.shape) for n, p in sae.named_parameters()}
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise KeyError(
                f"SAE state dict lacks {missing} (a {cfg.architecture} SAE has {sorted(expected)}); "
                f"it has {sorted(state_dict)}"
            )
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(state_dict[name].shape)}, expected {shape} "
                    f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                )
        sae.load_state_dict({n: state_dict[n] for n in expected})
        return sae

    @classmethod
    def load_from_disk(cls, path: str | Path, device: Any = None, **overrides: Any) -> "SAE":
        """A local SAE directory or file, in any of these layouts:

        - SAELens: ``cfg.json`` + ``sae_weights.safetensors``;
        - Gemma Scope: ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``;
          JumpReLU, no b_dec on the input). It carries no config: pass ``hook_name=...``
          (and any other SAEConfig field) as keyword arguments;
        - Llama Scope: ``hyperparams.json`` + ``checkpoints/final.safetensors``.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if path.name == "params.npz" or (path / "params.npz").is_file():
            sae = load_gemma_scope(path if path.name == "params.npz" else path / "params.npz", **overrides)
        elif (path / "hyperparams.json").is_file():
            sae = load_llama_scope(path, **overrides)
        else:
            for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
                if not (path / name).is_file():
                    raise FileNotFoundError(
                        f"{path} has no {name}; a SAELens SAE directory holds "
                        f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} (Gemma Scope: params.npz; "
                        f"Llama Scope: hyperparams.json and checkpoints/final.safetensors)"
                    )
            cfg = SAEConfig.from_dict({**json.loads((path / SAE_CFG_FILENAME).read_text()), **overrides})
            sae = cls.from_state_dict(load_file(str(path / SAE_WEIGHTS_FILENAME)), cfg)
        return sae.to(device) if device is not None else sae

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` (SAELens's layout)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights, cfg = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
        save_file({n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}, str(weights))
        cfg.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        return weights, cfg


def load_gemma_scope(path: str | Path, hook_name: str | None = None, **cfg: Any) -> SAE:
    """A Gemma Scope ``params.npz``: JumpReLU, ``f = h * 1[h > threshold]``,
    ``h = ReLU(x @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``."""
    import numpy as np

    if not hook_name:
        raise ValueError(
            "a params.npz file names no hook: pass hook_name=..., e.g. 'blocks.12.hook_resid_post' "
            "(Gemma Scope's res SAEs), 'blocks.12.hook_mlp_out' (mlp) or 'blocks.12.attn.hook_z' (att)"
        )
    with np.load(path) as data:
        state = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])).float() for k in data}
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError("this params.npz has a finetuning scaling_factor other than 1, which is not supported")
    d_in, d_sae = state["W_enc"].shape
    config = SAEConfig(
        d_in=d_in, d_sae=d_sae, hook_name=hook_name, architecture="jumprelu", apply_b_dec_to_input=False, **cfg
    )
    return SAE.from_state_dict(state, config)


def load_llama_scope(path: str | Path, **cfg: Any) -> SAE:
    """A Llama Scope directory (``hyperparams.json``, ``checkpoints/final.safetensors`` with
    ``encoder.weight`` [d_sae, d_in] etc.), converted as SAELens does: JumpReLU with one
    threshold ``jump_relu_threshold * s`` and ``expected_average_only_in`` with
    ``s = sqrt(d_in) / dataset_average_activation_norm['in']``."""
    from safetensors.torch import load_file

    path = Path(path)
    hp = json.loads((path / "hyperparams.json").read_text())
    raw = load_file(str(path / "checkpoints" / "final.safetensors"))
    d_in, d_sae = int(hp["d_model"]), int(hp["d_sae"])
    s = d_in**0.5 / float(hp["dataset_average_activation_norm"]["in"])
    state = {
        "W_enc": raw["encoder.weight"].T.float(),
        "W_dec": raw["decoder.weight"].T.float(),
        "b_enc": raw["encoder.bias"].float(),
        "b_dec": raw["decoder.bias"].float(),
        "threshold": torch.full((d_sae,), float(hp["jump_relu_threshold"]) * s),
    }
    config = SAEConfig(
        **{
            "d_in": d_in,
            "d_sae": d_sae,
            "hook_name": hp["hook_point_in"],
            "architecture": "jumprelu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "expected_average_only_in",
            "norm_scaling_factor": s,
            **cfg,
        }
    )
    return SAE.from_state_dict(state, config)


def site_width(model: Any, site: str) -> int:
    """The per-position width of ``site`` (heads flattened): what an SAE there has as d_in.

    Measured with a one-token forward that stops after the site's block."""
    layer = sites.layer_of(site)
    stop = layer + 1 if layer is not None else None
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    seen: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: HookPoint) -> None:
        seen["x"] = act

    with torch.no_grad(), model.hooks(fwd_hooks=[(site, keep)]):
        model(tok, return_type=None, stop_at_layer=stop, prepend_bos=False)
    act = seen["x"]
    if site.endswith(("hook_attn_scores", "hook_pattern")):
        raise ValueError(f"{site} is per (query, key) pair, not per position: no SAE or harvest runs on it")
    return math.prod(act.shape[2:])
