"""Circuits: what EAP-IG and a stacked ablation sweep cost, on the embedded model (SmolLM2-135M).

    python benchmarks/circuits.py            # IOI-style prompts, batch 2
    python benchmarks/circuits.py --quick    # fewer repeats and layers
    python benchmarks/circuits.py --ablation-only   # part 2 only

1. EAP-IG with k steps against k forwards and k backwards of the same model with the same
   sites observed (the per-head input sites): the ratio should stay near 1 whatever k, and
   the number of edges (70k here) does not enter.
2. A layer x head mean-ablation sweep (``ablation_sweep``: many ablations per forward, each
   row joining the stacked batch at its own layer) against one forward per ablation
   (``ablate`` in a loop), over the same ablations: the per-ablation time of each and their
   ratio, with every position unembedded and with ``metric_positions=-1`` (the metric reads
   the last position only).

Times are medians of repeats, wall clock, one process; ratios printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from transformer_hooks import HookedTransformer
from transformer_hooks.analysis import circuits
from transformer_hooks.interventions.patching import ablate, ablation_sweep


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ablation-only", action="store_true", help="skip EAP-IG (part 1)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = HookedTransformer.from_pretrained_no_processing("smollm2-135m-instruct")
    clean = model.to_tokens(
        [
            "When Mary and John went to the store, John gave a drink to",
            "When Tom and Anna went to the park, Anna gave a ball to",
        ]
    )
    corrupted = model.to_tokens(
        [
            "When Mary and John went to the store, Mary gave a drink to",
            "When Tom and Anna went to the park, Tom gave a ball to",
        ]
    )
    ids = torch.tensor([[model.to_single_token(" Mary"), model.to_single_token(" John")],
                        [model.to_single_token(" Tom"), model.to_single_token(" Anna")]])  # fmt: skip
    rows = torch.arange(2)

    def metric(logits):
        last = logits[..., -1, :]
        return (last[..., rows, ids[:, 0]] - last[..., rows, ids[:, 1]]).mean(-1)

    print(f"model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; tokens {tuple(clean.shape)}")

    results = []
    if not args.ablation_only:
        # 1. EAP-IG against k forwards + backwards with the same sites observed.
        receivers = circuits._receiver_sites(model)

        def forward_backward():
            keep = {}

            def save(x, hook):
                keep[hook.name] = x

            embed = {}

            def leaf(x, hook):
                embed["x"] = x.detach().requires_grad_(True)
                return embed["x"]

            with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", leaf)] + [(s, save) for s in receivers]):
                value = metric(model(clean))
                torch.autograd.grad(value, [keep[s] for s in receivers])

        one = median_time(forward_backward, repeats)
        for k in (1, 3) if args.quick else (1, 3, 5):
            t = median_time(
                lambda k=k: circuits.attribute_edges(model, clean, corrupted, metric, "EAP-IG", ig_steps=k), repeats
            )
            results.append((k, t, t / (k * one)))
            print(f"EAP-IG k={k}: {t:.2f} s; k x (forward + backward) = {k * one:.2f} s; ratio {t / (k * one):.2f}")
        n_edges = len(circuits.attribute_edges(model, clean, corrupted, metric, "EAP", ig_steps=1).edges)
        print(f"({n_edges} edges; EAP-IG adds two cached forwards, one per prompt set, and the edge contractions)")

    # 2. Mean-ablation sweep vs one forward per ablation, over the same (layer, head) ablations.
    layers = [0, 10, 20, 29] if args.quick else list(range(0, model.cfg.n_layers, 3))
    # The reference activations once, for both: the comparison is of the ablated forwards alone.
    with torch.no_grad():
        _, reference = model.run_with_cache(
            torch.cat([clean, corrupted]), names_filter=lambda name: name.endswith("attn.hook_z")
        )
    n = len(layers) * model.cfg.n_heads

    def stacked(**kw):
        return ablation_sweep(
            model, clean, metric, "z", kind="mean", reference=reference, layers=layers, vectorized_metric=True, **kw
        )

    sweep = median_time(stacked, repeats)
    sweep_last = median_time(lambda: stacked(metric_positions=-1), repeats)

    values: list[list[float]] = []

    def loop():
        values[:] = [
            [
                float(
                    ablate(
                        model,
                        clean,
                        f"blocks.{layer}.attn.hook_z",
                        heads=head,
                        kind="mean",
                        reference=reference,
                        metric=metric,
                    )
                )
                for layer in layers
                for head in range(model.cfg.n_heads)
            ]
        ]

    looped = median_time(loop, 1)
    print(
        f"mean-ablation sweep, {n} (layer, head) ablations over layers {layers}: stacked {sweep:.2f} s "
        f"({1000 * sweep / n:.0f} ms each), with metric_positions=-1 {sweep_last:.2f} s ({1000 * sweep_last / n:.0f} "
        f"ms each), one forward per ablation {looped:.2f} s ({1000 * looped / n:.0f} ms each)"
    )
    diff = (stacked(metric_positions=-1).flatten() - torch.tensor(values[0])).abs().max()
    print(f"largest |stacked - one forward per ablation| over the {n} metrics: {float(diff):.1e}")
    print("\nratios:")
    for k, _t, r in results:
        print(f"  EAP-IG k={k} / (k forwards + k backwards): {r:.2f}")
    print(f"  one-forward-per-ablation / stacked sweep: {looped / sweep:.1f}x")
    print(f"  one-forward-per-ablation / stacked sweep with metric_positions=-1: {looped / sweep_last:.1f}x")


if __name__ == "__main__":
    main()
