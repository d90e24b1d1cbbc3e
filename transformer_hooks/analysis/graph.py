"""Circuit graphs as data: the nodes and scored edges of a model's computational graph
(``Graph``, ``Edge``), a circuit as a set of kept edges (``Circuit``, ``prune``,
``make_circuit``), and ``plot_circuit``. analysis/circuits.py (which re-exports these) scores
the edges on a model and runs circuits; its module docstring describes the graph.

Node names: senders ``input``, ``a{L}.h{H}`` (a head's output), ``m{L}`` (an MLP's output);
receivers ``a{L}.h{H}<q>`` (``<k>``/``<v>``: ``h`` is the kv head), ``m{L}``, ``logits``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import HookedModel

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
