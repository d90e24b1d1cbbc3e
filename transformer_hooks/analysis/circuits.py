"""Circuits: edge attribution patching (EAP, EAP-IG), pruning, circuit evaluation, path patching.

The graph (Hanna et al. 2024, "Have faith in faithfulness"): senders are the input
(``hook_embed``), every head (its output ``attn.hook_result``) and every MLP
(``hook_mlp_out``); receivers are every head's query, key and value inputs (the per-head input
sites ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``; under GQA a key/value receiver is
a kv head), every MLP's input (``hook_mlp_in``) and the logits (the final residual stream).
A receiver reads every sender before it; its input is the sum of their outputs (plus biases,
which are the same in every run). Node names: ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``;
receivers ``a{L}.h{H}<q>`` (``<k>``/``<v>``: ``h`` is the kv head), ``m{L}``, ``logits``.

Edge scores, for clean and corrupted prompts of equal length::

    EAP:     s(u -> v) = sum_{batch,pos} (a_u(corrupted) - a_u(clean)) . d metric / d in_v   (at the clean run)
    EAP-IG:  the gradient averaged over k inputs on the straight line between the corrupted and
             clean embeddings (alpha = 1/k .. 1), Hanna et al.'s integrated gradients

so EAP is one clean forward and backward and EAP-IG k of each, whatever the number of edges.
``s`` estimates the metric's change when the edge carries the corrupted value.

``prune(graph, top_n)`` keeps the ``top_n`` edges of largest |score| (only those edges);
``evaluate_circuit`` runs the clean prompts with every edge outside the circuit patched from the
corrupted run (``in_v += sum_{u -> v not kept} a_u(corrupted) - a_u(current run)``) and reports
faithfulness ``(m(circuit) - m(corrupted)) / (m(clean) - m(corrupted))``. ``path_patch`` is the
IOI paper's path patching. ``plot_circuit`` draws a graph with matplotlib.

The functions that run the model take ``model`` (a model with pre-norms), ``clean_tokens`` and
``corrupted_tokens`` (prompts or token ids; the two of equal token length, no padding) and,
where they score, ``metric(logits) -> scalar``. On a model split over processes
(``pipeline_ranks``) every rank calls them alike; rank 0 gets each result (the others None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .. import sites as site_table  # `sites` names arguments here
from ..hooks import HookPoint
from ..protocol import HookedModel
from ..utils import check_index
from .graph import Circuit, Edge, Graph, _layer_of, make_circuit, plot_circuit, prune

__all__ = [
    "Circuit",
    "Edge",
    "Graph",
    "Metric",
    "attribute_edges",
    "evaluate_circuit",
    "make_circuit",
    "path_patch",
    "plot_circuit",
    "prune",
    "run_circuit",
]

Metric = Callable[[torch.Tensor], torch.Tensor]


def _check_model(model: HookedModel) -> None:
    if model.cfg.norm_placement != "pre":
        raise ValueError(
            "edge attribution needs each block's writes to add up in the residual stream; this model "
            f"normalises them after attention and MLP (norm_placement={model.cfg.norm_placement!r})"
        )


def _reads(model: HookedModel, sender: str, receiver: str) -> bool:
    """Whether ``receiver`` reads ``sender`` (sender strictly before it in the residual stream)."""
    ls, ss = _layer_of(sender)
    lr, sr = _layer_of(receiver)
    if ls != lr:
        return ls < lr
    # Same layer: a sequential block's MLP reads its attention; a parallel block's does not.
    return ss == 0 and sr == 1 and site_table.SEQUENTIAL.holds(model.cfg)


def _tokens(model: HookedModel, tokens: Any) -> torch.Tensor:
    toks, mask = model.tokens_and_mask(tokens)
    if mask is not None:
        raise ValueError("circuits compare positions across prompts: give prompts of equal token length")
    return toks


def _sender_sites(model: HookedModel) -> list[str]:
    n = model.cfg.n_layers
    return (
        ["hook_embed"]
        + [f"blocks.{layer}.attn.hook_result" for layer in range(n)]
        + [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]
    )


def _receiver_sites(model: HookedModel) -> list[str]:
    n = model.cfg.n_layers
    out = []
    for layer in range(n):
        out += [f"blocks.{layer}.hook_q_input", f"blocks.{layer}.hook_k_input", f"blocks.{layer}.hook_v_input"]
        out.append(f"blocks.{layer}.hook_mlp_in")
    return out + [f"blocks.{n - 1}.hook_resid_post"]


def _sender_outputs(cache: dict[str, torch.Tensor], model: HookedModel) -> dict[str, torch.Tensor]:
    """Sender node -> its output [batch, pos, d_model], for the senders ``cache`` has, in the graph's order."""
    out = {"input": cache["hook_embed"]} if "hook_embed" in cache else {}
    for layer in range(model.cfg.n_layers):
        result = cache.get(f"blocks.{layer}.attn.hook_result")
        if result is not None:
            for h in range(model.cfg.n_heads):
                out[f"a{layer}.h{h}"] = result[:, :, h]
        if f"blocks.{layer}.hook_mlp_out" in cache:
            out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def _check_grouped(model: HookedModel) -> None:
    """The graph's key/value nodes are the kv heads: refuse a model that ungroups them."""
    if model.cfg.ungroup_grouped_query_attention and model.cfg.n_kv_heads != model.cfg.n_heads:
        raise ValueError(
            "circuit graphs have one key/value node per kv head, and this model ungroups them "
            "(ungroup_grouped_query_attention): call model.set_ungroup_grouped_query_attention(False) first"
        )


def _receiver_grads(grads: dict[str, torch.Tensor], model: HookedModel) -> dict[str, torch.Tensor]:
    """Receiver node -> d metric / d its input [batch, pos, d_model]."""
    _check_grouped(model)
    out = {}
    for layer in range(model.cfg.n_layers):
        for c, n in (("q", model.cfg.n_heads), ("k", model.cfg.n_kv_heads), ("v", model.cfg.n_kv_heads)):
            g = grads[f"blocks.{layer}.hook_{c}_input"]
            for h in range(n):
                out[f"a{layer}.h{h}<{c}>"] = g[:, :, h]
        out[f"m{layer}"] = grads[f"blocks.{layer}.hook_mlp_in"]
    out["logits"] = grads[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    return out


def _cache_here(model: HookedModel, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The activations at ``names`` (None off rank 0 of a model split over processes)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False)
    return cache


def attribute_edges(
    model: HookedModel,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    method: Literal["EAP", "EAP-IG"] = "EAP-IG",
    ig_steps: int = 5,
) -> Graph | None:
    """Score every edge of ``model``'s graph with EAP or EAP-IG; ``graph.edges`` sorted by |score|.

    ``metric(logits)`` -> a scalar, differentiable in the logits (e.g. a logit difference).
    ``method``: ``"EAP"`` (one forward and backward) or ``"EAP-IG"`` (``ig_steps`` of each),
    plus one cached forward per prompt set; ``clean_tokens`` and ``corrupted_tokens`` as in the
    module docstring.

    Split over processes (``pipeline_ranks``): every rank calls it; the gradients cross the
    ranks backwards, each rank sends its receivers' gradients to rank 0, which scores the
    edges and returns the graph (None on the other ranks).
    """
    _check_model(model)
    if method not in ("EAP", "EAP-IG"):
        raise ValueError(f"method must be 'EAP' or 'EAP-IG', got {method!r}")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {ig_steps}")
    clean, corrupted = _tokens(model, clean_tokens), _tokens(model, corrupted_tokens)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} tokens differ in shape")
    senders = _sender_sites(model)
    c_clean, c_corr = _cache_here(model, clean, senders), _cache_here(model, corrupted, senders)  # None off rank 0
    alphas = [1.0] if method == "EAP" else [(i + 1) / ig_steps for i in range(ig_steps)]
    receivers = _receiver_sites(model)
    embeds = (c_clean["hook_embed"], c_corr["hook_embed"]) if c_clean is not None and c_corr is not None else None
    total: dict[str, torch.Tensor] = {}
    for alpha in alphas:
        grads = _grads(model, clean, metric, receivers, embeds, alpha)
        for k, g in grads.items():  # the receivers this process runs
            total[k] = total.get(k, 0) + g / len(alphas)
    gathered = model.blocks.from_sites(total, receivers)
    if gathered is None or c_clean is None or c_corr is None:  # rank 0 of a split model scores the edges
        return None
    out_clean, out_corr = _sender_outputs(c_clean, model), _sender_outputs(c_corr, model)
    delta = {u: out_corr[u] - out_clean[u] for u in out_clean}
    per_receiver = _receiver_grads(gathered, model)
    graph = Graph(
        model.cfg.n_layers,
        model.cfg.n_heads,
        model.cfg.n_kv_heads,
        model_name=model.cfg.model_name,
        processing=tuple(model.cfg.processing),
    )
    # Scores of all senders into one receiver: one contraction [sender] per receiver.
    names = list(delta)
    stacked = torch.stack([delta[u] for u in names])  # [sender, batch, pos, d_model]
    for v, g in per_receiver.items():
        scores = torch.einsum("sbpd,bpd->s", stacked, g).tolist()
        graph.edges += [Edge(u, v, s) for u, s in zip(names, scores, strict=True) if _reads(model, u, v)]
    graph.edges.sort(key=lambda e: -abs(e.score))
    return graph


def _grads(
    model: HookedModel,
    tokens: torch.Tensor,
    metric: Metric,
    sites: list[str],
    embeds: tuple[torch.Tensor, torch.Tensor] | None,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """d metric / d each site's activation, the embeddings (clean, corrupted) set to corrupted
    + alpha (clean - corrupted). Split over processes: the sites this rank runs; ``embeds`` is
    given where the embedding runs (rank 0)."""
    acts: dict[str, torch.Tensor] = {}

    def embed(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        assert embeds is not None, "the process that embeds has the cached embeddings"
        embed_clean, embed_corr = embeds
        return (embed_corr + alpha * (embed_clean - embed_corr)).detach().clone().requires_grad_(True)

    def keep(x: torch.Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", embed)] + [(s, keep) for s in sites]):
        logits = model(tokens)
        value = None
        if logits is not None:  # None: another process of a split model gets the logits
            value = metric(logits)
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
                raise ValueError("metric must return a scalar tensor that depends differentiably on the logits")
            value = value.sum()
        here = [s for s in sites if s in acts]
        grads = model.blocks.grad(value, [acts[s] for s in here])
    return {s: torch.zeros_like(acts[s]) if g is None else g.detach() for s, g in zip(here, grads, strict=True)}


def run_circuit(
    model: HookedModel, clean_tokens: Any, corrupted_tokens: Any, circuit: Circuit | None
) -> torch.Tensor | None:
    """Logits of the clean run with every edge outside ``circuit`` carrying its corrupted value
    (``model``, ``clean_tokens``, ``corrupted_tokens`` as in the module docstring).

    Split over processes (``pipeline_ranks``): every rank calls it; the circuit is rank 0's
    (what ``prune`` makes there of ``attribute_edges``'s graph; the other ranks may pass None).
    The clean run goes one rank's range of blocks at a time, and between ranges the senders'
    outputs computed so far go to every rank (a receiver reads the current run's senders of
    earlier ranks); rank 0 returns the logits, the other ranks None.
    """
    _check_model(model)
    _check_grouped(model)
    kept_into = _kept_edges(model, circuit)
    clean, corrupted = _tokens(model, clean_tokens), _tokens(model, corrupted_tokens)
    senders = _sender_sites(model)
    corr = _sender_outputs(model.blocks.share(_cache_here(model, corrupted, senders)), model)
    current: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: HookPoint) -> None:
        current[hook.name] = x

    def patch_for(receivers: list[tuple[int | None, str]]) -> Callable:
        def patch(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            now = _sender_outputs(current, model)
            # Every receiver of this site reads the same senders: patch all of them, then
            # give each receiver back its kept edges' current values.
            upstream = [u for u in now if _reads(model, u, receivers[0][1])]
            everything = sum((corr[u] - now[u] for u in upstream), torch.zeros_like(now["input"]))
            x = x.clone()
            for idx, v in receivers:
                fix = everything - sum(
                    (corr[u] - now[u] for u in kept_into.get(v, []) if u in upstream), torch.zeros_like(everything)
                )
                if idx is None:
                    x += fix
                else:
                    x[:, :, idx] += fix
            return x

        return patch

    n = model.cfg.n_layers
    hooks: list[tuple[str, Callable]] = [(s, save) for s in senders]
    for layer in range(n):
        for c, k in (("q", model.cfg.n_heads), ("k", model.cfg.n_kv_heads), ("v", model.cfg.n_kv_heads)):
            hooks.append((f"blocks.{layer}.hook_{c}_input", patch_for([(h, f"a{layer}.h{h}<{c}>") for h in range(k)])))
        hooks.append((f"blocks.{layer}.hook_mlp_in", patch_for([(None, f"m{layer}")])))
    hooks.append((f"blocks.{n - 1}.hook_resid_post", patch_for([(None, "logits")])))
    # One segment of blocks per process (one forward on one process); after each, the senders
    # it ran go to every process, where the receivers of the next segments read them.
    bounds = model.blocks.process_boundaries()
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        out = model(clean, stop_at_layer=bounds[0] if bounds else None)
        for i, start in enumerate(bounds):
            before = bounds[i - 1] if i > 0 else -1
            ran = [s for s in senders if before <= _site_layer(s) < start]
            got = model.blocks.from_sites({s: current[s] for s in ran if s in current}, ran)
            current.update(model.blocks.share(got))
            out = model(out, start_at_layer=start, stop_at_layer=bounds[i + 1] if i + 1 < len(bounds) else None)
    return out


def _site_layer(name: str) -> int:
    """The block of a hook name; -1 for the embedding."""
    layer = site_table.layer_of(name)
    return -1 if layer is None else layer


def _kept_edges(model: HookedModel, circuit: Circuit | None) -> dict[str, list[str]]:
    """Receiver -> the senders of its kept edges, in the graph's sender order, on every process
    (split over processes: rank 0's circuit; the others may pass None). A circuit that does not
    fit the model raises on every process."""
    cfg = model.cfg
    graph = Graph(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    senders, receivers = graph.senders, graph.receivers()
    given, error = None, None
    if model.blocks.gets_output:
        try:
            if circuit is None:
                raise ValueError("run_circuit needs a circuit (only ranks other than 0 of a split model may pass None)")
            circuit.graph.check_model(model)
            for s, r in sorted(circuit.edges):
                circuit.graph.check_edge(s, r)
                if not _reads(model, s, r):
                    raise ValueError(f"the circuit names the edge {s} -> {r}, but in this model {r} does not read {s}")
            s_index, r_index = {u: i for i, u in enumerate(senders)}, {v: i for i, v in enumerate(receivers)}
            pairs = sorted((s_index[s], r_index[r]) for s, r in circuit.edges)
            given = {"edges": torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)}
        except ValueError as e:  # every process raises it (the others would wait for the edges)
            error, given = e, {"error": torch.tensor(list(str(e).encode()), dtype=torch.uint8)}
    shared = model.blocks.share(given)
    if error is not None:
        raise error
    if "error" in shared:
        raise ValueError(bytes(shared["error"].tolist()).decode())
    kept_into: dict[str, list[str]] = {}
    for i, j in shared["edges"].tolist():
        kept_into.setdefault(receivers[j], []).append(senders[i])
    return kept_into


def evaluate_circuit(
    model: HookedModel, clean_tokens: Any, corrupted_tokens: Any, circuit: Circuit | None, metric: Metric
) -> dict[str, float] | None:
    """The metric of the clean, corrupted and circuit runs, and the circuit's faithfulness
    ``(m(circuit) - m(corrupted)) / (m(clean) - m(corrupted))`` (1: the circuit does it all).
    ``model``, ``clean_tokens``, ``corrupted_tokens`` and ``metric`` as in the module docstring.

    Split over processes (``pipeline_ranks``): every rank calls it, ``circuit`` as in
    ``run_circuit`` (rank 0's; None elsewhere); the metric runs on rank 0, which returns the
    dict (the other ranks None).
    """
    logits = run_circuit(model, clean_tokens, corrupted_tokens, circuit)
    with torch.no_grad():
        clean_logits = model(_tokens(model, clean_tokens))
        corr_logits = model(_tokens(model, corrupted_tokens))
    if logits is None or clean_logits is None or corr_logits is None or circuit is None:
        return None  # another process of a split model gets the logits
    m_clean, m_corr, m_circ = float(metric(clean_logits)), float(metric(corr_logits)), float(metric(logits))
    gap = m_clean - m_corr
    return {
        "clean": m_clean,
        "corrupted": m_corr,
        "circuit": m_circ,
        "faithfulness": (m_circ - m_corr) / gap if gap != 0 else float("nan"),
        "n_edges": len(circuit.edges),
    }


# Path patching --------------------------------------------------------------------------------
def path_patch(
    model: HookedModel,
    clean_tokens: Any,
    corrupted_tokens: Any,
    senders: Sequence[tuple[int, int]],
    receivers: Sequence[tuple[int, int]],
    metric: Metric,
    receiver_input: str | Sequence[str] = ("q", "k", "v"),
) -> torch.Tensor | None:
    """Path patching (Wang et al. 2022, IOI): the metric when only the paths sender heads ->
    receiver heads' ``receiver_input`` (any of q, k, v) carry the corrupted senders' outputs.

    1. Run the clean prompts with the sender heads' z from the corrupted run and every other
       head's z frozen at its clean value (MLPs recompute); record the receivers' q/k/v.
    2. Run the clean prompts with the receivers' q/k/v set to those values; return the metric.

    ``senders`` and ``receivers``: (layer, head) pairs; ``model``, ``clean_tokens``,
    ``corrupted_tokens`` and ``metric`` as in the module docstring.

    Split over processes (``pipeline_ranks``): every rank calls it alike; each layer's frozen z
    goes from rank 0's caches to the rank that runs the layer, where the receivers' inputs are
    recorded and patched; the metric runs on rank 0, which returns it (the other ranks None).
    """
    clean, corrupted = _tokens(model, clean_tokens), _tokens(model, corrupted_tokens)
    cfg = model.cfg
    inputs = (receiver_input,) if isinstance(receiver_input, str) else tuple(receiver_input)
    if not inputs or any(c not in ("q", "k", "v") for c in inputs):
        raise ValueError(f"receiver_input must be among 'q', 'k', 'v', got {receiver_input!r}")

    def check(heads: Sequence[tuple[int, int]], what: str) -> list[tuple[int, int]]:
        return [
            (
                check_index(int(layer), cfg.n_layers, f"{what} layer", f"a model with {cfg.n_layers} layers"),
                check_index(int(h), cfg.n_heads, f"{what} head", f"layer {layer} with {cfg.n_heads} heads"),
            )
            for layer, h in heads
        ]

    senders, receivers = check(senders, "sender"), check(receivers, "receiver")
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    send: dict[int, list[int]] = {}
    for layer, h in senders:
        send.setdefault(layer, []).append(h)
    # Every head's z at its clean value, the senders' at their corrupted value (computed where
    # the caches are, then on the process that runs each layer).
    frozen = _cache_here(model, clean, z_names)
    z_corr = _cache_here(model, corrupted, [z_names[layer] for layer in sorted(send)]) if send else {}
    if frozen is not None and z_corr is not None:
        for layer, heads in send.items():
            name = z_names[layer]
            frozen[name] = frozen[name].clone()
            frozen[name][:, :, heads] = z_corr[name][:, :, heads]
    del z_corr
    frozen = model.blocks.to_sites(frozen)

    def freeze(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return frozen[hook.name]

    recv_layers = sorted({layer for layer, _ in receivers})
    qkv_names = [f"blocks.{layer}.attn.hook_{c}" for layer in recv_layers for c in inputs]
    recorded: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, hook: HookPoint) -> None:
        recorded[hook.name] = x.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, freeze) for n in z_names] + [(n, record) for n in qkv_names]):
        model(clean, return_type=None)

    group = cfg.group_size
    by_name: dict[str, set[int]] = {}
    for layer, h in receivers:
        for c in inputs:
            by_name.setdefault(f"blocks.{layer}.attn.hook_{c}", set()).add(h if c == "q" else h // group)

    def patch(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        idx = sorted(by_name[hook.name])
        x[:, :, idx] = recorded[hook.name][:, :, idx]
        return x

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, patch) for n in by_name]):
        logits = model(clean)
    return None if logits is None else metric(logits)  # None: another process of a split model has them
