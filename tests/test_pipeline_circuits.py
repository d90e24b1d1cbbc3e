"""Circuit evaluation and path patching on a model split over processes (loading/pipeline.py):
two and three gloo processes, each holding a range of blocks of a three-block GQA model, give
what one process gives (within 1e-6, fp32) for ``run_circuit`` and ``evaluate_circuit`` (a
circuit pruned from ``attribute_edges``'s graph, given on rank 0 only, and one whose edges
cross every rank boundary, given on every rank) and for ``path_patch`` (senders on rank 0,
receivers on later ranks, through q, k, v). Rank 0 returns each result, the other ranks None;
a circuit rank 0 cannot run raises on every rank.

One launch of the ranks per world size runs every check (``_circuits``); the tests compare
its results with the same function run in one process."""

from __future__ import annotations

import pytest
import split_runs
import torch
from checkpoints import save_checkpoint
from split_runs import close, load

from transformer_hooks import HookedTransformer
from transformer_hooks.analysis.circuits import (
    Circuit,
    Graph,
    attribute_edges,
    evaluate_circuit,
    make_circuit,
    path_patch,
    prune,
    run_circuit,
)
from transformer_hooks.loading.pipeline import pipeline_map

CHECKPOINT = "llama-gqa"  # with three blocks: 6 heads, 2 kv heads (a k/v receiver is a kv head)
CLEAN = torch.tensor([[1, 17, 42, 8, 19, 5, 23], [1, 64, 2, 77, 31, 9, 12]])
CORRUPT = torch.tensor([[1, 17, 42, 8, 30, 5, 23], [1, 64, 2, 50, 31, 9, 12]])
# Paths of kept edges from the input to the logits (a circuit without one is the corrupted
# run): with 2 ranks (blocks [0] | [1, 2]) and with 3 (one block each), every boundary is crossed.
CROSSING = [
    ("input", "m0"),
    ("m0", "a1.h4<q>"),
    ("input", "a1.h1<k>"),  # a1.h4's kv head
    ("input", "a1.h1<v>"),
    ("a1.h4", "m2"),
    ("a1.h4", "logits"),
    ("m2", "logits"),
    ("input", "a0.h2<q>"),
    ("input", "a0.h0<v>"),
    ("a0.h2", "a2.h1<v>"),
    ("input", "a2.h3<q>"),
    ("a2.h3", "logits"),
]
# (senders, receivers, receiver_input): senders in block 0 (rank 0), receivers in blocks 1 and 2.
PATHS = {
    "path_qkv": ([(0, 1), (0, 4)], [(2, 0), (2, 5)], ("q", "k", "v")),
    "path_q": ([(0, 2)], [(1, 3), (2, 1)], "q"),
    "path_k": ([(0, 0), (0, 3)], [(2, 4)], "k"),
    "path_v": ([(0, 3)], [(1, 0), (2, 2)], "v"),
}


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def _circuits(model: HookedTransformer) -> dict:
    """Every check, in one process or on each rank alike (rank 0's values; None elsewhere)."""
    out: dict = {"boundaries": model.blocks.process_boundaries() if model.blocks.gets_output else None}
    cfg = model.cfg
    graph = attribute_edges(model, CLEAN, CORRUPT, _metric, method="EAP")
    top = None if graph is None else prune(graph, 10)  # rank 0's circuit; None on the other ranks
    out["top_edges"] = None if top is None else sorted(top.edges)
    out["top_logits"] = run_circuit(model, CLEAN, CORRUPT, top)
    out["top_eval"] = evaluate_circuit(model, CLEAN, CORRUPT, top, _metric)
    crossing = make_circuit(Graph(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads), CROSSING)  # on every rank
    out["crossing_logits"] = run_circuit(model, CLEAN, CORRUPT, crossing)
    out["crossing_eval"] = evaluate_circuit(model, CLEAN, CORRUPT, crossing, _metric)
    for name, (senders, receivers, inputs) in PATHS.items():
        out[name] = path_patch(model, CLEAN, CORRUPT, senders, receivers, _metric, receiver_input=inputs)
    with torch.no_grad():
        out["clean_logits"], out["corrupt_logits"] = model(CLEAN), model(CORRUPT)
    # A circuit rank 0 cannot run: every rank raises its error (none waits for the edges).
    backwards = Circuit(Graph(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads), {("m2", "a1.h0<q>")})
    with pytest.raises(ValueError, match=r"in this model a1\.h0<q> does not read m2"):
        run_circuit(model, CLEAN, CORRUPT, backwards if model.blocks.gets_output else None)
    return out


def _bfloat16(path: str, world: int) -> dict:
    """The crossing circuit on the model in bfloat16: its segments pass the residual stream in
    the model's dtype (a meta tensor of that dtype on the ranks that do not hold it)."""
    model = load(path, world, dtype=torch.bfloat16)
    cfg = model.cfg
    crossing = make_circuit(Graph(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads), CROSSING)
    return {"bf16_logits": run_circuit(model, CLEAN, CORRUPT, crossing)}


def _split(world: int, path: str) -> dict:
    """Every result, in one process (``world`` 1) or on each rank of ``world``: rank 0's alone."""
    model = load(path, world)
    results = _circuits(model) | _bfloat16(path, world)
    if not model.blocks.gets_output:
        assert all(v is None for v in results.values()), [k for k, v in results.items() if v is not None]
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_checkpoint(CHECKPOINT, tmp_path_factory.mktemp("split-circuits"), num_hidden_layers=3)
    return str(path)


one_process, ranks = split_runs.comparison(_split, "checkpoint")


def _rank_of(node: str, layout: dict[str, int]) -> int:
    """The rank that runs a node (its block's; the input rank 0's, the logits the last rank's)."""
    if node == "input":
        return 0
    if node == "logits":
        return layout["final"]
    return layout[f"blocks.{int(node[1:].split('.')[0])}"]


def test_circuit_runs_equal_one_process(ranks, one_process):
    """A pruned circuit (rank 0's) and one crossing every rank boundary: the circuit's logits and
    evaluate_circuit's report equal one process's, and the circuit is neither the clean nor the
    corrupted run."""
    world, results = ranks
    got = results[0]
    assert one_process["boundaries"] == [] and got["boundaries"] == [1, 2][: world - 1]  # where the segments split
    layout = pipeline_map(3, world)
    crossed = {(_rank_of(s, layout), _rank_of(r, layout)) for s, r in CROSSING}
    assert {(r, r + 1) for r in range(world - 1)} <= crossed, crossed  # every boundary
    assert got["top_edges"] == one_process["top_edges"] and len(one_process["top_edges"]) == 10
    for name in ("top", "crossing"):
        logits, want = got[f"{name}_logits"], one_process[f"{name}_logits"]
        close(logits, want, f"{name} circuit logits on {world} ranks")
        for run in ("clean_logits", "corrupt_logits"):
            assert (want - one_process[run]).abs().max() > 1e-3, (name, run)
        report, want_report = got[f"{name}_eval"], one_process[f"{name}_eval"]
        assert report.keys() == want_report.keys()
        for key, value in want_report.items():
            assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key)
        assert want_report["circuit"] != pytest.approx(want_report["clean"], abs=1e-3), name
        assert want_report["circuit"] != pytest.approx(want_report["corrupted"], abs=1e-3), name


def test_bfloat16_circuit_equals_one_process(ranks, one_process):
    """In bfloat16 the split run gives one process's logits too (the segments' residual stream
    keeps the model's dtype on every rank)."""
    world, results = ranks
    got = results[0]
    want = one_process["bf16_logits"]
    assert want.dtype == torch.bfloat16
    close(got["bf16_logits"], want, f"bfloat16 circuit logits on {world} ranks")


def test_path_patching_equals_one_process(ranks, one_process):
    """Path patching from block 0's heads (rank 0) into later blocks' q, k, v inputs (later ranks
    where there are three): one process's metric, which the patch changes."""
    world, results = ranks
    got = results[0]
    layout = pipeline_map(3, world)
    clean = _metric(one_process["clean_logits"])
    later = 0
    for name, (senders, receivers, _) in PATHS.items():
        close(got[name], one_process[name], f"{name} on {world} ranks")
        assert (one_process[name] - clean).abs() > 1e-5, name
        later += any(layout[f"blocks.{r}"] > layout[f"blocks.{s}"] for s, _ in senders for r, _ in receivers)
    assert later == len(PATHS)
