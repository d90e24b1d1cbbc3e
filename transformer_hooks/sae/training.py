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
run; a checkpoint made with other arguments or data is refused, naming what differs
(``sae.checkpoint``).

Data-parallel under ``torchrun`` (``sae.data_parallel``): every rank trains on its own
``batch_size`` rows of each global batch of ``batch_size * world_size`` rows (the learning
rate, coefficients and windows mean what they mean for one process with that global
batch); gradients are averaged over the ranks, and the dead-feature counters, ghost
gradients' scale, TopK's auxiliary variance, BatchTopK's threshold and resampling use the
whole global batch, so every rank holds the same weights after every step. ``n`` ranks
equal one process with ``n`` times ``batch_size`` within float rounding (the sums are
taken in another order). Rank 0 writes the checkpoint, every rank reads it; the world size
is part of its key. ``gloo`` on CPUs, NCCL on GPUs (each rank on its own).

Harvested datasets are streamed shard by shard, never loaded whole (``sae.stream``):
rows are shuffled within windows of ``shuffle_window`` rows of consecutive shards, and each
rank reads only its own rows. Tracking (``sae.tracking``): ``log_to_wandb=True`` or
``tensorboard_dir=``, off by default, rank 0 only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..progress import tqdm
from ..protocol import HookedModel
from ..scale.process_group import init_distributed, launched_by_torchrun, local_device
from .checkpoint import CHECKPOINT_VERSION, Checkpoint, fingerprint, restore  # noqa: F401  (the version: re-exported)
from .core import SAE, jumprelu, step  # noqa: F401  (jumprelu, step: re-exported)
from .data_parallel import Ranks
from .stream import DEFAULT_WINDOW, RankBatches
from .tracking import Tracker

ARCHITECTURES_TRAINED = ("standard", "jumprelu", "topk", "batchtopk")
DECODERS = ("norm_weighted", "unit_norm", "max_unit_norm")


def resample_steps(steps: int, resample_every: int | None) -> list[int]:
    """The steps (1-based counts of steps done) after which dead features are resampled:
    every ``resample_every`` steps, never within the last ``max(resample_every, steps // 10)``."""
    if not resample_every:
        return []
    settle = max(resample_every, steps // 10)
    return [t for t in range(resample_every, steps + 1, resample_every) if steps - t >= settle]


def _rows_of(source: Any) -> int:
    return int(source.shape[0]) if isinstance(source, torch.Tensor) else len(source)


def _harvest_in_memory(model: HookedModel, site: str, data: Any, batch_size: int = 8) -> torch.Tensor:
    """The activations of ``site`` over ``data`` [rows, width], on every rank (split over
    processes, rank 0 gets the caches and shares the rows: every rank then trains on them)."""
    tokens, mask = model.tokens_and_mask(data)
    rows = []
    for s in range(0, tokens.shape[0], batch_size):
        m = None if mask is None else mask[s : s + batch_size]
        _, cache = model.run_with_cache(
            tokens[s : s + batch_size], attention_mask=m, names_filter=site, return_type=None
        )
        if cache is None:  # another rank of a split model: rank 0 gets the cache
            continue
        act = cache[site].flatten(2) if cache[site].ndim == 4 else cache[site]
        rows.append(act.reshape(-1, act.shape[-1]) if m is None else act[m.bool()])
    return model.blocks.share({"rows": torch.cat(rows).float()} if model.blocks.gets_output else None)["rows"]


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
    shuffle_window: int = DEFAULT_WINDOW,
    log_to_wandb: bool = False,
    wandb_project: str = "transformer_hooks_sae",
    wandb_entity: str | None = None,
    run_name: str | None = None,
    tensorboard_dir: str | Path | None = None,
    log_every: int = 10,
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

    Under ``torchrun`` (or in a process group already initialised) training is data-parallel:
    ``batch_size`` is per rank, the global batch is ``batch_size * world_size``; call it on
    every rank with the same arguments; every rank returns the same SAE and rank 0 alone
    writes ``save_to`` and the checkpoints. A model split over processes (``pipeline_ranks``)
    as ``source``: every rank calls it alike, rank 0 gathers the activations and shares them,
    and training is then data-parallel over the same ranks.

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
        batch_size: activation rows per step and rank (the global batch is ``batch_size * world_size``).
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
        shuffle_window: rows of a dataset shuffled together (``sae.stream``).
        log_to_wandb: log to Weights & Biases on rank 0 (``sae.tracking``; SAELens's name).
        wandb_project: the wandb project.
        wandb_entity: the wandb entity (user or team).
        run_name: the tracker's run name.
        tensorboard_dir: log to TensorBoard in this directory on rank 0.
        log_every: steps between logged metrics.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if resample_every is not None and (not isinstance(resample_every, int) or resample_every < 1):
        raise ValueError(f"resample_every must be None or an integer >= 1, got {resample_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
    if launched_by_torchrun():
        init_distributed()
    world = Ranks().world
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
        shuffle_window=shuffle_window,
        tracking=dict(
            log_to_wandb=log_to_wandb,
            wandb_project=wandb_project,
            wandb_entity=wandb_entity,
            run_name=run_name,
            tensorboard_dir=tensorboard_dir,
        ),
        log_every=log_every,
    )
    if isinstance(source, SAE):  # the older form: train_sae(sae, activations)
        sae = source
        acts = site.reshape(-1, sae.cfg.d_in).to(sae.device, sae.W_enc.dtype).detach()
        fit(sae, acts, None, "standard", None, batch_size=_batch_for(acts, batch_size, world))
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
        device = device or local_device()
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
    batch_size = _batch_for(source, batch_size, world)
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
    ranks = Ranks()
    if save_to is not None and ranks.rank == 0:
        sae.save_model(save_to)
    ranks.wait()  # every rank returns once rank 0 wrote the SAE
    return sae


def _batch_for(source: Any, batch_size: int, world: int = 1) -> int:
    """``batch_size``, or all the rows when there are fewer (one process); zero rows, or fewer
    rows than a global batch over several processes, is an error."""
    n = _rows_of(source)
    if n == 0:
        raise ValueError("train_sae got no activations to train on (0 rows): harvest some data first")
    if world > 1 and n < batch_size * world:
        raise ValueError(
            f"only {n} rows to train on, fewer than one global batch (batch_size={batch_size} per rank x "
            f"{world} ranks): lower batch_size to at most {n // world}, or harvest more data"
        )
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
    shuffle_window: int = DEFAULT_WINDOW,
    tracking: dict[str, Any] | None = None,
    log_every: int = 10,
) -> float:
    """The training loop; returns BatchTopK's threshold (nan otherwise)."""
    ranks = Ranks(
        "Nothing was saved: train with checkpoint_dir= to resume after a failure."
        if checkpoint_dir is None
        else f"Rerun the same command on every rank: training resumes from the last checkpoint in {checkpoint_dir}."
    )
    world = ranks.world
    recipe = dict(
        architecture=architecture, k=k, steps=steps, batch_size=batch_size, lr=lr,
        l1_coefficient=l1_coefficient, l0_coefficient=l0_coefficient, decoder=decoder,
        l1_warm_up_steps=l1_warm_up_steps, lr_warm_up_steps=lr_warm_up_steps, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, aux_coefficient=aux_coefficient, dead_window=dead_window,
        resample_every=resample_every, seed=seed, ghost_grads=ghost_grads,
        ghost_grads_dead_fraction=ghost_grads_dead_fraction, ghost_grads_clamp=ghost_grads_clamp,
        d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, site=site, dtype=str(sae.W_dec.dtype),
        world_size=world, global_batch_size=batch_size * world,
        shuffle_window=None if isinstance(source, torch.Tensor) else shuffle_window,
    )  # fmt: skip
    if checkpoint_dir is not None or ranks.many:
        recipe["data"] = fingerprint(source)
    ranks.agree(
        "the training arguments and data",
        hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest(),
        "Start every rank with the same train_sae arguments and the same data.",
    )
    ranks.broadcast_(sae.parameters())  # one start on every rank (the older form's SAE may differ)
    tracker = Tracker(**(tracking or {}), config=recipe, active=ranks.rank == 0)
    batches = RankBatches(source, site, batch_size, seed, sae.device, ranks.rank, world, shuffle_window)
    first = next(batches)
    with torch.no_grad():
        first = first.to(sae.W_dec.dtype)
        sae.b_dec.copy_(ranks.sum(first.sum(0)) / (batch_size * world) if ranks.many else first.mean(0))
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
        ckpt = Checkpoint(checkpoint_dir, recipe)
        state = ckpt.load()
        ranks.agree(
            f"the step to resume from (the checkpoint in {checkpoint_dir})",
            None if state is None else state["step"],
            "checkpoint_dir must be one directory every rank reads (a shared filesystem).",
        )
        if state is not None:
            start = state["step"]
            batch_threshold = math.nan if state["batch_threshold"] is None else state["batch_threshold"]
            restore(sae, opt, since_fired, resample_gen, state)
            sae.training_log = state["log"]
            if start > 0:  # the same batches as an uninterrupted run from here on
                batches.skip(start - 1)
                x = next(batches)
    sae.train()
    bar = tqdm(
        range(start, steps),
        desc=f"training {architecture} SAE",
        leave=False,
        delay=1.0,
        disable=not progress or ranks.rank != 0,
    )
    x = first if start == 0 else x
    del first  # held: this batch and, while it is read, the next
    try:
        for t in bar:
            x = x.to(sae.W_dec.dtype)
            warm = min(1.0, (t + 1) / l1_warm_up_steps) if l1_warm_up_steps else 1.0
            for group in opt.param_groups:
                group["lr"] = lr * (min(1.0, (t + 1) / lr_warm_up_steps) if lr_warm_up_steps else 1.0)
            sae_in = sae.process_sae_in(x)
            if architecture == "batchtopk":
                assert k is not None  # train_sae requires k for topk and batchtopk
                pre = torch.relu(sae_in @ sae.W_enc + sae.b_enc)
                if ranks.many:  # the k * global batch largest over every rank's rows
                    top_values = ranks.batch_top(pre, k * x.shape[0] * world)
                    feats = torch.where(pre >= top_values[-1], pre, torch.zeros_like(pre))
                else:
                    flat = pre.flatten()
                    top = flat.topk(min(k * x.shape[0], flat.numel()))
                    feats = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)
                    top_values = top.values
                kept = top_values[top_values > 0]
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
            fired = (feats > 0).detach()
            active = ranks.sum(fired.sum(0)) > 0 if ranks.many else fired.any(0)
            since_fired = torch.where(active, 0, since_fired + 1)
            dead = since_fired >= dead_window
            if ghost_grads and architecture == "standard" and dead.any():
                ghost = ghost_loss(
                    sae, pre, err, dead, ranks.mean(mse.detach()), clamp=ghost_grads_clamp, mean=ranks.mean
                )
                loss = loss + (ghost * dead.float().mean() if ghost_grads_dead_fraction else ghost)
            if architecture in ("topk", "batchtopk") and dead.any():
                k_aux = min(int(dead.sum()), max(sae.cfg.d_in // 2, 1))
                dead_pre = torch.where(dead, pre, torch.full_like(pre, -math.inf))
                top = dead_pre.topk(k_aux, dim=-1)
                aux_feats = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
                e_hat = aux_feats @ sae.W_dec
                target = err.detach()
                if ranks.many:  # the error's variance over the global batch
                    centre = ranks.mean(target.mean(0))
                    denom = ranks.mean((target - centre).pow(2).sum(-1).mean()).clamp_min(1e-12)
                else:
                    denom = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                loss = loss + aux_coefficient * (e_hat - target).pow(2).sum(-1).mean() / denom
            opt.zero_grad()
            loss.backward()
            l0 = fired.sum(-1).float().mean()
            loss_value, mse_value, l0_value = ranks.average_gradients(sae.parameters(), loss, mse, l0)
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
                if t + 1 in resample_at and dead.any():  # on the global batch, alike on every rank
                    _resample(sae, opt, dead, ranks.gather_rows(x), ranks.gather_rows(err), resample_gen)
                    since_fired[dead] = 0
            sae.training_log.append(loss_value)
            if progress and t % 10 == 0:
                bar.set_postfix(
                    loss=f"{loss_value:.4g}", L0=f"{l0_value:.1f}", dead=f"{float(dead.float().mean()):.2f}"
                )
            if (t + 1) % log_every == 0 or t + 1 == steps:
                tracker.log(
                    {
                        "losses/overall_loss": loss_value,
                        "losses/mse_loss": mse_value,
                        "metrics/l0": l0_value,
                        "sparsity/dead_features": int(dead.sum()),
                        "details/current_learning_rate": opt.param_groups[0]["lr"],
                        "details/n_training_tokens": (t + 1) * batch_size * world,
                    },
                    step=t + 1,
                )
            if t + 1 < steps:
                x = next(batches)
            if ckpt is not None and ranks.rank == 0 and ((t + 1) % checkpoint_every == 0 or t + 1 == steps):
                ckpt.save(t + 1, sae, opt, since_fired, resample_gen, batch_threshold)
    finally:
        tracker.close()
    sae.eval()
    return batch_threshold


def ghost_loss(
    sae: SAE,
    pre: torch.Tensor,
    err: torch.Tensor,
    dead: torch.Tensor,
    mse: torch.Tensor,
    clamp: bool = False,
    mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ghost-gradient loss (see the module docstring); gradients reach only the dead features.

    ``sae``: the SAE; ``pre`` [batch, d_sae]: its pre-activations; ``err`` [batch, d_in]: the
    residual ``x - x_hat``; ``dead`` [d_sae]: which features are dead; ``mse``: the batch's
    reconstruction loss the result is scaled to (data-parallel: the global batch's); ``clamp``:
    ``exp(min(pre, 0))`` instead of ``exp(pre)``; ``mean``: data-parallel, turns this rank's
    mean into the global batch's, so the rescaling is the global batch's.
    """
    dead_pre = pre[:, dead]
    ghost = (dead_pre.clamp(max=0) if clamp else dead_pre).exp() @ sae.W_dec[dead]  # [batch, d_in]
    scale = err.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)
    ghost_mse = (ghost * scale.detach() - err.detach()).pow(2).sum(-1).mean()
    whole = ghost_mse.detach() if mean is None else mean(ghost_mse.detach())
    return ghost_mse * (mse / (whole + 1e-6)).detach()


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


__all__ = ["train_sae", "jumprelu", "step", "ghost_loss", "resample_steps"]
