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
get its gradient.

l1(t), l0(t) rise linearly from 0 over ``l1_warm_up_steps``; the learning rate rises
linearly over ``lr_warm_up_steps``; Adam with ``adam_beta1`` (0 is a recipe). Dead
features (no activation over ``dead_window`` steps) of standard SAEs are resampled every
``resample_every`` steps (Anthropic 2023): the decoder row becomes the normalised input of
a high-loss token (drawn with probability ~ loss^2), the encoder column that direction
times 0.2 * the mean encoder norm of live features, the bias 0, and Adam's state for them 0.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..progress import tqdm
from ..protocol import HookedModel
from .core import SAE, jumprelu, step  # noqa: F401  (jumprelu, step: re-exported)

ARCHITECTURES_TRAINED = ("standard", "jumprelu", "topk", "batchtopk")


def _batches(source: Any, site: str | None, batch_size: int, seed: int, device: Any) -> Iterator[torch.Tensor]:
    """Endless shuffled batches [batch, d_in] from a tensor or an ActivationDataset."""
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
    seed: int = 0,
    save_to: str | Path | None = None,
    progress: bool = True,
    device: Any = None,
) -> Any:
    """Train an SAE on a site's activations; see the module docstring for each recipe.

    ``source``: an ``ActivationDataset`` (``site`` one of its sites; the SAE records its
    model and processing), a tensor [n, d_in] (``site``: the hook name to record), or a
    model (its activations at ``site`` over ``data``, tokens or strings, harvested in
    memory). Returns the trained SAE (its per-step losses in ``sae.training_log``), saved
    in SAELens's layout to ``save_to`` if given.

    The older form ``train_sae(sae, activations, ...)`` trains that SAE in place on a
    tensor with the standard loss and returns the list of losses.
    """
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
    )
    if isinstance(source, SAE):  # the older form: train_sae(sae, activations)
        sae = source
        acts = site.reshape(-1, sae.cfg.d_in).to(sae.device, sae.W_enc.dtype).detach()
        fit(sae, acts, None, "standard", None)
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
    batch_threshold = fit(sae, source, site, architecture, k)
    if architecture == "batchtopk":  # inference form: a JumpReLU with the learnt global threshold
        state = {n: p.detach() for n, p in sae.named_parameters()}
        state["threshold"] = torch.full((d_sae,), float(batch_threshold), device=device)
        log = sae.training_log
        sae = SAE.from_state_dict(state, SAEConfig(**{**cfg.__dict__, "architecture": "jumprelu", "k": k}))
        sae.training_log = log
    if save_to is not None:
        sae.save_model(save_to)
    return sae


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
) -> float:
    """The training loop; returns BatchTopK's threshold (nan otherwise)."""
    if decoder not in ("norm_weighted", "unit_norm"):
        raise ValueError(f"decoder must be 'norm_weighted' or 'unit_norm', got {decoder!r}")
    for arg, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{arg} must be an int of at least {least}, got {value!r}")
    n_rows = source.shape[0] if isinstance(source, torch.Tensor) else len(source)
    if n_rows == 0:
        raise ValueError("there are no activation rows to train on (the dataset or tensor is empty)")
    if n_rows < batch_size:
        warnings.warn(
            f"only {n_rows} activation rows, fewer than batch_size={batch_size}: each batch is all of them",
            stacklevel=3,
        )
        batch_size = n_rows
    batches = _batches(source, site, batch_size, seed, sae.device)
    first = next(batches)
    with torch.no_grad():
        sae.b_dec.copy_(first.to(sae.W_dec.dtype).mean(0))
        if decoder == "unit_norm":
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(adam_beta1, adam_beta2))
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
    batch_threshold = math.nan
    sae.training_log = []
    sae.train()
    bar = tqdm(range(steps), desc=f"training {architecture} SAE", leave=False, delay=1.0, disable=not progress)
    x = first
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
            weight = 1.0 if decoder == "unit_norm" else sae.W_dec.norm(dim=-1)
            loss = loss + warm * l1_coefficient * (feats * weight).sum(-1).mean()
        elif architecture == "jumprelu":
            loss = loss + warm * l0_coefficient * step(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
        active = (feats > 0).any(0)
        since_fired = torch.where(active, 0, since_fired + 1)
        dead = since_fired >= dead_window
        if ghost_grads and architecture == "standard" and dead.any():
            loss = loss + ghost_loss(sae, pre, err, dead, mse)
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
            if hasattr(sae, "threshold"):
                sae.threshold.clamp_(min=0.0)
            if resample_every and architecture == "standard" and (t + 1) % resample_every == 0 and dead.any():
                _resample(sae, opt, dead, x, err)
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
    sae.eval()
    return batch_threshold


def ghost_loss(sae: SAE, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """The ghost-gradient loss (see the module docstring); gradients reach only the dead features."""
    ghost = pre[:, dead].exp() @ sae.W_dec[dead]  # [batch, d_in]
    scale = err.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)
    ghost_mse = (ghost * scale.detach() - err.detach()).pow(2).sum(-1).mean()
    return ghost_mse * (mse / (ghost_mse + 1e-6)).detach()


@torch.no_grad()
def _resample(sae: SAE, opt: torch.optim.Optimizer, dead: torch.Tensor, x: torch.Tensor, err: torch.Tensor) -> None:
    """Anthropic's resampling of dead features on the current batch (see the module docstring)."""
    idx = dead.nonzero().squeeze(-1)
    weights = err.pow(2).sum(-1)
    weights = weights.pow(2) if weights.sum() > 0 else torch.ones_like(weights)
    picks = torch.multinomial(weights, len(idx), replacement=True)
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


__all__ = ["train_sae", "jumprelu", "step", "ghost_loss"]
