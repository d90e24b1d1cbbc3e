"""Peak memory and time of loading a GPT-2-small-shaped checkpoint, against HF.

    python benchmarks/memory_load.py [--gguf] [--repeat N] [--threads N] [--keep DIR]

Builds random GPT-2-small-shaped checkpoints (d_model 768, 12 layers, vocab 50257) once
in a temporary directory: the usual tied one (~498 MB float32) and an untied one (with
its own ``lm_head``, ~652 MB), plus a converted copy of the tied one. Each case then
runs in a fresh Python process: load, then one forward on 128 tokens. Memory is the
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
imports) minus the RSS after the imports, so importing the libraries is not counted;
"load peak" stops before the forward, "peak" includes it. Cases:

- ``hf``:          ``AutoModelForCausalLM.from_pretrained``
- ``unprocessed``: ``HookedTransformer.from_pretrained_no_processing``
- ``processed``:   ``HookedTransformer.from_pretrained`` (TransformerLens's processing)
- ``converted``:   ``from_pretrained`` of the checkpoint converted (processed) once with
                   ``python -m weights_conversion``

With ``--gguf`` it also times the embedded SmolLM2-135M-Instruct GGUF (unprocessed,
tokenizer included) against HF's ``from_pretrained(gguf_file=...)`` plus
``AutoTokenizer``. Each case runs ``--repeat`` times (fresh processes, interleaved); the
tables show the fastest load and the median memory. Load time is wall clock and CPU
(user + system) time. Prints Markdown tables with ratios against the checkpoint size
and against HF, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("hf", "unprocessed", "processed", "converted")
GGUF_CASES = ("gguf-hf", "gguf")
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


# ------------------------------------------------------------------ in the child process


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _load(case: str, path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported before the baseline (run_case)

    from transformer_hooks import HookedTransformer
    from transformer_hooks.resolution import embedded_default_gguf

    if case == "hf":
        return AutoModelForCausalLM.from_pretrained(path).eval()
    if case == "unprocessed":
        return HookedTransformer.from_pretrained_no_processing(path)
    if case == "processed":
        return HookedTransformer.from_pretrained(path)
    if case == "converted":
        return HookedTransformer.from_pretrained(str(Path(path).parent / "converted"))
    if case == "gguf":
        return HookedTransformer.from_pretrained_no_processing(path)
    if case == "gguf-hf":
        gguf = embedded_default_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    raise ValueError(f"unknown case {case!r}")


def run_case(case: str, path: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    # Every case imports the same libraries before the baseline is taken.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import transformer_hooks.loading  # noqa: F401
    import transformer_hooks.processing  # noqa: F401

    baseline_kb = _status_kb("VmRSS")
    _reset_peak()
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    model = _load(case, path)
    load_seconds, load_cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    after_load_kb, load_peak_kb = _status_kb("VmRSS"), _status_kb("VmHWM")
    d_vocab = model.cfg.d_vocab if hasattr(model, "cfg") else model.config.vocab_size
    tokens = torch.randint(0, d_vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
    return {
        "case": case,
        "load_seconds": load_seconds,
        "load_cpu": load_cpu,
        "load_peak_mb": (load_peak_kb - baseline_kb) / 1024,
        "peak_mb": (_status_kb("VmHWM") - baseline_kb) / 1024,
        "after_load_mb": (after_load_kb - baseline_kb) / 1024,
        "rss_file_mb": _status_kb("RssFile") / 1024,  # file pages mapped at the end (libraries, mmap'd weights)
    }


# ----------------------------------------------------------------- in the parent process


def build_checkpoints(directory: Path) -> dict[str, Path]:
    """{"tied": ..., "untied": ...} random GPT-2-small-shaped checkpoints (+ a converted copy of each)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from weights_conversion.__main__ import convert

    paths = {}
    for kind, tie in (("tied", True), ("untied", False)):
        path = directory / kind / "checkpoint"
        if not (path / "model.safetensors").exists():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(GPT2Config(**GPT2_SMALL, tie_word_embeddings=tie)).save_pretrained(path)
        if not (directory / kind / "converted").exists():
            convert(path, directory / kind / "converted")
        paths[kind] = path
    return paths


def measure_one(case: str, path: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, path, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(cases: tuple[str, ...], path: str, repeat: int, threads: int) -> list[dict]:
    """Each case ``repeat`` times, interleaved; fastest load, median memory."""
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(repeat):
        for case in cases:
            runs[case].append(measure_one(case, path, threads))
    memory = ("load_peak_mb", "peak_mb", "after_load_mb", "rss_file_mb")
    return [
        {
            "case": case,
            **{key: statistics.median(r[key] for r in results) for key in memory},
            "load_seconds": min(r["load_seconds"] for r in results),
            "load_cpu": min(r["load_cpu"] for r in results),
        }
        for case, results in runs.items()
    ]


def report(results: list[dict], checkpoint_mb: float | None, baseline: str) -> str:
    ref = next(r for r in results if r["case"] == baseline)
    size = [] if checkpoint_mb is None else ["x checkpoint"]
    head = [
        "case",
        "load peak MiB",
        "peak MiB",
        *size,
        f"x {baseline}",
        "RSS after load MiB",
        "file pages MiB",
        "load s",
        f"x {baseline}",
        "load CPU s",
        f"x {baseline}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            r["case"],
            f"{r['load_peak_mb']:.0f}",
            f"{r['peak_mb']:.0f}",
            *([] if checkpoint_mb is None else [f"{r['peak_mb'] / checkpoint_mb:.2f}"]),
            f"{r['peak_mb'] / ref['peak_mb']:.2f}",
            f"{r['after_load_mb']:.0f}",
            f"{r['rss_file_mb']:.0f}",
            f"{r['load_seconds']:.2f}",
            f"{r['load_seconds'] / ref['load_seconds']:.2f}",
            f"{r['load_cpu']:.2f}",
            f"{r['load_cpu'] / ref['load_cpu']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("CASE", "PATH", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--gguf", action="store_true", help="also time the embedded GGUF model")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each run (default 2)")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the checkpoints here instead of a temp dir")
    args = parser.parse_args()
    if args.child:
        case, path, threads = args.child
        print(json.dumps(run_case(case, path, int(threads))))
        return

    print(
        f"Fresh process per run, {args.repeat} runs per case, torch.set_num_threads({args.threads}); "
        f"memory is RSS above the post-import baseline, 'peak' includes one forward of 128 tokens."
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in build_checkpoints(args.keep or Path(tmp)).items():
            checkpoint_mb = (path / "model.safetensors").stat().st_size / 2**20
            print(
                f"\nGPT-2-small-shaped random checkpoint, {kind} embeddings: {checkpoint_mb:.0f} MiB "
                f"(model.safetensors, float32).\n"
            )
            print(report(measure(CASES, str(path), args.repeat, args.threads), checkpoint_mb, "hf"))
    if args.gguf:
        print(
            "\nSmolLM2-135M-Instruct Q4_1 GGUF (the embedded default), dequantized to float32, tokenizer "
            "included; gguf-hf is AutoModelForCausalLM.from_pretrained(gguf_file=...) + AutoTokenizer.\n"
        )
        print(report(measure(GGUF_CASES, "smollm2-135m-instruct", args.repeat, args.threads), None, "gguf-hf"))


if __name__ == "__main__":
    main()
