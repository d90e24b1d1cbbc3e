"""Speed: transformer_hooks next to Hugging Face transformers, in one process.

    python benchmarks/speed.py                 # GPT-2 small, Pythia-160m, SmolLM2-135M; 8x128 and 1x1024
    python benchmarks/speed.py --quick         # the developer loop: GPT-2 small at 8x128, 3 runs, 8 new tokens
    python benchmarks/speed.py --dtype bfloat16  # both libraries in bfloat16 (or float16), on CPU too
    python benchmarks/speed.py --compile       # adds model.compile()'s forward against HF's eager one
    python benchmarks/speed.py --write benchmarks/RESULTS.md
    python benchmarks/speed.py --keep-freed-memory   # glibc keeps freed memory for reuse (Linux)

Each model is built from a config with the real sizes and random weights, saved with
``save_pretrained`` to a temporary directory, and loaded from there by both libraries
(HF with SDPA attention; ours without weight processing, so both run the same
arithmetic). Every measurement alternates the two libraries run by run (who goes first
alternates too), after one warm-up each, and reports median times and the median of
the per-run ratios ours / HF (below 1 is faster than HF; for generation the ratio is
of tokens per second, above 1 is faster), by wall time and by process CPU time.

Scenarios, all under ``torch.inference_mode()``:
    forward          logits, no hooks                    vs HF forward
    cache resid_post run_with_cache(every hook_resid_post) vs HF output_hidden_states=True
    cache all sites  run_with_cache() (default filter)    vs HF forward
    pattern hook     one layer's hook_pattern hooked      vs HF forward (SDPA)
    generate         greedy, 32 new tokens after a prompt of pos - 32 tokens (tokens/s)
    compiled forward model.compile() (inductor), logits     vs HF forward (eager); --compile only,
                     with the first call's seconds (the compile) in the note
and the size of the full cache in bytes (unique storages, so an alias counts once);
on CPU also load time and peak memory, each library in a fresh process.

``run_with_cache`` itself lets glibc keep freed memory from its first call on (see
``transformer_hooks.memory``), so the scenarios after the first cache run that way for both
libraries (it is process-wide). ``--keep-freed-memory`` reruns the script with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised, so memory freed by one run is reused by the next
instead of being returned to the kernel and faulted in again page by page. Storing every
site writes gigabytes per forward; where page faults are expensive (as in a VM) that,
not the arithmetic, is most of the time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from transformer_hooks import HookedTransformer

NEW_TOKENS = 32  # --quick: 8

# Real sizes of the three models (weights are random: speed does not depend on them).
CONFIGS = {
    "GPT-2 small": lambda: GPT2Config(),
    "Pythia-160m": lambda: GPTNeoXConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        rotary_pct=0.25,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_emb_base=10000,
    ),
    "SmolLM2-135M": lambda: LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


@dataclass
class Row:
    model: str
    shape: str
    scenario: str
    hf: float  # median wall time in ms (or tokens/s for generation)
    ours: float
    ratio: float  # ours / HF (tokens/s for generation), median of per-run ratios
    cpu_ratio: float  # the same with process CPU time
    unit: str = "ms"
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    sizes: list[tuple[str, str, int, int]] = field(default_factory=list)  # model, shape, ours bytes, HF hidden bytes


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def kernel_time(fn: Callable[[], object]) -> str:
    """One run of fn: the share of its CPU time spent in the kernel and its page faults.
    Storing every site writes gigabytes of fresh memory, and a page fault per 4 KiB page
    can cost more than the arithmetic (notably in a VM)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return ""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    total = system + after.ru_utime - before.ru_utime
    faults = after.ru_minflt - before.ru_minflt
    return f"ours: {system / total:.0%} of CPU time in the kernel, {faults / 1e3:.0f}k page faults"


@dataclass
class Paired:
    hf: float  # median wall seconds
    ours: float
    ratio: float  # median over runs of ours / HF wall time, each pair measured back to back
    cpu_ratio: float  # the same with process CPU seconds


def paired(hf_fn: Callable[[], object], ours_fn: Callable[[], object], runs: int) -> Paired:
    """Medians of each, interleaved (who goes first alternates), and medians of the per-run
    ratios: a machine whose load drifts moves both members of a pair alike."""
    hf_fn(), ours_fn()  # warm-up
    hf_times, our_times = [], []
    for i in range(runs):
        order = [(hf_fn, hf_times), (ours_fn, our_times)]
        for fn, times in order if i % 2 == 0 else order[::-1]:
            gc.collect()
            times.append(timed(fn))
    ratio = lambda k: statistics.median(o[k] / h[k] for h, o in zip(hf_times, our_times, strict=True))  # noqa: E731
    return Paired(
        statistics.median(t[0] for t in hf_times), statistics.median(t[0] for t in our_times), ratio(0), ratio(1)
    )


def unique_bytes(tensors) -> int:
    """Bytes held by the tensors, counting each storage once (aliases are free)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def build_checkpoint(name: str, directory: Path) -> Path:
    """Random weights; biases and norm weights random too, as in a trained checkpoint (HF
    initialises them to 0 and 1, and a zero bias is cheaper for us than for HF)."""
    path = directory / re.sub(r"\W+", "-", name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0 if pname.endswith("bias") else 1) + 0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def load_both(path: Path, device: str, dtype: torch.dtype):
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    ours = HookedTransformer.from_pretrained_no_processing(str(path), device=device, dtype=dtype)
    return hf, ours


def bench_model(
    name: str,
    path: Path,
    shapes: list[tuple[int, int]],
    runs: int,
    device: str,
    dtype: torch.dtype,
    results: Results,
    compile: bool = False,
) -> None:
    hf, ours = load_both(path, device, dtype)
    compiled = (
        HookedTransformer.from_pretrained_no_processing(str(path), device=device, dtype=dtype).compile()
        if compile
        else None
    )
    noop = lambda act, hook: None  # noqa: E731
    resid_post = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    for batch, pos in shapes:
        shape = f"{batch}x{pos}"
        tokens = torch.randint(0, ours.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0)).to(device)
        add = lambda scenario, p, note="": results.rows.append(  # noqa: E731
            Row(name, shape, scenario, p.hf * 1e3, p.ours * 1e3, p.ratio, p.cpu_ratio, "ms", note)
        )
        with torch.inference_mode():
            for _ in range(2):  # a fresh process's heap grows over the first runs: not part of any scenario
                hf(tokens), ours(tokens)
            add("forward", paired(lambda: hf(tokens).logits, lambda: ours(tokens), runs))
            add(
                "cache resid_post",
                paired(
                    lambda: hf(tokens, output_hidden_states=True),
                    lambda: ours.run_with_cache(tokens, names_filter=resid_post),
                    runs,
                ),
                "HF: output_hidden_states=True",
            )
            add(
                "cache all sites",
                paired(lambda: hf(tokens).logits, lambda: ours.run_with_cache(tokens), runs),
                "HF: plain forward; " + kernel_time(lambda: ours.run_with_cache(tokens)),
            )
            add(
                "pattern hook, 1 layer",
                paired(
                    lambda: hf(tokens).logits,
                    lambda: ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", noop)]),
                    runs,
                ),
                "HF: plain forward (SDPA)",
            )

            if compiled is not None:
                compile_seconds, _ = timed(lambda: compiled(tokens))
                add(
                    "compiled forward",
                    paired(lambda: hf(tokens).logits, lambda: compiled(tokens), runs),
                    f"HF: eager forward; ours: model.compile(), first call (compiling) {compile_seconds:.0f} s",
                )

            _, cache = ours.run_with_cache(tokens)
            hidden = hf(tokens, output_hidden_states=True).hidden_states
            results.sizes.append((name, shape, unique_bytes(cache.values()), unique_bytes(hidden)))
            del cache, hidden

            prompt = tokens[:, : pos - NEW_TOKENS]
            hf_gen = lambda: hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,  # noqa: E731
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
            our_gen = lambda: ours.generate(
                prompt,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,  # noqa: E731
                stop_at_eos=False,
                verbose=False,
            )
            same = torch.equal(hf_gen(), our_gen())
            p = paired(hf_gen, our_gen, max(3, runs // 2))
            n = batch * NEW_TOKENS
            results.rows.append(
                Row(
                    name,
                    shape,
                    f"generate {NEW_TOKENS} tokens",
                    n / p.hf,
                    n / p.ours,
                    1 / p.ratio,
                    1 / p.cpu_ratio,
                    "tok/s",
                    "greedy tokens equal HF's" if same else "greedy tokens DIFFER from HF's",
                )
            )
        print(format_rows([r for r in results.rows if r.model == name and r.shape == shape]), flush=True)
    hf = ours = None  # free both before the next model loads (rebinding, not del: the lambdas above use them)
    gc.collect()


LOAD_SCRIPT = """
import sys, time, torch
torch.set_num_threads({threads})
start = time.perf_counter()
if sys.argv[1] == "hf":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], attn_implementation="sdpa").eval()
else:
    from transformer_hooks import HookedTransformer
    model = HookedTransformer.from_pretrained_no_processing(sys.argv[2])
seconds = time.perf_counter() - start
with torch.inference_mode():
    model(torch.zeros(8, 128, dtype=torch.long))
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak over exec on Linux).
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(seconds, hwm_kb * 1024)
"""


def load_time_and_peak_memory(path: Path, threads: int) -> dict[str, tuple[float, int]]:
    """Seconds to load (imports excluded) and peak RSS after one 8x128 forward, each in a fresh process."""
    script = LOAD_SCRIPT.format(threads=threads)
    out = {}
    for lib in ("hf", "ours"):
        proc = subprocess.run(
            [sys.executable, "-c", script, lib, str(path)], capture_output=True, text=True, check=True
        )
        seconds, rss = proc.stdout.split()[-2:]
        out[lib] = (float(seconds), int(rss))
    return out


def format_rows(rows: list[Row]) -> str:
    lines = [
        "| model | shape | scenario | HF | transformer_hooks | ratio | CPU-time ratio | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.shape} | {r.scenario} | {r.hf:.1f} {r.unit} | {r.ours:.1f} {r.unit} | "
            f"{r.ratio:.2f}x | {r.cpu_ratio:.2f}x | {r.note} |"
        )
    return "\n".join(lines)


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (StopIteration, FileNotFoundError):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}; torch {torch.__version__}; Python {platform.python_version()}"


def report(results: Results, loads: dict, args: argparse.Namespace) -> str:
    import transformers

    lines = [
        f"Machine: {machine()}; transformers {transformers.__version__}; device {args.device}, "
        f"{args.dtype}, {torch.get_num_threads()} threads; medians of {args.runs} interleaved runs "
        f"(generation: {max(3, args.runs // 2)})"
        + (
            "; glibc keeps freed memory (" + ", ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ")."
            if args.keep_freed_memory
            else "."
        ),
        "",
        "Ratio = transformer_hooks / HF, the median of the ratios of runs made back to back: times "
        "(lower is better), except generation, which compares tokens per second (higher is better). "
        "The CPU-time ratio compares process CPU seconds instead of wall time. HF and "
        "transformer_hooks columns are median wall times.",
        "",
        "Goals: forward <= 1.05x (bf16: <= 1.05x HF bf16), cache resid_post <= 1.10x, cache all sites "
        "<= 1.3x, pattern hook <= 1.10x, generation >= 1x, compiled forward <= 0.85x HF's eager forward.",
        "",
        format_rows(results.rows),
        "",
        "Full cache (`run_with_cache()`, default filter), unique storages:",
        "",
        "| model | shape | cache bytes | HF hidden_states bytes |",
        "|---|---|---|---|",
    ]
    for model, shape, ours, hf in results.sizes:
        lines.append(f"| {model} | {shape} | {ours / 1e9:.3f} GB | {hf / 1e9:.3f} GB |")
    if loads:
        lines += [
            "",
            "Load (fresh process, imports excluded) and peak RSS after one 8x128 forward:",
            "",
            "| model | HF load | ours load | HF peak RSS | ours peak RSS |",
            "|---|---|---|---|---|",
        ]
        for model, d in loads.items():
            lines.append(
                f"| {model} | {d['hf'][0]:.2f} s | {d['ours'][0]:.2f} s | {d['hf'][1] / 1e9:.2f} GB | "
                f"{d['ours'][1] / 1e9:.2f} GB |"
            )
    return "\n".join(lines)


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def write_section(path: Path, body: str, title: str, command: str) -> None:
    """Replace (or append) the "## {title}" section of RESULTS.md, leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\nWritten by `{command}`.\n\n{body}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text, count=1)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + section)
    )
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="GPT-2 small at 8x128, 3 runs, 8 new tokens (the developer loop)"
    )
    parser.add_argument("--compile", action="store_true", help="also time model.compile()'s forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 7; --quick 3)")
    parser.add_argument("--models", default=None, help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--shapes", default=None, help="e.g. 8x128,1x1024 (the default)")
    parser.add_argument("--write", type=Path, default=None, help="write the table into this RESULTS.md")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="rerun with glibc keeping freed memory for reuse (no page faults on reused memory)",
    )
    args = parser.parse_args()
    if args.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    args.runs = args.runs or (3 if args.quick else 7)
    args.shapes = args.shapes or ("8x128" if args.quick else "8x128,1x1024")
    args.models = args.models or ("GPT-2 small" if args.quick else ",".join(CONFIGS))
    global NEW_TOKENS
    NEW_TOKENS = 8 if args.quick else NEW_TOKENS
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    models = [m.strip() for m in args.models.split(",")]
    unknown = set(models) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    results, loads = Results(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(models, desc="models"):
            path = build_checkpoint(name, Path(tmp))
            measure_load = not (args.quick or args.keep_freed_memory or args.compile) and args.device == "cpu"
            measure_load = measure_load and args.dtype == "float32"
            if measure_load and Path("/proc/self/status").exists():
                loads[name] = load_time_and_peak_memory(path, args.threads)
            bench_model(name, path, shapes, args.runs, args.device, dtype, results, compile=args.compile)
    body = report(results, loads, args)
    print("\n" + body)
    if args.write:
        title = (
            "Speed" + (f", {args.dtype}" if args.dtype != "float32" else "") + (", compiled" if args.compile else "")
        )
        title += ", glibc keeping freed memory" if args.keep_freed_memory else ""
        flags = [a for a in sys.argv[1:] if a not in ("--write", str(args.write))]
        command = shlex.join(["python", "benchmarks/speed.py", *flags])
        write_section(args.write, body, title, command)
        print(f"\nwritten to {args.write}")


if __name__ == "__main__":
    main()
