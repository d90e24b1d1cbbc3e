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

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import sites as site_table  # `sites` names arguments here
from ..hooks import HookPoint
from ..protocol import HookedModel
from ..utils import check_index

Metric = Callable[[torch.Tensor], torch.Tensor]
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_RECV = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass(frozen=True)
class Edge:
    """One scored edge: ``sender`` -> ``receiver`` (node names as in the module docstring) and its ``score``."""

    sender: str
    receiver: str
    score: float


@dataclass
class Graph:
    """Nodes and scored edges of a model's computational graph (see the module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    edges: list[Edge] = field(default_factory=list)
    # The model the graph was made on (``attribute_edges`` records it; None: not recorded).
    model_name: str | None = None
    processing: tuple[str, ...] | None = None

    @property
    def senders(self) -> list[str]:
        """Every sending node: ``input``, each head ``a{L}.h{H}``, each MLP ``m{L}``."""
        heads = [f"a{layer}.h{h}" for layer in range(self.n_layers) for h in range(self.n_heads)]
        return ["input"] + heads + [f"m{layer}" for layer in range(self.n_layers)]

    def receivers(self) -> list[str]:
        """Every receiving node: each head's q (per head), k and v (per kv head) input, each MLP, the logits."""
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            out += [f"a{layer}.h{h}<{c}>" for c in "kv" for h in range(self.n_kv_heads)]
            out.append(f"m{layer}")
        return out + ["logits"]

    def check_node(self, name: str, role: str) -> None:
        """Raise ``ValueError`` naming the valid nodes unless ``name`` is a ``role`` (``"sender"`` or
        ``"receiver"``) of this graph."""
        valid = self.senders if role == "sender" else self.receivers()
        if name not in valid:
            raise ValueError(
                f"the circuit names {role} {name!r}, which this model's graph does not have "
                f"({self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv heads; {role}s look like "
                f"{', '.join(valid[:3])}, ..., {valid[-1]})"
            )

    def check_edge(self, sender: str, receiver: str) -> None:
        """Raise unless (sender, receiver) is an edge of this graph, naming it."""
        self.check_node(sender, "sender")
        self.check_node(receiver, "receiver")
        if self.edges and (sender, receiver) not in self._edge_set():
            raise ValueError(
                f"the circuit names the edge {sender} -> {receiver}, which this graph does not have "
                f"(a receiver reads only the senders before it in the residual stream)"
            )

    def _edge_set(self) -> set[tuple[str, str]]:
        return {(e.sender, e.receiver) for e in self.edges}

    def check_model(self, model: HookedModel) -> None:
        """Raise unless ``model`` is the model this graph was made on (shape, name, processing)."""
        cfg = model.cfg
        have = (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
        if have != (self.n_layers, self.n_heads, self.n_kv_heads):
            raise ValueError(
                f"this circuit's graph has {self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv "
                f"heads; the model has {have[0]}, {have[1]}, {have[2]}: it was made on another model"
            )
        if self.model_name is not None and self.model_name != cfg.model_name:
            raise ValueError(
                f"this circuit was made on {self.model_name!r}, not on {cfg.model_name!r}: attribute the "
                f"edges on this model (or set graph.model_name if it is the same model under another name)"
            )
        if self.processing is not None and tuple(self.processing) != tuple(cfg.processing):
            raise ValueError(
                f"this circuit was made on the model with processing {list(self.processing)}, this one has "
                f"{list(cfg.processing)}: its heads and MLPs do not write the same outputs"
            )

    def top(self, n: int) -> list[Edge]:
        """The ``n`` edges of largest absolute score, largest first."""
        return sorted(self.edges, key=lambda e: -abs(e.score))[:n]


def _check_model(model: HookedModel) -> None:
    if model.cfg.norm_placement != "pre":
        raise ValueError(
            "edge attribution needs each block's writes to add up in the residual stream; this model "
            f"normalises them after attention and MLP (norm_placement={model.cfg.norm_placement!r})"
        )


def _layer_of(node: str) -> tuple[int, int]:
    """(layer, stage) where a node writes (sender) or reads (receiver): stage 0 attention, 1 MLP."""
    if node == "input":
        return -1, 1
    if node == "logits":
        return 10**9, 0
    m = _HEAD.match(node) or _RECV.match(node)
    if m:
        return int(m.group(1)), 0
    m = _MLP.match(node)
    assert m is not None, node
    return int(m.group(1)), 1


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


# Circuits -------------------------------------------------------------------------------------
@dataclass
class Circuit:
    """A set of kept edges of a graph; every other edge is patched from the corrupted run."""

    graph: Graph
    edges: set[tuple[str, str]]

    @property
    def nodes(self) -> set[str]:
        """Every node an edge of the circuit touches."""
        return {n for e in self.edges for n in e}


def prune(graph: Graph, top_n: int) -> Circuit:
    """The circuit of the ``top_n`` edges of ``graph`` of largest |score|."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    return Circuit(graph, {(e.sender, e.receiver) for e in graph.top(top_n)})


def make_circuit(graph: Graph, edges: Iterable[tuple[str, str]]) -> Circuit:
    """A circuit of ``graph`` from explicit (sender, receiver) pairs ``edges``, each checked against the graph."""
    edges = set(edges)
    for s, r in sorted(edges):
        graph.check_edge(s, r)
    return Circuit(graph, edges)


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


# Plot -----------------------------------------------------------------------------------------
def plot_circuit(circuit: Circuit | Graph, top_n: int | None = None, ax: Any = None, title: str = "") -> Any:
    """Draw the circuit's nodes by layer (bottom to top; only the layers it uses) and its edges,
    width ~ |score|. Sign convention (stated in the legend): red, score > 0: this edge carrying
    its corrupted value raises the metric; blue, score < 0: lowers it. Returns the matplotlib axes.

    ``top_n``: for a ``Graph``, how many of its top edges to draw (default 30); ``ax``: the axes to
    draw into (default: a new figure sized to the circuit); ``title``: default ``circuit: N edges``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    graph = circuit.graph if isinstance(circuit, Circuit) else circuit
    kept = circuit.edges if isinstance(circuit, Circuit) else {(e.sender, e.receiver) for e in graph.top(top_n or 30)}
    scores = {(e.sender, e.receiver): e.score for e in graph.edges}

    def node_of(name: str) -> str:
        return re.sub(r"<[qkv]>$", "", name) if not (_RECV.match(name) and name[-2] in "kv") else _kv_owner(name)

    def _kv_owner(name: str) -> str:
        m = _RECV.match(name)
        assert m is not None, name
        return f"a{m.group(1)}.h{int(m.group(2)) * (graph.n_heads // graph.n_kv_heads)}"

    def layer_of(name: str) -> float:
        m = _HEAD.match(name) or _MLP.match(name)
        return float(m.group(1)) if m else (-1.0 if name == "input" else float(graph.n_layers))

    nodes = {n for s, r in kept for n in (s, node_of(r))}
    # Rows: only the layers that have a node, in order (a 30-layer model with 5 used layers
    # draws 5 rows, not 30); input below, logits above.
    rows = {layer: i for i, layer in enumerate(sorted({layer_of(n) for n in nodes} | {-1.0, float(graph.n_layers)}))}

    def xy(name: str) -> tuple[float, float]:
        y = float(rows[layer_of(name)])
        if name in ("input", "logits"):
            return (graph.n_heads / 2, y)
        m = _HEAD.match(name)
        if m:
            return (float(m.group(2)), y)
        return (graph.n_heads + 0.8, y)  # an MLP: right of the heads

    if ax is None:
        _, ax = plt.subplots(figsize=(min(2 + 0.9 * (graph.n_heads + 2), 12), min(2.5 + 0.7 * len(rows), 10)))
    biggest = max((abs(scores.get(e, 0.0)) for e in kept), default=1.0) or 1.0
    for s, r in kept:
        sc = scores.get((s, r), 0.0)
        ax.annotate(
            "",
            xy=xy(node_of(r)),
            xytext=xy(s),
            arrowprops=dict(
                arrowstyle="->",
                color="tab:red" if sc > 0 else "tab:blue",
                lw=0.5 + 3 * abs(sc) / biggest,
                alpha=0.8,
                shrinkA=9,
                shrinkB=11,
            ),
        )
    for n in nodes:
        x, y = xy(n)
        ax.text(
            x,
            y,
            n,
            ha="center",
            va="center",
            fontsize=8,
            zorder=4,
            bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="black", lw=0.8),
        )
    ax.set_xlim(-0.8, graph.n_heads + 1.6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    labels = {v: ("input" if k < 0 else "logits" if k >= graph.n_layers else f"L{int(k)}") for k, v in rows.items()}
    ax.set_yticks(list(labels), list(labels.values()))
    ax.set_ylabel("layer (only those in the circuit)")
    ax.set_xticks([*range(graph.n_heads), graph.n_heads + 0.8], [*(f"h{h}" for h in range(graph.n_heads)), "MLP"])
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(
        handles=[
            Line2D([], [], color="tab:red", lw=2, label="score > 0: the corrupted value raises the metric"),
            Line2D([], [], color="tab:blue", lw=2, label="score < 0: the corrupted value lowers it"),
        ],
        title="edge colour (width ~ |score|)",
        loc="upper left",
        bbox_to_anchor=(0.0, -0.12),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    ax.set_title(title or f"circuit: {len(kept)} edges")
    ax.figure.tight_layout()
    return ax
