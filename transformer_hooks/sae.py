"""Sparse autoencoders (SAEs) on a hook site: load, splice into the model, evaluate.

A standard ReLU SAE with SAELens's parameter names and conventions:

    encode(x) = ReLU((x - b_dec) @ W_enc + b_enc)        [..., d_sae]   (b_dec subtracted
                                                                          when apply_b_dec_to_input)
    decode(f) = f @ W_dec + b_dec                          [..., d_in]
    forward(x) = decode(encode(x))  (+ the error term x - decode(encode(x)) with use_error_term)

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

On disk it is SAELens's layout: a directory with ``cfg.json`` (``d_in``, ``d_sae``,
``hook_name``, ``apply_b_dec_to_input``, ``model_from_pretrained_kwargs``, ...) and
``sae_weights.safetensors``. Only ``normalize_activations="none"`` and the ReLU
("standard") architecture are supported; other SAELens SAEs fail to load with a message.

Splicing replaces the site's activation with its reconstruction for every forward in a
``with splice_sae(model, sae):`` block. With ``use_error_term=True`` the reconstruction
error is added back, computed as ``x + (recon - recon_clean)``: without edits to the
SAE's features the site keeps exactly its clean value (bit for bit), while gradients
flow through the features as in SAELens.

Weight processing and SAEs. SAELens trains on ``from_pretrained_no_processing(model,
**model_from_pretrained_kwargs)``, so an SAE expects exactly the processing steps its
``model_from_pretrained_kwargs`` turns on. What each step changes at each site (exact
algebra, checked against the real models in tests/test_sae.py):

==========================  ==========================================================
step                        sites whose values change
==========================  ==========================================================
fold_ln, LayerNorm model    ``ln1/ln2/ln_final.hook_normalized`` only: taken before the
                            norm's weight and bias instead of after (the weight and
                            bias moved into W_Q/W_K/W_V/W_in/W_U). Nothing else.
fold_ln, RMSNorm model      nothing: ``hook_normalized`` is before the weight in both
                            forms, and the weight moves into the next matmul exactly.
center_writing_weights      LayerNorm models only (skipped for RMSNorm): every write to
                            the residual stream has zero mean over d_model, so every
                            residual-stream site becomes ``x - mean(x)``:
                            ``hook_embed``, ``hook_pos_embed``, ``hook_resid_pre/mid/
                            post``, ``hook_attn_out``, ``hook_mlp_out``, ``hook_mlp_in``,
                            ``hook_attn_in``, ``hook_q/k/v_input``, ``attn.hook_result``.
                            Everything read through a LayerNorm is unchanged (the norm
                            centres its input anyway), and so is ``hook_scale``.
fold_value_biases           ``attn.hook_v`` and ``attn.hook_z`` lose ``b_V``, and
                            ``attn.hook_result`` loses ``b_V @ W_O`` per head (moved into
                            ``b_O``, exact because attention rows sum to one);
                            ``hook_attn_out`` is unchanged. No-op without value biases.
center_unembed              no hook site; logits shift by a per-position constant
                            (log-probs unchanged).
==========================  ==========================================================

So a residual-stream SAE trained on an unprocessed Llama-family model (SmolLM2, Llama)
works on a processed one unchanged, while on GPT-2, GPT-Neo or Pythia
``center_writing_weights`` removes the mean of every residual activation the SAE sees.
``check_sae_processing`` warns exactly when a mismatched step changes the SAE's site.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from tqdm.auto import tqdm

from .hooks import HookedRootModule, HookPoint
from .processing import STEPS

if TYPE_CHECKING:
    from .model import HookedTransformer


SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
PROCESSING_STEPS = STEPS  # processing.py's step names, in order

_RESIDUAL_SITES = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "attn.hook_result",
)


def sites_changed_by(step: str, normalization_type: str) -> dict[str, str]:
    """Hook-name suffixes whose values ``step`` changes on a model with this norm, and how.

    ``normalization_type`` is the model's (``LN``/``LNPre`` or ``RMS``/``RMSPre``). See the
    module docstring for the algebra.
    """
    if step not in PROCESSING_STEPS:
        raise ValueError(f"unknown processing step {step!r}; known: {PROCESSING_STEPS}")
    layer_norm = normalization_type.startswith("LN")
    if step == "fold_ln":
        return {"hook_normalized": "taken before the norm's weight and bias instead of after"} if layer_norm else {}
    if step == "center_writing_weights":
        return {s: "centred: x - mean(x) over d_model" for s in _RESIDUAL_SITES} if layer_norm else {}
    if step == "fold_value_biases":
        return {
            "attn.hook_v": "b_V removed",
            "attn.hook_z": "b_V removed",
            "attn.hook_result": "b_V @ W_O removed per head (moved into b_O)",
        }
    return {}  # center_unembed


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
    extra: dict[str, Any] = field(default_factory=dict)  # other cfg.json fields, kept for saving

    def __post_init__(self) -> None:
        if self.normalize_activations != "none":
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported (only 'none'); "
                f"for 'expected_average_only_in' fold the scaling factor s into the weights "
                f"(W_enc * s, W_dec / s, b_dec / s) and set it to 'none'"
            )

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

        arch = d.get("architecture", "standard")
        if arch != "standard":
            raise ValueError(f"SAE architecture {arch!r} is not supported; this module runs standard ReLU SAEs")
        act = d.get("activation_fn_str", d.get("activation_fn", "relu"))
        if act not in ("relu", None):
            raise ValueError(f"SAE activation {act!r} is not supported; this module runs ReLU SAEs")
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
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """SAELens-compatible: flat fields, the ``metadata`` block newer SAELens reads, ``architecture``."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        meta = {k: d[k] for k in ("model_name", "hook_name", "model_from_pretrained_kwargs")}
        return {**self.extra, **d, "architecture": "standard", "metadata": meta}


# The SAE ------------------------------------------------------------------------------
class SAE(HookedRootModule):
    """A standard ReLU SAE. Hook points (SAELens names): ``hook_sae_input``,
    ``hook_sae_acts_pre``, ``hook_sae_acts_post`` (the features), ``hook_sae_recons``,
    ``hook_sae_error``, ``hook_sae_output``."""

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.setup_hooks()

    @classmethod
    def for_model(
        cls, model: HookedTransformer, hook_name: str, d_sae: int, d_in: int | None = None, seed: int = 0
    ) -> "SAE":
        """A freshly initialised SAE for ``model``'s site, recording the model's processing.

        Init as SAELens's defaults: decoder rows of norm 0.1 in random directions,
        ``W_enc = W_dec.T``, zero biases.
        """
        model.resolve_hook_names(hook_name)
        kwargs = {s: s in model.cfg.processing for s in PROCESSING_STEPS}
        cfg = SAEConfig(
            d_in=d_in or model.cfg.d_model,
            d_sae=d_sae,
            hook_name=hook_name,
            model_name=model.cfg.model_name,
            model_from_pretrained_kwargs=kwargs,
        )
        sae = cls(cfg).to(model.device)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(d_sae, cfg.d_in, generator=gen)
            sae.W_dec.copy_(0.1 * w / w.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
        return sae

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

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """ReLU((x - b_dec) @ W_enc + b_enc), b_dec subtracted when ``apply_b_dec_to_input``."""
        sae_in = self._hook(self.hook_sae_input, x.to(self.W_enc.dtype))
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        pre = self._hook(self.hook_sae_acts_pre, sae_in @ self.W_enc + self.b_enc)
        return self._hook(self.hook_sae_acts_post, F.relu(pre))

    def decode(self, feature_acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """feature_acts @ W_dec + b_dec."""
        return self._hook(self.hook_sae_recons, feature_acts @ self.W_dec + self.b_dec)

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
        """From ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (shapes checked) and a config."""
        cfg = cfg if isinstance(cfg, SAEConfig) else SAEConfig.from_dict(cfg)
        sae = cls(cfg)
        expected = {n: tuple(p.shape) for n, p in sae.named_parameters()}
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise KeyError(f"SAE state dict lacks {missing}; it has {sorted(state_dict)}")
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(state_dict[name].shape)}, expected {shape} "
                    f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                )
        sae.load_state_dict({n: state_dict[n] for n in expected})
        return sae

    @classmethod
    def load_from_disk(cls, path: str | Path, device: Any = None) -> "SAE":
        """A SAELens-style directory: ``cfg.json`` and ``sae_weights.safetensors``."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path} has no {name}; a SAELens SAE directory holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
                )
        cfg = SAEConfig.from_dict(json.loads((path / SAE_CFG_FILENAME).read_text()))
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


# Processing check ----------------------------------------------------------------------
def check_sae_processing(model: HookedTransformer, sae: SAE, warn: bool = True) -> list[str]:
    """Problems from a mismatch between the model's weight processing and the SAE's.

    One message per processing step that one side has and the other lacks *and* that
    changes the values at the SAE's site (see the module docstring); warned unless
    ``warn=False``. Nothing when the SAE does not say how its model was loaded.
    """
    expected = sae.cfg.expected_processing
    if expected is None:
        return []
    applied = tuple(model.cfg.processing)
    problems = []
    for step in PROCESSING_STEPS:
        if (step in expected) == (step in applied):
            continue
        changed = sites_changed_by(step, model.cfg.normalization_type)
        how = next((how for suffix, how in changed.items() if sae.cfg.hook_name.endswith(suffix)), None)
        if how is None:
            continue
        trained = "with" if step in expected else "without"
        problems.append(
            f"the SAE on {sae.cfg.hook_name} was trained on a model loaded {trained} {step}, but this model was "
            f"loaded {'with' if step in applied else 'without'} it, which changes this site ({how}). Load the model "
            f"as the SAE expects: HookedTransformer.from_pretrained_no_processing(name, "
            f"**{sae.cfg.model_from_pretrained_kwargs})"
        )
    if warn:
        for p in problems:
            warnings.warn(p, stacklevel=3)
    return problems


# Splicing -----------------------------------------------------------------------------
def _to_sae_shape(act: torch.Tensor, d_in: int, name: str) -> torch.Tensor:
    if act.shape[-1] == d_in:
        return act
    if act.ndim >= 2 and act.shape[-2] * act.shape[-1] == d_in:  # hook_z SAEs: heads flattened
        return act.flatten(-2)
    raise ValueError(
        f"the SAE has d_in={d_in}, but {name} has shape {tuple(act.shape)}; was it trained on another site or model?"
    )


Positions = slice | Sequence[int] | None


def _chosen(n_pos: int, positions: Positions, device: Any) -> torch.Tensor:
    """A [pos] bool mask of the chosen positions (all when None)."""
    chosen = torch.zeros(n_pos, dtype=torch.bool, device=device)
    index = positions if positions is None or isinstance(positions, slice) else list(positions)
    chosen[slice(None) if index is None else index] = True
    return chosen


def sae_splice_hook(sae: SAE, positions: Positions = None):
    """A hook function replacing the activation by ``sae(activation)`` (same shape and
    dtype), at ``positions`` of each forward's input (all when None)."""

    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        chosen = act if positions is None else act[:, positions]
        out = sae(_to_sae_shape(chosen, sae.cfg.d_in, hook.name)).reshape(chosen.shape).to(act.dtype)
        if positions is None:
            return out
        act = act.clone()
        act[:, positions] = out
        return act

    return hook


@contextlib.contextmanager
def splice_sae(
    model: HookedTransformer,
    sae: SAE,
    use_error_term: bool | None = None,
    positions: Positions = None,
    check: bool = True,
) -> Iterator[SAE]:
    """Every forward in the block runs with ``sae.cfg.hook_name`` replaced by its
    reconstruction (plus the error term if ``use_error_term``; default: the SAE's own
    setting), at ``positions`` (default all; ``slice(1, None)`` leaves the first token
    alone, e.g. an attention sink the SAE was not trained on). Checks the weight
    processing first (``check_sae_processing``)."""
    names = model.resolve_hook_names(sae.cfg.hook_name)
    if check:
        check_sae_processing(model, sae)
    previous = sae.use_error_term
    if use_error_term is not None:
        sae.use_error_term = use_error_term
    try:
        with model.hooks(fwd_hooks=[(names[0], sae_splice_hook(sae, positions))]):
            yield sae
    finally:
        sae.use_error_term = previous


# Evaluation ---------------------------------------------------------------------------
@dataclass
class SAEEvaluation:
    """Reconstruction and downstream metrics, over the real (non-padding) tokens.

    mse: mean of (x - x_hat)^2 over tokens and d_in. l0: mean number of active features
    per token. explained_variance: 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2.
    ce_loss_recovered: (zero_ablation_loss - spliced_loss) / (zero_ablation_loss - clean_loss):
    1 when splicing costs nothing, 0 when it is as bad as zeroing the site.
    """

    mse: float
    l0: float
    explained_variance: float
    clean_loss: float
    spliced_loss: float
    zero_ablation_loss: float
    ce_loss_recovered: float
    n_tokens: int

    def __str__(self) -> str:
        return "\n".join(
            f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}" for k, v in asdict(self).items()
        )


def _zero_hook(positions: Positions):
    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return act * ~_chosen(act.shape[1], positions, act.device).reshape(-1, *[1] * (act.ndim - 2))

    return hook


def _loss_sum(nll: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum and count of next-token losses [batch, pos-1] over predictions of real tokens."""
    valid = torch.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return float((nll * valid).sum()), int(valid.sum())


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch pos"] | str | list[str],
    batch_size: int = 8,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    positions: Positions = None,
    check: bool = True,
) -> SAEEvaluation:
    """Splice ``sae`` into ``model`` on ``tokens`` (or strings; padded lists count only
    their real tokens) and report reconstruction MSE, L0, explained variance, and the
    next-token loss clean, spliced and with the site zeroed. ``positions``: splice, zero
    and measure the reconstruction only there (e.g. ``slice(1, None)``: not the first
    token); the losses are over every prediction."""
    site = model.resolve_hook_names(sae.cfg.hook_name)[0]
    if check:
        check_sae_processing(model, sae)
    tokens, mask = model.tokens_and_mask(tokens, attention_mask=attention_mask)
    assert isinstance(tokens, torch.Tensor)
    n = n_pred = 0
    sq_err = l0 = clean = spliced = zero = 0.0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=sae.W_enc.device)
    sum_sq = 0.0
    loss_kwargs: dict[str, Any] = dict(return_type="loss", loss_per_token=True)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluating SAE", leave=False, delay=1.0):
        tok = tokens[start : start + batch_size]
        m = mask[start : start + batch_size] if mask is not None else None
        nll, cache = model.run_with_cache(tok, attention_mask=m, names_filter=site, **loss_kwargs)
        x = _to_sae_shape(cache[site], sae.cfg.d_in, site).to(sae.W_enc.dtype)
        measured = _chosen(tok.shape[1], positions, x.device)[None] & (
            torch.ones(tok.shape, dtype=torch.bool, device=x.device) if m is None else m.bool()
        )
        x = x[measured]  # [tokens, d_in]
        feats = sae.encode(x)
        sq_err += float((x - sae.decode(feats)).double().pow(2).sum())
        l0 += float((feats > 0).sum())
        n += x.shape[0]
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())

        batch_clean, batch_pred = _loss_sum(nll, m)
        with splice_sae(model, sae, use_error_term=False, positions=positions, check=False):
            batch_spliced, _ = _loss_sum(model(tok, attention_mask=m, **loss_kwargs), m)
        with model.hooks(fwd_hooks=[(site, _zero_hook(positions))]):
            batch_zero, _ = _loss_sum(model(tok, attention_mask=m, **loss_kwargs), m)
        clean, spliced, zero = clean + batch_clean, spliced + batch_spliced, zero + batch_zero
        n_pred += batch_pred
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
    clean, spliced, zero = clean / max(n_pred, 1), spliced / max(n_pred, 1), zero / max(n_pred, 1)
    return SAEEvaluation(
        mse=sq_err / (n * sae.cfg.d_in),
        l0=l0 / n,
        explained_variance=1 - sq_err / total_var if total_var > 0 else math.nan,
        clean_loss=clean,
        spliced_loss=spliced,
        zero_ablation_loss=zero,
        ce_loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else math.nan,
        n_tokens=n,
    )


# Training (a small loop for notebooks and tests, not a SAELens replacement) ------------
def train_sae(
    sae: SAE,
    activations: Float[torch.Tensor, "n d_in"],
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    l1_coefficient: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Adam on ``||x - x_hat||^2 (summed over d_in) + l1 * sum_i f_i ||W_dec[i]||``, SAELens's
    standard loss. ``b_dec`` starts at the activations' mean. Returns the loss per step."""
    activations = activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device, sae.W_enc.dtype).detach()
    with torch.no_grad():
        sae.b_dec.copy_(activations.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="training SAE", leave=False, delay=1.0):
        batch = activations[torch.randint(0, activations.shape[0], (batch_size,), generator=gen)]
        feats = sae.encode(batch)
        recon = sae.decode(feats)
        mse = (recon - batch).pow(2).sum(-1).mean()
        sparsity = (feats * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = mse + l1_coefficient * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
