"""Harvesting speed and memory on the embedded SmolLM2-135M, against a plain forward.

    python benchmarks/harvest.py [--tokens N] [--memory-tokens N N ...] [--layer L] [--threads T]

Speed: ``hook_resid_post`` of one layer over ``--tokens`` tokens of generated text
(random sentences over a fixed word list, written to a text file), in contexts of
``--context-size`` tokens, batches of ``--batch-size``:

- ``forward``:        a plain ``model(tokens, stop_at_layer=L + 1)`` loop over the same
                      contexts, pre-tokenised (the ceiling);
- ``harvest tokens``: ``harvest`` of those contexts (a token array: no tokenisation),
                      written to float32 shards;
- ``harvest text``:   ``harvest`` of the text file (tokenised and packed on the way).

Memory: for each ``--memory-tokens`` size a fresh process harvests a corpus of that size
from a text file; the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after
the model is loaded) minus the RSS at that point. It should not grow with the corpus:
only one shard (``--shard-tokens``) is held at a time.

With ``--train-io DIR`` (a harvested dataset) it times reading shuffled batches of 4096
rows from it against training steps of a 16x TopK SAE on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be are had not or "
    "have one all their there were been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while last "
    "might us great old year off come since against go came right used take three river garden music "
    "city number water paper market night morning school history country family story system program"
).split()


def write_corpus(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Random sentences, one document per paragraph, about ``n_tokens`` words (~tokens) in all."""
    rng = random.Random(seed)
    written = 0
    with path.open("w") as f:
        while written < n_tokens:
            doc = []
            for _ in range(rng.randint(3, 12)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
                doc.append(" ".join(words).capitalize() + ".")
                written += len(words) + 1
            f.write(" ".join(doc) + "\n\n")


def rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args: argparse.Namespace) -> None:
    import torch

    from transformer_hooks import HookedTransformer
    from transformer_hooks.activations import harvest

    torch.set_num_threads(args.threads)
    model = HookedTransformer.from_pretrained_no_processing("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus.txt"
        write_corpus(corpus, args.child_tokens)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = rss_mib("VmRSS")
        t = time.perf_counter()
        ds = harvest(
            model,
            corpus,
            f"blocks.{args.layer}.hook_resid_post",
            Path(d) / "acts",
            context_size=args.context_size,
            batch_size=args.batch_size,
            shard_tokens=args.shard_tokens,
            progress=False,
        )
        seconds = time.perf_counter() - t
        print(
            json.dumps(
                {
                    "tokens": ds.manifest["n_tokens"],
                    "rows": len(ds),
                    "seconds": seconds,
                    "peak_above_base_mib": rss_mib("VmHWM") - base,
                    "base_mib": base,
                    "end_above_base_mib": rss_mib("VmRSS") - base,
                    "disk_mib": sum(f.stat().st_size for f in (Path(d) / "acts").iterdir()) / 2**20,
                }
            )
        )


def speed(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from transformer_hooks import HookedTransformer
    from transformer_hooks.activations import harvest
    from transformer_hooks.scale.corpus import pack_contexts

    torch.set_num_threads(args.threads)
    model = HookedTransformer.from_pretrained_no_processing("smollm2-135m-instruct")
    site = f"blocks.{args.layer}.hook_resid_post"
    results = {}
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus.txt"
        write_corpus(corpus, args.tokens)
        contexts = [
            t
            for t, m in pack_contexts(model, corpus, args.context_size, model.cfg.default_prepend_bos, "text", None)
            if bool(m.all())
        ]
        tokens = torch.stack(contexts)
        n = tokens.numel()
        with torch.no_grad():  # warm up
            model(tokens[: args.batch_size], return_type=None, stop_at_layer=args.layer + 1)
        for repeat in range(args.repeat):
            t = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(tokens), args.batch_size):
                    model(tokens[s : s + args.batch_size], return_type=None, stop_at_layer=args.layer + 1)
            results.setdefault("forward", []).append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            harvest(
                model,
                tokens,
                site,
                Path(d) / f"tok{repeat}",
                context_size=args.context_size,
                batch_size=args.batch_size,
                shard_tokens=args.shard_tokens,
                progress=False,
            )
            results.setdefault("harvest tokens", []).append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            ds = harvest(
                model,
                corpus,
                site,
                Path(d) / f"text{repeat}",
                context_size=args.context_size,
                batch_size=args.batch_size,
                shard_tokens=args.shard_tokens,
                progress=False,
            )
            results.setdefault("harvest text", []).append(ds.manifest["n_tokens"] / (time.perf_counter() - t))
    return {k: max(v) for k, v in results.items()} | {"tokens": n}


def train_io(args: argparse.Namespace) -> None:
    """Reading shuffled batches from a harvested dataset against training a 16x TopK SAE on them."""
    import torch

    from transformer_hooks.activations import ActivationDataset
    from transformer_hooks.sae import train_sae

    torch.set_num_threads(args.threads)
    ds = ActivationDataset(args.train_io)
    site = ds.sites[0]
    batch = 4096
    t = time.perf_counter()
    n = sum(len(b) for b in ds.batches(site, batch, shuffle=True, seed=0))
    read = n / (time.perf_counter() - t)
    steps = 5
    t = time.perf_counter()
    train_sae(ds, site, 16 * ds.width(site), "topk", k=64, steps=steps, batch_size=batch, progress=False)
    train = steps * batch / (time.perf_counter() - t)
    print(
        f"\n**Training a 16x TopK SAE (d_sae {16 * ds.width(site)}, batches of {batch}) on {len(ds)} harvested rows**\n"
    )
    print(
        f"| reading shuffled batches, rows/s | training, rows/s | read / train |\n|---|---|---|\n"
        f"| {read:.0f} | {train:.0f} | {read / train:.1f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20_000, help="corpus size for the speed runs")
    p.add_argument("--memory-tokens", type=int, nargs="*", default=[10_000, 20_000, 40_000])
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--train-io", default=None, help="a harvested dataset: time reading it against training on it")
    p.add_argument("--child-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_io is not None:
        return train_io(args)
    if args.child_tokens is not None:
        return memory_child(args)
    print(
        f"SmolLM2-135M, hook_resid_post of layer {args.layer}, contexts of {args.context_size}, batches of "
        f"{args.batch_size}, shards of {args.shard_tokens} tokens, {args.threads} thread(s)\n"
    )
    r = speed(args)
    print(f"**Speed** ({r['tokens']} tokens, best of {args.repeat})\n")
    print("| case | tokens/s | x forward |\n|---|---|---|")
    for case in ("forward", "harvest tokens", "harvest text"):
        print(f"| {case} | {r[case]:.0f} | {r[case] / r['forward']:.2f} |")
    if args.memory_tokens:
        print("\n**Peak memory above the loaded model, by corpus size** (fresh process each)\n")
        print(
            "| corpus tokens | rows | peak MiB | RSS at the end MiB | disk MiB | tokens/s |\n|---|---|---|---|---|---|"
        )
        for size in args.memory_tokens:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-tokens",
                    str(size),
                    "--layer",
                    str(args.layer),
                    "--context-size",
                    str(args.context_size),
                    "--batch-size",
                    str(args.batch_size),
                    "--shard-tokens",
                    str(args.shard_tokens),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ},
            )
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {m['tokens']} | {m['rows']} | {m['peak_above_base_mib']:.0f} | {m['end_above_base_mib']:.0f} | "
                f"{m['disk_mib']:.0f} | "
                f"{m['tokens'] / m['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
