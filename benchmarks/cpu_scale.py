"""CPU at scale: a Llama-3.2-1B-shaped random checkpoint in bfloat16, loaded and run on
the CPU by transformer_hooks and by HF transformers, each in a fresh process.

    python benchmarks/cpu_scale.py [--tokens 64] [--runs 2] [--threads 2] [--write benchmarks/RESULTS.md]

The checkpoint (the published Llama-3.2-1B config, random weights, bf16 safetensors,
about 2.5 GB) is written once to a temporary directory. Per library, in its own process:
load time, resident memory after the load and its peak (``VmRSS`` / ``VmHWM`` above the
RSS after the imports; the peak is reset through ``/proc/self/clear_refs``), then median
times of a forward on 1 x ``--tokens`` tokens, a cache of the residual stream (ours:
``run_with_cache`` of every ``hook_resid_*``; HF: ``output_hidden_states=True``) and, for
ours, one direct logit attribution (cache the sites DLA reads, ``decompose_resid`` of the
final residual with ``apply_ln``, ``logit_attrs`` of one answer against one contrast).
Ours loads without weight processing, so both libraries do the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(lib: str, path: str, tokens_n: int, runs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    import transformer_hooks.loading  # noqa: F401
    from transformer_hooks import HookedTransformer

    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if lib == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        vocab = model.config.vocab_size
    else:
        model = HookedTransformer.from_pretrained_no_processing(path, dtype=torch.bfloat16)
        vocab = model.cfg.d_vocab
    out = {
        "lib": lib,
        "load_s": time.perf_counter() - start,
        "after_load_mb": (_status_kb("VmRSS") - baseline) / 1024,
        "load_peak_mb": (_status_kb("VmHWM") - baseline) / 1024,
    }
    tokens = torch.randint(0, vocab, (1, tokens_n), generator=torch.Generator().manual_seed(0))

    def median_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.inference_mode():
        if lib == "hf":
            out["forward_s"] = median_time(lambda: model(tokens).logits)
            out["cache_resid_s"] = median_time(lambda: model(tokens, output_hidden_states=True))
        else:
            out["forward_s"] = median_time(lambda: model(tokens))
            out["cache_resid_s"] = median_time(
                lambda: model.run_with_cache(tokens, names_filter=lambda n: "hook_resid_" in n)
            )
            dla_sites = ("hook_embed", "hook_attn_out", "hook_mlp_out", "ln_final.hook_scale")

            def dla():
                _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(dla_sites))
                stack = cache.decompose_resid(layer=None, apply_ln=True, pos_slice=-1)
                return cache.logit_attrs(stack, tokens=3, incorrect_tokens=7, pos_slice=-1)

            out["dla_s"] = median_time(dla)
            attrs = dla()
            logits = model(tokens)[0, -1].float()
            # Not a check: unprocessed weights (ln_final's weight is not folded into W_U) in bf16,
            # so the sum is near the logit difference only; the tests check DLA sums exactly.
            out["dla_sum"] = float(attrs.float().sum())
            out["logit_diff"] = float(logits[3] - logits[7])
    out["peak_mb"] = (_status_kb("VmHWM") - baseline) / 1024
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="write a section into this RESULTS.md")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.tokens, args.runs, args.threads)))
        return 0

    sys.path.insert(0, str(HERE))
    from gpu import build_checkpoint
    from speed import machine, write_section

    from transformer_hooks.loading.groups import fmt_bytes
    from transformer_hooks.presets import PUBLISHED_CONFIGS

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint("Llama-3.2-1B", PUBLISHED_CONFIGS["llama-3.2-1b"], Path(tmp))
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for lib in ("hf", "ours"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    lib,
                    str(path),
                    "--tokens",
                    str(args.tokens),
                    "--runs",
                    str(args.runs),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return 1
            results[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(lib, results[lib], flush=True)
    hf, ours = results["hf"], results["ours"]
    rows = [
        ("load", f"{hf['load_s']:.1f} s", f"{ours['load_s']:.1f} s", ours["load_s"] / hf["load_s"]),
        (
            "RSS after load",
            f"{hf['after_load_mb']:.0f} MiB",
            f"{ours['after_load_mb']:.0f} MiB",
            ours["after_load_mb"] / hf["after_load_mb"],
        ),
        (
            "peak RSS during load",
            f"{hf['load_peak_mb']:.0f} MiB",
            f"{ours['load_peak_mb']:.0f} MiB",
            ours["load_peak_mb"] / hf["load_peak_mb"],
        ),
        (
            f"forward 1x{args.tokens}",
            f"{hf['forward_s']:.2f} s",
            f"{ours['forward_s']:.2f} s",
            ours["forward_s"] / hf["forward_s"],
        ),
        (
            f"cache resid 1x{args.tokens}",
            f"{hf['cache_resid_s']:.2f} s",
            f"{ours['cache_resid_s']:.2f} s",
            ours["cache_resid_s"] / hf["cache_resid_s"],
        ),
        (
            "peak RSS (all runs)",
            f"{hf['peak_mb']:.0f} MiB",
            f"{ours['peak_mb']:.0f} MiB",
            ours["peak_mb"] / hf["peak_mb"],
        ),
    ]
    body = "\n".join(
        [
            f"Machine: {machine()}; {args.threads} threads; bf16; checkpoint {fmt_bytes(size)} (safetensors, bf16); "
            f"medians of {args.runs} runs after a warm-up; each library in a fresh process, memory above the RSS after "
            f"the imports. Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared "
            f"machine makes times noisy; memory is not).",
            "",
            "| measure | HF transformers (SDPA) | transformer_hooks | ratio |",
            "|---|---|---|---|",
            *(f"| {m} | {a} | {b} | {r:.2f}x |" for m, a, b, r in rows),
            "",
            f"Ours only: one DLA (cache the sites it reads, decompose_resid with apply_ln, logit_attrs of one "
            f"answer vs one contrast) {ours['dla_s']:.2f} s. Load peak / checkpoint size: ours "
            f"{ours['load_peak_mb'] * 2**20 / size:.2f}, HF {hf['load_peak_mb'] * 2**20 / size:.2f}. HF memory-maps "
            f"the checkpoint and reads pages as the first forward touches them, so its RSS after the load is small "
            f"and its weights appear in the peak; compare the peaks.",
        ]
    )
    print("\n" + body)
    if args.write:
        flags = [a for a in sys.argv[1:] if a not in ("--write", str(args.write))]
        write_section(
            args.write,
            body,
            "CPU at scale (Llama-3.2-1B-shaped, bf16)",
            shlex.join(["python", "benchmarks/cpu_scale.py", *flags]),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
