"""The SAE module: SAELens's architectures and normalisations (reading its files: formats.py).

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
``encode`` and used by the next ``decode`` (as in SAELens) of the same thread; ``forward``
keeps them within the call, so threads may share an SAE.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from .. import sites
from ..hooks import HookedRootModule, HookPoint
from ..processing import STEPS
from ..protocol import HookedModel
from .formats import (
    DTYPE_SPELLINGS,
    config_fields,
    read_gemma_scope,
    read_llama_scope,
    read_sae_files,
    write_sae_files,
)

PROCESSING_STEPS = STEPS  # processing.py's step names, in order
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
LN_EPS = 1e-5


# Architectures: the activation of each, and its extra parameters ------------------------
class Activation:
    """An architecture's activation: ``encode(sae, sae_in) -> (pre, post)``; ``params``: its extra tensors beyond
    W_enc/W_dec/b_dec.
    """

    params: dict[str, str] = {"b_enc": "d_sae"}

    def encode(self, sae: "SAE", sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-activations and feature activations of ``sae`` on ``sae_in``.

        Args:
            sae: the SAE whose parameters are read.
            sae_in: the input, already normalised and centred, [..., d_in].

        Returns:
            (pre-activations, feature activations), both [..., d_sae].
        """
        raise NotImplementedError

    def decoder_scale(self, sae: "SAE") -> torch.Tensor | None:
        """A [d_sae] factor the features of ``sae`` are multiplied by before decoding (None: 1)."""
        return None


class ReLUActivation(Activation):
    """The standard SAE: ``ReLU(sae_in @ W_enc + b_enc)``."""

    def encode(self, sae, sae_in):
        """``(pre, ReLU(pre))`` with ``pre = sae_in @ W_enc + b_enc`` of ``sae`` (see ``Activation.encode``)."""
        pre = sae_in @ sae.W_enc + sae.b_enc
        return pre, F.relu(pre)


class GatedActivation(Activation):
    """The gated SAE: a gate path (``b_gate``) and a magnitude path (``r_mag``, ``b_mag``)."""

    params = {"b_gate": "d_sae", "b_mag": "d_sae", "r_mag": "d_sae"}

    def encode(self, sae, sae_in):
        """``(pre, gate * ReLU(pre))``: ``pre`` the magnitude path of ``sae`` on ``sae_in``, ``gate`` =
        ``1[sae_in @ W_enc + b_gate > 0]`` (see ``Activation.encode``).
        """
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
    """JumpReLU: ``pre`` where it exceeds ``threshold``, else 0 (straight-through gradient of width ``bandwidth``)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The Heaviside step ``pre > threshold`` (straight-through gradient of width ``bandwidth``), for the L0 penalty."""
    return _Step.apply(pre, threshold, bandwidth)


class JumpReLUActivation(Activation):
    """JumpReLU: ``h * 1[h > threshold]`` with one threshold per feature."""

    params = {"b_enc": "d_sae", "threshold": "d_sae"}

    def encode(self, sae, sae_in):
        """``(pre, ReLU(pre) * 1[pre > threshold])`` of ``sae`` on ``sae_in``; while training with
        gradients, straight-through threshold gradients (see ``Activation.encode``).
        """
        pre = sae_in @ sae.W_enc + sae.b_enc
        if sae.training and torch.is_grad_enabled():
            return pre, jumprelu(pre, sae.threshold, sae.bandwidth)  # straight-through threshold gradients
        return pre, F.relu(pre) * (pre > sae.threshold).to(pre.dtype)


class TopKActivation(Activation):
    """TopK: the k largest pre-activations per token, ReLU'd; the others 0."""

    def encode(self, sae, sae_in):
        """``(pre, topk(pre))`` of ``sae`` on ``sae_in``: the ``cfg.k`` largest pre-activations kept
        (after ReLU), the rest zero; with ``rescale_acts_by_decoder_norm``, ``pre`` is scaled by the
        decoder rows' norms first (see ``Activation.encode``).
        """
        pre = sae_in @ sae.W_enc + sae.b_enc
        if sae.cfg.rescale_acts_by_decoder_norm:
            pre = pre * sae.W_dec.norm(dim=-1)
        top = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        return pre, torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def decoder_scale(self, sae):
        """``1 / ||W_dec[i]||`` of ``sae`` with ``rescale_acts_by_decoder_norm``, else None."""
        return 1 / sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None


ARCHITECTURES: dict[str, Activation] = {
    "standard": ReLUActivation(),
    "gated": GatedActivation(),
    "jumprelu": JumpReLUActivation(),
    "topk": TopKActivation(),
}


# What one call carries from encode to decode: the normalisation's statistics and the head shape.
class _CallState(NamedTuple):
    stats: tuple[torch.Tensor, ...] | None
    heads: tuple[int, ...] | None


_LAST_ENCODE = threading.local()


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
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAE config field {name!r} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_SPELLINGS:
            raise ValueError(
                f"SAE config field 'dtype' must name a float dtype, got {self.dtype!r}; accepted: "
                f"{sorted(DTYPE_SPELLINGS)}"
            )
        self.dtype = DTYPE_SPELLINGS[self.dtype]
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
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1):
            raise ValueError(f"SAE config field 'k' must be a positive int, got {self.k!r}")
        if self.architecture == "topk" and self.k is not None and self.k > self.d_sae:
            raise ValueError(f"SAE config field 'k' is {self.k}, more than d_sae={self.d_sae} features to choose from")
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
        """Read a SAELens cfg.json ``d`` (flat, SAELens <= 5, or with a ``metadata`` block, 6+), every
        field's type checked: a ValueError names the field (see ``formats.config_from_dict``).
        """
        return cls(**config_fields(d))

    def to_dict(self) -> dict[str, Any]:
        """SAELens-compatible: flat fields plus the ``metadata`` block newer SAELens reads."""
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        meta: dict[str, Any] = {k: d[k] for k in ("model_name", "hook_name", "model_from_pretrained_kwargs") if k in d}
        if "hook_layer" in d:
            meta["hook_layer"] = d["hook_layer"]
        return {**self.extra, **d, "metadata": meta}


# The SAE ------------------------------------------------------------------------------
class SAE(HookedRootModule):
    """An SAE of any of SAELens's architectures (see the module docstring).

    Hook points (SAELens names): ``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``
    (the features), ``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``.

    Args:
        cfg: the architecture, sizes and normalisation (parameters start at zero; see ``for_model``,
            ``load_from_disk``).
        use_error_term: ``forward`` returns ``x`` plus the change the hooks make to the
            reconstruction (so the model runs unchanged unless a hook edits the features).
    """

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
        model: HookedModel,
        hook_name: str,
        d_sae: int,
        d_in: int | None = None,
        seed: int = 0,
        architecture: str = "standard",
        k: int | None = None,
        dtype: str = "float32",
        **cfg: Any,
    ) -> "SAE":
        """A freshly initialised SAE for a site of ``model``, recording the model's processing.

        Init as SAELens's defaults: decoder rows of norm 0.1 in random directions,
        ``W_enc = W_dec.T``, zero biases (JumpReLU thresholds 0.001).

        Args:
            model: the model it reads (its device, processing and, without ``d_in``, the site's width).
            hook_name: the site (a hook name).
            d_sae: the number of features.
            d_in: the input width (None: measured, ``site_width``).
            seed: the seed of the decoder's directions.
            architecture: ``"standard"``, ``"gated"``, ``"jumprelu"``, ``"topk"`` or ``"batchtopk"``.
            k: the features kept per token (topk).
            dtype: the parameters' dtype name.
            **cfg: any other ``SAEConfig`` field.
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
        """The device of the parameters."""
        return self.W_enc.device

    # SAELens's conventions ----------------------------------------------------------
    def _hook(self, hook: HookPoint, x: torch.Tensor) -> torch.Tensor:
        return x if id(self) in getattr(_LAST_ENCODE, "hooks_off", ()) else hook(x)

    @contextlib.contextmanager
    def _hooks_disabled(self) -> Iterator[None]:
        """This SAE's hooks off in this thread (another thread's call still runs them)."""
        off = getattr(_LAST_ENCODE, "hooks_off", None)
        if off is None:
            off = _LAST_ENCODE.hooks_off = set()
        already = id(self) in off
        off.add(id(self))
        try:
            yield
        finally:
            if not already:
                off.discard(id(self))

    def _flatten_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """x [..., d_in] (hook_z: [..., head, d_head] flattened), and the head shape to restore."""
        if x.shape[-1] == self.cfg.d_in:
            return x, None
        if self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.cfg.d_in:
            return x.flatten(-2), tuple(x.shape[-2:])
        raise ValueError(f"the SAE has d_in={self.cfg.d_in}, but its input has shape {tuple(x.shape)}")

    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """norm_in(x), and the statistics norm_out needs."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            s = self.cfg.norm_scaling_factor or 1.0
            return x * s, (torch.tensor(s, dtype=x.dtype, device=x.device),)
        if mode == "constant_norm_rescale":
            c = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * c, (c,)
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + LN_EPS), (mu, std)
        return x, None

    def _norm_out(self, y: torch.Tensor, stats: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "none":
            return y
        if stats is None:
            raise RuntimeError(
                f"decode() of an SAE with normalize_activations={mode!r} needs the statistics of "
                f"the encode() before it: call encode first (or forward)"
            )
        if mode == "layer_norm":
            mu, std = stats
            return y * std + mu
        return y / stats[0]

    def _sae_in(self, x: torch.Tensor) -> tuple[torch.Tensor, _CallState]:
        flat, heads = self._flatten_heads(x.to(self.W_enc.dtype))
        sae_in, stats = self._norm_in(self._hook(self.hook_sae_input, flat))
        sae_in = sae_in - self.b_dec if self.cfg.apply_b_dec_to_input else sae_in
        return sae_in, _CallState(stats, heads)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _CallState]:
        sae_in, state = self._sae_in(x)
        pre, post = self.activation.encode(self, sae_in)
        pre = self._hook(self.hook_sae_acts_pre, pre)
        return self._hook(self.hook_sae_acts_post, post), pre, state

    def _decode(self, feature_acts: torch.Tensor, state: _CallState | None) -> torch.Tensor:
        scale = self.activation.decoder_scale(self)
        f = feature_acts if scale is None else feature_acts * scale
        out = self._norm_out(self._hook(self.hook_sae_recons, f @ self.W_dec + self.b_dec), state and state.stats)
        return out.unflatten(-1, state.heads) if state is not None and state.heads is not None else out

    # encode() then decode() (SAELens's API): the statistics of this thread's last encode
    # of this SAE, kept per thread, so that threads sharing an SAE never see each other's.
    def _remember(self, state: _CallState) -> None:
        by_sae = getattr(_LAST_ENCODE, "by_sae", None)
        if by_sae is None:
            by_sae = _LAST_ENCODE.by_sae = weakref.WeakKeyDictionary()
        by_sae[self] = state

    def _recall(self) -> _CallState | None:
        by_sae = getattr(_LAST_ENCODE, "by_sae", None)
        return None if by_sae is None else by_sae.get(self)

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """norm_in(x) - b_dec (when ``apply_b_dec_to_input``), after flattening heads."""
        sae_in, state = self._sae_in(x)
        self._remember(state)
        return sae_in

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, pre-activations) of ``x`` [..., d_in], both [..., d_sae]."""
        post, pre, state = self._encode(x)
        self._remember(state)
        return post, pre

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """The features of ``x`` (see the module docstring for each architecture)."""
        return self.encode_with_hidden_pre(x)[0]

    def decode(self, feature_acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """norm_out(feature_acts @ W_dec + b_dec), heads unflattened for hook_z SAEs (with the
        statistics of this thread's last ``encode`` of this SAE)."""
        return self._decode(feature_acts, self._recall())

    def forward(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """decode(encode(x)); with ``use_error_term``, ``x + (recon - recon_clean)``, where
        recon_clean is the reconstruction without this SAE's hooks (so it is exactly x when
        no hook edits the features)."""
        feats, _, state = self._encode(x)  # the statistics stay in this call
        recon = self._decode(feats, state)
        if self.use_error_term:
            if any(hp.observed for hp in self.hook_points()):
                with torch.no_grad(), self._hooks_disabled():
                    clean_feats, _, clean_state = self._encode(x)
                    clean = self._decode(clean_feats, clean_state)
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
        """An SAE with the tensors of ``state_dict`` (``W_enc``, ``W_dec``, ``b_dec`` and the architecture's own).

        Args:
            state_dict: the tensors; an older SAELens ``log_threshold`` or a BatchTopK ``topk_threshold``
                is converted to ``threshold``.
            cfg: an ``SAEConfig`` or a cfg.json dict.

        Raises:
            KeyError: a tensor the architecture needs is missing.
            ValueError: a tensor's shape does not match ``d_in``/``d_sae``.
        """
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
        """A local SAE directory or file (see ``formats.read_sae_files``).

        Layouts: SAELens (``cfg.json`` + ``sae_weights.safetensors``), Gemma Scope (``params.npz``:
        pass ``hook_name=...``), Llama Scope (``hyperparams.json`` + ``checkpoints/final.safetensors``).

        Args:
            path: the directory or file.
            device: where to put the SAE (None: the CPU).
            **overrides: ``SAEConfig`` fields that replace the file's (or, for Gemma Scope, supply them).
        """
        state, cfg = read_sae_files(path, **overrides)
        sae = cls.from_state_dict(state, SAEConfig(**cfg))
        return sae.to(device) if device is not None else sae

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` (SAELens's layout) to the directory ``path``;
        returns their paths.
        """
        return write_sae_files(path, dict(self.named_parameters()), self.cfg.to_dict())


def load_gemma_scope(path: str | Path, hook_name: str | None = None, **cfg: Any) -> SAE:
    """The Gemma Scope SAE in ``path`` (a ``params.npz``; see ``formats.read_gemma_scope``).

    Args:
        path: the file or its directory.
        hook_name: the site it reads (the file does not say; required).
        **cfg: other ``SAEConfig`` fields.
    """
    state, config = read_gemma_scope(path, hook_name, **cfg)
    return SAE.from_state_dict(state, SAEConfig(**config))


def load_llama_scope(path: str | Path, **cfg: Any) -> SAE:
    """The Llama Scope SAE in the directory ``path`` (see ``formats.read_llama_scope``); ``**cfg``:
    other ``SAEConfig`` fields.
    """
    state, config = read_llama_scope(path, **cfg)
    return SAE.from_state_dict(state, SAEConfig(**config))


def site_width(model: HookedModel, site: str) -> int:
    """The per-position width of ``site`` in ``model`` (heads flattened): what an SAE there has as d_in.

    Measured with a one-token forward that stops after the site's block. ValueError for the
    attention pattern and scores (per query-key pair). Split over processes
    (``pipeline_ranks``): every rank calls it and gets the width (the rank that runs the site
    measures it).
    """
    layer = sites.layer_of(site)
    stop = layer + 1 if layer is not None else None
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    seen: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: HookPoint) -> None:
        seen[site] = act

    with torch.no_grad(), model.hooks(fwd_hooks=[(site, keep)]):
        model(tok, return_type=None, stop_at_layer=stop, prepend_bos=False)
    if site.endswith(("hook_attn_scores", "hook_pattern")):
        raise ValueError(f"{site} is per (query, key) pair, not per position: no SAE or harvest runs on it")
    # Split over processes, the site's activation goes to rank 0 and its width to every rank
    # (on one process both steps hand the values back).
    got = model.blocks.from_sites(seen, [site])
    width = None if got is None else {"width": torch.tensor(math.prod(got[site].shape[2:]))}
    return int(model.blocks.share(width)["width"])
