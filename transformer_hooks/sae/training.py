"""Training SAEs with the published recipes (a compact loop, not a SAELens replacement).

Loss per token, x [d_in], x_hat its reconstruction, f the features (mean over the batch)::

    standard   ||x - x_hat||^2 + l1(t) * sum_i f_i ||W_dec[i]||        (decoder="norm_weighted",
               SAELens/Anthropic April 2024), or + l1(t) * sum_i f_i with unit-norm decoder
               rows kept by projection (decoder="unit_norm", Anthropic 2023 / Bricken et al.)
    jumprelu   ||x - x_hat||^2 + l0(t) * sum_i H(pre_i - theta_i)        (Rajamanoharan et al. 2024)
               straight-through gradients with the rectangle kernel K(u) = 1[|u| < 1/2]:
               d f_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps),
               d H / d theta_i  = -(1 / eps) K((pre_i - theta_i) / eps)
    topk       ||x - x_hat||^2 + aux * ||e - e_hat||^2 / ||e - mean(e)||^2   (Gao et al. 2024): e = x - x_hat,
    batchtopk  e_hat = W_dec applied to the top k_aux pre-activations of the dead features
               (no b_dec); batchtopk keeps the k * batch largest activations over the whole
               batch and is saved as a JumpReLU whose threshold is the running mean of the
               smallest kept activation (Bussmann et al. 2024, as SAELens saves it)

Ghost gradients (standard SAEs, ``ghost_grads=True``; Anthropic, January 2024): the dead
features' ``exp(pre)`` decoded, rescaled to half the residual's norm, fit the residual
``e = x - x_hat``; the loss is rescaled to the size of the MSE, and only the dead features
get its gradient. Variants: ``ghost_grads_dead_fraction=True`` also scales the loss by the
fraction of features that are dead; ``ghost_grads_clamp=True`` uses ``exp(min(pre, 0))``
(never above 1, so it cannot overflow).

Decoder rows: ``decoder="norm_weighted"`` (free norms, the L1 term weighted by them),
``"unit_norm"`` (every row kept at norm 1) or ``"max_unit_norm"`` (rows kept at norm <= 1,
rows above 1 scaled back after each step; plain L1).

l1(t), l0(t) rise linearly from 0 over ``l1_warm_up_steps``; the learning rate rises
linearly over ``lr_warm_up_steps``; Adam with ``adam_beta1`` (0 is a recipe). Dead
features (no activation over ``dead_window`` steps) of standard SAEs are resampled every
``resample_every`` steps (Anthropic 2023): the decoder row becomes the normalised input of
a high-loss token (drawn with probability ~ loss^2), the encoder column that direction
times 0.2 * the mean encoder norm of live features, the bias 0, and Adam's state for them 0.
Never in the final stretch of training (SAELens's rule): a resample must leave at least
``resample_every`` steps, and a tenth of all steps, after it for the new features to settle
(``resample_steps`` lists when it happens); a resample at the end would return an SAE whose
fresh features fire on everything.

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps): the SAE, Adam's state,
the dead-feature counters, the random generators and the log, as safetensors + JSON (never
pickle), written atomically. Calling ``train_sae`` again with the same arguments resumes
from the last checkpoint and ends with the same weights, bit for bit, as an uninterrupted
run; a checkpoint made with other arguments or data is refused, naming what differs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..progress import tqdm
from ..protocol import HookedModel
from .core import SAE, jumprelu, step  # noqa: F401  (jumprelu, step: re-exported)

ARCHITECTURES_TRAINED = ("standard", "jumprelu", "topk", "batchtopk")
DECODERS = ("norm_weighted", "unit_norm", "max_unit_norm")
CHECKPOINT_VERSION = 1


def resample_steps(steps: int, resample_every: int | None) -> list[int]:
    """The steps (1-based counts of steps done) after which dead features are resampled:
    every ``resample_every`` steps, never within the last ``max(resample_every, steps // 10)``."""
    if not resample_every:
        return []
    settle = max(resample_every, steps // 10)
    return [t for t in range(resample_every, steps + 1, resample_every) if steps - t >= settle]


def _rows_of(source: Any) -> int:
    return int(source.shape[0]) if isinstance(source, torch.Tensor) else len(source)


def _batches(source: Any, site: str | None, batch_size: int, seed: int, device: Any) -> Iterator[torch.Tensor]:
    """Endless shuffled batches [batch, d_in] from a tensor or an ActivationDataset (with at
    least ``batch_size`` rows: ``train_sae`` checks, and lowers ``batch_size`` to the rows there are)."""
    epoch = 0
    if isinstance(source, torch.Tensor):
        gen = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(source.shape[0], generator=gen).split(batch_size):
                if len(idx) == batch_size or source.shape[0] < batch_size:
                    yield source[idx].to(device)
    while True:
        yield from source.batches(site, batch_size, shuffle=True, seed=seed + epoch, device=device, drop_last=True)
        epoch += 1


def _harvest_in_memory(model: HookedModel, site: str, data: Any, batch_size: int = 8) -> torch.Tensor:
    tokens, mask = model.tokens_and_mask(data)
    rows = []
    for s in range(0, tokens.shape[0], batch_size):
        m = None if mask is None else mask[s : s + batch_size]
        _, cache = model.run_with_cache(
            tokens[s : s + batch_size], attention_mask=m, names_filter=site, return_type=None
        )
        act = cache[site].flatten(2) if cache[site].ndim == 4 else cache[site]
        rows.append(act.reshape(-1, act.shape[-1]) if m is None else act[m.bool()])
    return torch.cat(rows).float()


def train_sae(
    source: Any,
    site: Any = None,
    d_sae: int | None = None,
    architecture: str = "standard",
    *,
    data: Any = None,
    k: int | None = None,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    l1_coefficient: float = 1e-3,
    l0_coefficient: float = 1e-3,
    decoder: str = "norm_weighted",
    l1_warm_up_steps: int = 0,
    lr_warm_up_steps: int = 0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    aux_coefficient: float = 1 / 32,
    dead_window: int = 50,
    resample_every: int | None = None,
    jumprelu_bandwidth: float = 0.05,
    jumprelu_init_threshold: float = 0.001,
    ghost_grads: bool = False,
    ghost_grads_dead_fraction: bool = False,
    ghost_grads_clamp: bool = False,
    seed: int = 0,
    save_to: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    device: Any = None,
) -> Any:
    """Train an SAE on a site's activations; see the module docstring for each recipe.

    Returns the trained SAE (its per-step losses in ``sae.training_log``), saved in SAELens's
    layout to ``save_to`` if given. The older form ``train_sae(sae, activations, ...)`` trains
    that SAE in place on a tensor with the standard loss and returns the list of losses.

    Sizes are checked before anything runs: ``steps >= 0``, ``batch_size >= 1``, and some
    rows to train on (zero rows is an error); a source with fewer rows than ``batch_size``
    trains on batches of all its rows, with a warning.

    Args:
        source: an ``ActivationDataset`` (the SAE records its model and processing), a tensor
            [n, d_in], or a model (its activations at ``site`` over ``data``, harvested in memory).
        site: the hook name: one of the dataset's sites, the name to record for a tensor, or
            the model's site.
        d_sae: the number of features.
        architecture: ``"standard"``, ``"jumprelu"``, ``"topk"`` or ``"batchtopk"``.
        data: with a model as ``source``: the tokens or strings to run it on.
        k: active features per token (topk, batchtopk).
        steps: optimisation steps.
        batch_size: activation rows per step.
        lr: Adam's learning rate.
        l1_coefficient: the sparsity penalty's weight (standard).
        l0_coefficient: the L0 penalty's weight (jumprelu).
        decoder: ``"norm_weighted"``, ``"unit_norm"`` or ``"max_unit_norm"`` (standard).
        l1_warm_up_steps: steps over which the L1/L0 weight rises from 0.
        lr_warm_up_steps: steps over which the learning rate rises from 0.
        adam_beta1: Adam's beta1 (0 is a recipe).
        adam_beta2: Adam's beta2.
        aux_coefficient: the weight of topk's auxiliary loss on dead features.
        dead_window: steps without an activation after which a feature counts as dead.
        resample_every: resample dead features every this many steps (standard; None: never).
        jumprelu_bandwidth: the rectangle kernel's width eps (jumprelu).
        jumprelu_init_threshold: every threshold's initial value (jumprelu).
        ghost_grads: add the ghost-gradient loss (standard).
        ghost_grads_dead_fraction: also scale it by the fraction of dead features.
        ghost_grads_clamp: ``exp(min(pre, 0))`` instead of ``exp(pre)``.
        seed: the seed of the initialisation and the batches.
        save_to: a directory to save the trained SAE to.
        checkpoint_dir: where checkpoints go (see the module docstring; resume by calling again).
        checkpoint_every: steps between checkpoints.
        progress: a progress bar.
        device: where to train (default: the dataset's CPU, the tensor's or the model's device).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if resample_every is not None and (not isinstance(resample_every, int) or resample_every < 1):
        raise ValueError(f"resample_every must be None or an integer >= 1, got {resample_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    # The training loop with this call's recipe (both forms below train with it).
    fit = functools.partial(
        _fit,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        l1_coefficient=l1_coefficient,
        l0_coefficient=l0_coefficient,
        decoder=decoder,
        l1_warm_up_steps=l1_warm_up_steps,
        lr_warm_up_steps=lr_warm_up_steps,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        aux_coefficient=aux_coefficient,
        dead_window=dead_window,
        resample_every=resample_every,
        seed=seed,
        progress=progress,
        ghost_grads=ghost_grads,
        ghost_grads_dead_fraction=ghost_grads_dead_fraction,
        ghost_grads_clamp=ghost_grads_clamp,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        checkpoint_every=checkpoint_every,
    )
    if isinstance(source, SAE):  # the older form: train_sae(sae, activations)
        sae = source
        acts = site.reshape(-1, sae.cfg.d_in).to(sae.device, sae.W_enc.dtype).detach()
        fit(sae, acts, None, "standard", None, batch_size=_batch_for(acts, batch_size))
        return sae.training_log
    if architecture not in ARCHITECTURES_TRAINED:
        raise ValueError(f"unknown architecture {architecture!r} to train; known: {ARCHITECTURES_TRAINED}")
    if architecture in ("topk", "batchtopk") and not k:
        raise ValueError(f"a {architecture} SAE needs k, the number of active features per token")
    if d_sae is None or site is None:
        raise ValueError("train_sae needs the site and d_sae, e.g. train_sae(dataset, 'blocks.3.hook_resid_post', 512)")
    from ..scale.dataset import ActivationDataset
    from .core import PROCESSING_STEPS, SAEConfig

    meta: dict[str, Any] = {}
    if isinstance(source, ActivationDataset):
        site = source._site(site)
        d_in = source.width(site)
        meta = {
            "model_name": source.manifest["model_name"],
            "model_from_pretrained_kwargs": {s: s in source.manifest["processing"] for s in PROCESSING_STEPS},
        }
        device = device or "cpu"
    elif isinstance(source, torch.Tensor):
        d_in = source.shape[-1]
        source = source.reshape(-1, d_in)
        device = device or source.device
    else:  # a model
        model = source
        site = model.resolve_hook_names(site)[0]
        if data is None:
            raise ValueError("training from a model needs data=... (tokens or strings) to harvest activations from")
        with torch.no_grad():
            source = _harvest_in_memory(model, site, data)
        d_in = source.shape[-1]
        meta = {
            "model_name": model.cfg.model_name,
            "model_from_pretrained_kwargs": {s: s in model.cfg.processing for s in PROCESSING_STEPS},
        }
        device = device or model.device
    batch_size = _batch_for(source, batch_size)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        hook_name=site,
        architecture="topk" if architecture in ("topk", "batchtopk") else architecture,
        k=k,
        **meta,
    )
    sae = SAE(cfg).to(device)
    sae.bandwidth = jumprelu_bandwidth
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(0.1 * w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        if architecture == "jumprelu":
            sae.threshold.fill_(jumprelu_init_threshold)
    batch_threshold = fit(sae, source, site, architecture, k, batch_size=batch_size)
    if architecture == "batchtopk":  # inference form: a JumpReLU with the learnt global threshold
        state = {n: p.detach() for n, p in sae.named_parameters()}
        state["threshold"] = torch.full((d_sae,), float(batch_threshold), device=device)
        log = sae.training_log
        sae = SAE.from_state_dict(state, SAEConfig(**{**cfg.__dict__, "architecture": "jumprelu", "k": k}))
        sae.training_log = log
    if save_to is not None:
        sae.save_model(save_to)
    return sae


def _batch_for(source: Any, batch_size: int) -> int:
    """``batch_size``, or all the rows when there are fewer; zero rows is an error."""
    n = _rows_of(source)
    if n == 0:
        raise ValueError("train_sae got no activations to train on (0 rows): harvest some data first")
    if n < batch_size:
        import warnings

        warnings.warn(
            f"only {n} rows to train on, fewer than batch_size={batch_size}: each batch is all {n} rows", stacklevel=3
        )
        return n
    return batch_size


def _fit(
    sae: SAE,
    source: Any,
    site: str | None,
    architecture: str,
    k: int | None,
    steps: int,
    batch_size: int,
    lr: float,
    l1_coefficient: float,
    l0_coefficient: float,
    decoder: str,
    l1_warm_up_steps: int,
    lr_warm_up_steps: int,
    adam_beta1: float,
    adam_beta2: float,
    aux_coefficient: float,
    dead_window: int,
    resample_every: int | None,
    seed: int,
    progress: bool,
    ghost_grads: bool = False,
    ghost_grads_dead_fraction: bool = False,
    ghost_grads_clamp: bool = False,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 100,
) -> float:
    """The training loop; returns BatchTopK's threshold (nan otherwise)."""
    batches = _batches(source, site, batch_size, seed, sae.device)
    first = next(batches)
    with torch.no_grad():
        sae.b_dec.copy_(first.to(sae.W_dec.dtype).mean(0))
        if decoder == "unit_norm":
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        elif decoder == "max_unit_norm":
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1.0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(adam_beta1, adam_beta2))
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
    resample_gen = torch.Generator(device=sae.device).manual_seed(seed + 1)
    resample_at = set(resample_steps(steps, resample_every)) if architecture == "standard" else set()
    batch_threshold = math.nan
    sae.training_log = []
    start = 0
    ckpt = None
    if checkpoint_dir is not None:
        recipe = dict(
            architecture=architecture, k=k, steps=steps, batch_size=batch_size, lr=lr,
            l1_coefficient=l1_coefficient, l0_coefficient=l0_coefficient, decoder=decoder,
            l1_warm_up_steps=l1_warm_up_steps, lr_warm_up_steps=lr_warm_up_steps, adam_beta1=adam_beta1,
            adam_beta2=adam_beta2, aux_coefficient=aux_coefficient, dead_window=dead_window,
            resample_every=resample_every, seed=seed, ghost_grads=ghost_grads,
            ghost_grads_dead_fraction=ghost_grads_dead_fraction, ghost_grads_clamp=ghost_grads_clamp,
            d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, site=site, dtype=str(sae.W_dec.dtype),
            data=_fingerprint(source),
        )  # fmt: skip
        ckpt = _Checkpoint(checkpoint_dir, recipe)
        state = ckpt.load()
        if state is not None:
            start = state["step"]
            batch_threshold = math.nan if state["batch_threshold"] is None else state["batch_threshold"]
            _restore(sae, opt, since_fired, resample_gen, state)
            sae.training_log = state["log"]
            for _ in range(start):  # the same batches as an uninterrupted run from here on
                x = next(batches)
    sae.train()
    bar = tqdm(range(start, steps), desc=f"training {architecture} SAE", leave=False, delay=1.0, disable=not progress)
    x = first if start == 0 else x
    for t in bar:
        x = x.to(sae.W_dec.dtype)
        warm = min(1.0, (t + 1) / l1_warm_up_steps) if l1_warm_up_steps else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * (min(1.0, (t + 1) / lr_warm_up_steps) if lr_warm_up_steps else 1.0)
        sae_in = sae.process_sae_in(x)
        if architecture == "batchtopk":
            assert k is not None  # train_sae requires k for topk and batchtopk
            pre = torch.relu(sae_in @ sae.W_enc + sae.b_enc)
            flat = pre.flatten()
            top = flat.topk(min(k * x.shape[0], flat.numel()))
            feats = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)
            kept = top.values[top.values > 0]
            if kept.numel():
                low = float(kept.detach().min())
                batch_threshold = low if math.isnan(batch_threshold) else 0.99 * batch_threshold + 0.01 * low
        else:
            feats, pre = sae.encode_with_hidden_pre(x)
        recon = sae.decode(feats)
        err = x - recon
        mse = err.pow(2).sum(-1).mean()
        loss = mse
        if architecture == "standard":
            weight = sae.W_dec.norm(dim=-1) if decoder == "norm_weighted" else 1.0
            loss = loss + warm * l1_coefficient * (feats * weight).sum(-1).mean()
        elif architecture == "jumprelu":
            loss = loss + warm * l0_coefficient * step(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
        active = (feats > 0).any(0)
        since_fired = torch.where(active, 0, since_fired + 1)
        dead = since_fired >= dead_window
        if ghost_grads and architecture == "standard" and dead.any():
            ghost = ghost_loss(sae, pre, err, dead, mse, clamp=ghost_grads_clamp)
            loss = loss + (ghost * dead.float().mean() if ghost_grads_dead_fraction else ghost)
        if architecture in ("topk", "batchtopk") and dead.any():
            k_aux = min(int(dead.sum()), max(sae.cfg.d_in // 2, 1))
            dead_pre = torch.where(dead, pre, torch.full_like(pre, -math.inf))
            top = dead_pre.topk(k_aux, dim=-1)
            aux_feats = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            e_hat = aux_feats @ sae.W_dec
            target = err.detach()
            denom = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            loss = loss + aux_coefficient * (e_hat - target).pow(2).sum(-1).mean() / denom
        opt.zero_grad()
        loss.backward()
        if decoder == "unit_norm":  # remove the gradient along each decoder row (it would only change its norm)
            with torch.no_grad():
                unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
                sae.W_dec.grad -= (sae.W_dec.grad * unit).sum(-1, keepdim=True) * unit
        opt.step()
        with torch.no_grad():
            if decoder == "unit_norm":
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
            elif decoder == "max_unit_norm":
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1.0))
            if hasattr(sae, "threshold"):
                sae.threshold.clamp_(min=0.0)
            if t + 1 in resample_at and dead.any():
                _resample(sae, opt, dead, x, err, resample_gen)
                since_fired[dead] = 0
        sae.training_log.append(loss.item())
        if progress and t % 10 == 0:
            bar.set_postfix(
                loss=f"{loss.item():.4g}",
                L0=f"{float((feats > 0).sum(-1).float().mean()):.1f}",
                dead=f"{float(dead.float().mean()):.2f}",
            )
        if t + 1 < steps:
            x = next(batches)
        if ckpt is not None and ((t + 1) % checkpoint_every == 0 or t + 1 == steps):
            ckpt.save(t + 1, sae, opt, since_fired, resample_gen, batch_threshold)
    sae.eval()
    return batch_threshold


def ghost_loss(
    sae: SAE, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, mse: torch.Tensor, clamp: bool = False
) -> torch.Tensor:
    """The ghost-gradient loss (see the module docstring); gradients reach only the dead features.

    ``sae``: the SAE; ``pre`` [batch, d_sae]: its pre-activations; ``err`` [batch, d_in]: the
    residual ``x - x_hat``; ``dead`` [d_sae]: which features are dead; ``mse``: the batch's
    reconstruction loss the result is scaled to; ``clamp``: ``exp(min(pre, 0))`` instead of ``exp(pre)``.
    """
    dead_pre = pre[:, dead]
    ghost = (dead_pre.clamp(max=0) if clamp else dead_pre).exp() @ sae.W_dec[dead]  # [batch, d_in]
    scale = err.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)
    ghost_mse = (ghost * scale.detach() - err.detach()).pow(2).sum(-1).mean()
    return ghost_mse * (mse / (ghost_mse + 1e-6)).detach()


@torch.no_grad()
def _resample(
    sae: SAE,
    opt: torch.optim.Optimizer,
    dead: torch.Tensor,
    x: torch.Tensor,
    err: torch.Tensor,
    generator: torch.Generator | None = None,
) -> None:
    """Anthropic's resampling of dead features on the current batch (see the module docstring)."""
    idx = dead.nonzero().squeeze(-1)
    weights = err.pow(2).sum(-1)
    weights = weights.pow(2) if weights.sum() > 0 else torch.ones_like(weights)
    picks = torch.multinomial(weights, len(idx), replacement=True, generator=generator)
    direction = x[picks] - sae.b_dec
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = direction * sae.W_dec[alive].norm(dim=-1).mean() if alive.any() else direction
    sae.W_enc[:, idx] = (direction * 0.2 * enc_norm).T
    sae.b_enc[idx] = 0
    for p, rows in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0


def _fingerprint(source: Any) -> str:
    """What identifies the training data: a content hash of a tensor, a dataset's manifest."""
    h = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        h.update(str((tuple(source.shape), source.dtype)).encode())
        h.update(source.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(json.dumps(source.manifest, sort_keys=True, default=str).encode())
    return h.hexdigest()


class _Checkpoint:
    """One training run's checkpoint, one file replaced atomically: ``state.safetensors``
    holds the SAE, Adam's state, the dead-feature counters and the generator; its metadata
    ``state`` the step, log and recipe as JSON."""

    def __init__(self, directory: Path, recipe: dict[str, Any]) -> None:
        self.directory, self.recipe = directory, recipe
        self.path = directory / "state.safetensors"

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
            tensors = load_file(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"the SAE training checkpoint {self.path} is unreadable ({e}); delete it to start over"
            ) from None
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.path} is checkpoint version {meta.get('version')!r}; delete it to start over")
        differs = sorted(k for k in {*self.recipe, *meta["recipe"]} if self.recipe.get(k) != meta["recipe"].get(k))
        if differs:
            shown = ", ".join(f"{k}: {meta['recipe'].get(k)!r} -> {self.recipe.get(k)!r}" for k in differs)
            raise ValueError(
                f"the SAE training checkpoint in {self.directory} was made by another run ({shown}); resume with "
                f"the same arguments and data, or delete the directory (or pass another checkpoint_dir) to start over"
            )
        return {**meta, "tensors": tensors}

    def save(
        self,
        step_done: int,
        sae: SAE,
        opt: torch.optim.Optimizer,
        since_fired: torch.Tensor,
        resample_gen: torch.Generator,
        batch_threshold: float,
    ) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"sae.{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
        names = {id(p): n for n, p in sae.named_parameters()}
        for p, state in opt.state.items():
            for key, value in state.items():
                tensors[f"adam.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["since_fired"] = since_fired.cpu().contiguous()
        tensors["resample_generator"] = resample_gen.get_state().contiguous()
        meta = {
            "version": CHECKPOINT_VERSION,
            "step": step_done,
            "batch_threshold": None if math.isnan(batch_threshold) else batch_threshold,
            "log": sae.training_log,
            "recipe": self.recipe,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
        os.replace(tmp, self.path)  # a kill leaves the previous checkpoint or this one, never half of one


@torch.no_grad()
def _restore(
    sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, resample_gen: torch.Generator, state: dict
) -> None:
    tensors = state["tensors"]
    for n, p in sae.named_parameters():
        p.copy_(tensors[f"sae.{n}"])
    for n, p in sae.named_parameters():
        keys = {k.rsplit(".", 1)[1] for k in tensors if k.startswith(f"adam.{n}.") and k.count(".") == n.count(".") + 2}
        if keys:
            opt.state[p] = {key: tensors[f"adam.{n}.{key}"].to(p.device) for key in keys}
            if "step" in opt.state[p]:
                opt.state[p]["step"] = opt.state[p]["step"].cpu()
    since_fired.copy_(tensors["since_fired"])
    resample_gen.set_state(tensors["resample_generator"])


__all__ = ["train_sae", "jumprelu", "step", "ghost_loss", "resample_steps"]
