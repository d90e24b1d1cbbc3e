"""GPU benchmark in one go (about 5 minutes on one GPU): transformer_hooks next to Hugging
Face transformers (SDPA) in the same process, at 1B scale, in bfloat16 and float32.

    python benchmarks/gpu.py                          # Llama-3.2-1B- and Pythia-1.4B-shaped, bf16 + fp32
    python benchmarks/gpu.py --dtypes bfloat16        # one dtype
    python benchmarks/gpu.py --device cpu --quick     # a smoke test at tiny sizes (no GPU needed)

Each model is built from its published config with random weights, saved with
``save_pretrained`` to a temporary directory and loaded from there by both libraries
(ours without weight processing, so both do the same arithmetic). Scenarios, under
``torch.inference_mode()`` except the sweep's attribution-free patching (no grad needed):

    forward              logits                                   vs HF forward
    cache resid          run_with_cache(every hook_resid_*)       vs HF output_hidden_states=True
    cache all            run_with_cache() (default filter)        vs HF forward
    pattern hook         one layer's hook_pattern hooked          vs HF forward (SDPA)
    generate 64 tokens   greedy, tokens per second                vs HF generate
    IOI residual sweep   get_act_patch_resid_pre, every (layer, pos) of an IOI-shaped batch
                         vs HF: one forward per patch with a pre-hook on the layer
                         (and the two sweeps' results compared)

With two or more GPUs, also a forward with the model split over the GPUs:
``from_pretrained(device_map="auto")`` vs HF's ``device_map="auto"``; and the IOI residual
sweep on the model split over processes, one GPU each (``pipeline_ranks``, NCCL; with
``--device cpu --quick``, two gloo processes on the CPU), against the same sweep in one
process on one GPU, its values compared with that run's.

Quantized forward (``bench_quantized``): ``from_pretrained(..., quantize=...)`` for each
scheme the device runs (torchao int8; int4 in bfloat16; bitsandbytes int8 and NF4 when
installed) against the same model unquantized: in those rows the "HF" column is ours
unquantized, the note gives the weight bytes of both and the largest logit difference.

Ratios are ours / HF of median times of interleaved runs (``speed.py``'s ``paired``):
below 1 is faster than HF; for generation, tokens/s ours / HF (above 1 is faster).
Results go to a JSON file and to the "GPU" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import machine, paired, unique_bytes, write_section  # noqa: E402

from transformer_hooks import HookedTransformer  # noqa: E402
from transformer_hooks.interventions.patching import get_act_patch_resid_pre  # noqa: E402
from transformer_hooks.presets import PUBLISHED_CONFIGS  # noqa: E402

# Pythia-1.4B: Pythia-2.8B's published config (plan.py) at 1.4B's published sizes.
PYTHIA_1_4B = dict(
    PUBLISHED_CONFIGS["pythia-2.8b"],
    hidden_size=2048,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=8192,
)
MODELS: dict[str, dict[str, Any]] = {"Llama-3.2-1B": PUBLISHED_CONFIGS["llama-3.2-1b"], "Pythia-1.4B": PYTHIA_1_4B}
# --quick: the same families at toy sizes
QUICK: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": dict(
        PUBLISHED_CONFIGS["llama-3.2-1b"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "Pythia-1.4B": dict(
        PYTHIA_1_4B,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
    ),
}


@dataclass
class Row:
    model: str
    dtype: str
    shape: str
    scenario: str
    hf: float  # median wall ms (tokens/s for generation)
    ours: float
    ratio: float
    unit: str = "ms"
    note: str = ""


def build_checkpoint(name: str, hf_config: dict[str, Any], directory: Path) -> Path:
    """Random weights (bf16 on disk: half the bytes; each library casts on load); biases and
    norm weights random too, as in a trained checkpoint."""
    config = AutoConfig.for_model(**hf_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0 if pname.endswith("bias") else 1) + 0.02 * torch.randn_like(p))
    path = directory / name
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


def hf_layers(hf: Any) -> torch.nn.ModuleList:
    return hf.base_model.layers


def hf_resid_sweep(
    hf: Any,
    corrupted: torch.Tensor,
    clean_hidden: tuple[torch.Tensor, ...],
    metric: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The [layer, pos] residual patching sweep done the plain way on HF: one forward per
    patch, a pre-hook on layer L replacing position p of its input with the clean run's."""
    layers = hf_layers(hf)
    out = torch.empty(len(layers), corrupted.shape[1])
    for layer, module in enumerate(layers):
        for pos in range(corrupted.shape[1]):

            def pre_hook(mod: Any, args: tuple, kwargs: dict, layer: int = layer, pos: int = pos) -> Any:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                hidden = hidden.clone()
                hidden[:, pos] = clean_hidden[layer][:, pos]
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": hidden}
                return (hidden, *args[1:]), kwargs

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                out[layer, pos] = metric(hf(corrupted).logits).float().cpu()
            finally:
                handle.remove()
    return out


def bench(
    name: str,
    path: Path,
    dtype: torch.dtype,
    device: str,
    args: argparse.Namespace,
    rows: list[Row],
    checks: list[dict],
) -> None:
    dname = str(dtype).removeprefix("torch.")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    ours = HookedTransformer.from_pretrained_no_processing(str(path), device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    batch, pos = args.batch, args.seq
    tokens = torch.randint(0, ours.cfg.d_vocab, (batch, pos), generator=gen).to(device)
    shape = f"{batch}x{pos}"
    noop = lambda act, hook: None  # noqa: E731
    resid = lambda n: "hook_resid_" in n  # noqa: E731

    def add(scenario: str, p: Any, note: str = "", shape: str = shape) -> None:
        rows.append(Row(name, dname, shape, scenario, p.hf * 1e3, p.ours * 1e3, p.ratio, "ms", note))
        print(
            f"  {name} {dname} {shape} {scenario}: HF {p.hf * 1e3:.1f} ms, ours {p.ours * 1e3:.1f} ms, "
            f"ratio {p.ratio:.2f}x",
            flush=True,
        )

    with torch.inference_mode():
        diff = (hf(tokens).logits.float() - ours(tokens).float()).abs().max().item()
        checks.append(dict(model=name, dtype=dname, check="max |logits ours - HF|", value=diff))
        add("forward", paired(lambda: hf(tokens).logits, lambda: ours(tokens), args.runs))
        add(
            "cache resid",
            paired(
                lambda: hf(tokens, output_hidden_states=True),
                lambda: ours.run_with_cache(tokens, names_filter=resid),
                args.runs,
            ),
            "HF: output_hidden_states=True",
        )
        _, cache = ours.run_with_cache(tokens)
        cache_bytes = unique_bytes(cache.values())
        del cache
        add(
            "cache all",
            paired(lambda: hf(tokens).logits, lambda: ours.run_with_cache(tokens), args.runs),
            f"HF: plain forward; cache {cache_bytes / 2**30:.2f} GiB",
        )
        add(
            "pattern hook",
            paired(
                lambda: hf(tokens).logits,
                lambda: ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", noop)]),
                args.runs,
            ),
            "HF: plain forward (SDPA)",
        )

        prompt = tokens[:, : args.prompt_len]
        hf_gen = lambda: hf.generate(  # noqa: E731
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=0,
        )
        our_gen = lambda: ours.generate(  # noqa: E731
            prompt,
            max_new_tokens=args.new_tokens,
            do_sample=False,  # noqa: E731
            stop_at_eos=False,
            verbose=False,
        )
        same = torch.equal(hf_gen(), our_gen())
        p = paired(hf_gen, our_gen, max(3, args.runs // 2))
        n = prompt.shape[0] * args.new_tokens
        rows.append(
            Row(
                name,
                dname,
                f"{prompt.shape[0]}x{prompt.shape[1]}+{args.new_tokens}",
                f"generate {args.new_tokens} tokens",
                n / p.hf,
                n / p.ours,
                1 / p.ratio,
                "tok/s",
                "greedy tokens equal HF's"
                if same
                else "greedy tokens differ from HF's (ties in low precision can flip an argmax)",
            )
        )
        print(f"  {name} {dname} generate: ratio (tok/s) {1 / p.ratio:.2f}x, same tokens: {same}", flush=True)

        # IOI-shaped residual sweep: a batch of 8 prompts of 15 tokens, metric = mean logit difference
        ioi = torch.randint(0, ours.cfg.d_vocab, (args.ioi_batch, 15), generator=gen).to(device)
        corrupted = ioi.clone()
        corrupted[:, 2] = torch.randint(0, ours.cfg.d_vocab, (args.ioi_batch,), generator=gen).to(device)
        answer, contrast = 3, 7

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return (logits[:, -1, answer] - logits[:, -1, contrast]).float().mean()

        _, clean_cache = ours.run_with_cache(ioi, names_filter=lambda n: n.endswith("hook_resid_pre"))
        clean_hidden = hf(ioi, output_hidden_states=True).hidden_states
        ours_sweep = lambda: get_act_patch_resid_pre(ours, corrupted, clean_cache, metric, progress=False)  # noqa: E731
        hf_sweep = lambda: hf_resid_sweep(hf, corrupted, clean_hidden, metric)  # noqa: E731
        diff = (ours_sweep().float().cpu() - hf_sweep()).abs().max().item()
        checks.append(dict(model=name, dtype=dname, check="max |resid sweep ours - HF loop|", value=diff))
        add(
            "IOI residual sweep",
            paired(hf_sweep, ours_sweep, max(3, args.runs // 3)),
            f"HF: one forward per (layer, pos) with a pre-hook; max diff {diff:.2g}",
            shape=f"{args.ioi_batch}x15",
        )


def _ioi(d_vocab: int, batch: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """An IOI-shaped pair: ``batch`` prompts of 15 tokens, the corrupted ones differing at position 2."""
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, d_vocab, (batch, 15), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, d_vocab, (batch,), generator=gen)
    return clean.to(device), corrupted.to(device)


def _ioi_metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 7]).float().mean()


def _split_sweep_worker(
    rank: int, world: int, port: int, path: str, dtype: str, batch: int, runs: int, out: str
) -> None:
    """One rank of the split sweep: load this rank's blocks, time the sweep (rank 0 writes)."""
    import datetime

    import torch.distributed as dist

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world and not out.endswith(".cpu")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        model = HookedTransformer.from_pretrained_no_processing(path, dtype=getattr(torch, dtype), pipeline_ranks=world)
        clean, corrupted = _ioi(model.cfg.d_vocab, batch, model.device)
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        sweep = lambda: get_act_patch_resid_pre(model, corrupted, clean_cache, _ioi_metric, progress=False)  # noqa: E731
        result = sweep()  # warm-up, and the values compared with one process
        times = []
        for _ in range(runs):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            sweep()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        if rank == 0:
            torch.save({"result": result.float().cpu(), "seconds": statistics.median(times)}, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def bench_split_sweep(
    name: str,
    path: Path,
    dtype: torch.dtype,
    device: str,
    args: argparse.Namespace,
    rows: list[Row],
    checks: list[dict],
) -> None:
    """The IOI residual sweep on the model split over ``world`` processes (one GPU each; gloo
    on the CPU with --quick) vs the same sweep in one process on one device."""
    import socket

    import torch.multiprocessing as mp

    dname = str(dtype).removeprefix("torch.")
    world = min(torch.cuda.device_count(), 4) if device.startswith("cuda") else 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(Path(tempfile.mkdtemp()) / ("split.pt" if device.startswith("cuda") else "split.cpu"))
    runs = max(3, args.runs // 3)
    mp.spawn(
        _split_sweep_worker, args=(world, port, str(path), dname, args.ioi_batch, runs, out), nprocs=world, join=True
    )
    split = torch.load(out)
    ours = HookedTransformer.from_pretrained_no_processing(str(path), device=device, dtype=dtype)
    clean, corrupted = _ioi(ours.cfg.d_vocab, args.ioi_batch, device)
    _, clean_cache = ours.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    sweep = lambda: get_act_patch_resid_pre(ours, corrupted, clean_cache, _ioi_metric, progress=False)  # noqa: E731
    one = sweep().float().cpu()
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        sweep()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    one_s = statistics.median(times)
    diff = (split["result"] - one).abs().max().item()
    checks.append(dict(model=name, dtype=dname, check=f"max |resid sweep on {world} ranks - one process|", value=diff))
    where = f"{world} GPUs" if device.startswith("cuda") else f"{world} gloo processes (CPU)"
    rows.append(
        Row(
            name,
            dname,
            f"{args.ioi_batch}x15",
            f"IOI residual sweep, split over {where}",
            one_s * 1e3,
            split["seconds"] * 1e3,
            split["seconds"] / one_s,
            "ms",
            f"pipeline_ranks; the HF column is the same sweep in one process on one device; max diff {diff:.2g}",
        )
    )
    print(f"  {name} {dname} split sweep over {where}: {split['seconds'] / one_s:.2f}x one process", flush=True)


def bench_quantized(
    name: str, path: Path, dtype: torch.dtype, device: str, args: argparse.Namespace, rows: list[Row], checks: list
) -> None:
    """Forward with quantized weights vs the same model unquantized (ours both)."""
    import importlib.util

    from transformer_hooks.loading.quantize import QuantizeError, check_quantize, model_bytes

    dname = str(dtype).removeprefix("torch.")
    dense = HookedTransformer.from_pretrained_no_processing(str(path), device=device, dtype=dtype)
    tokens = torch.randint(0, dense.cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    schemes = ["int8", "int4"] + (["bnb-int8", "bnb-nf4"] if importlib.util.find_spec("bitsandbytes") else [])
    for scheme in schemes:
        try:
            check_quantize(scheme, device, dtype, warn=False)
            quantized = HookedTransformer.from_pretrained_no_processing(
                str(path), device=device, dtype=dtype, quantize=scheme
            )
        except QuantizeError as e:
            print(f"  {name} {dname} quantize={scheme}: skipped ({e})", flush=True)
            continue
        with torch.inference_mode():
            ref = dense(tokens).float()
            diff = ((quantized(tokens).float() - ref).abs().max() / ref.abs().max()).item()
            p = paired(lambda: dense(tokens), lambda q=quantized: q(tokens), args.runs)
        checks.append(dict(model=name, dtype=dname, check=f"max |logits {scheme} - unquantized| / max", value=diff))
        note = (
            f"baseline: ours unquantized; weights {model_bytes(quantized) / 2**20:.1f} MiB "
            f"vs {model_bytes(dense) / 2**20:.1f} MiB"
        )
        rows.append(
            Row(
                name,
                dname,
                f"{args.batch}x{args.seq}",
                f"forward quantize={scheme}",
                p.hf * 1e3,
                p.ours * 1e3,
                p.ratio,
                "ms",
                note,
            )
        )
        print(f"  {name} {dname} quantize={scheme}: ratio {p.ratio:.2f}x, logits diff {diff:.3g}", flush=True)
        free_memory()


def free_memory() -> None:
    """After a bench function returned (its models are garbage now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_multi_gpu(
    name: str, path: Path, dtype: torch.dtype, args: argparse.Namespace, rows: list[Row], checks: list[dict]
) -> None:
    """Forward with the model split over every GPU: ours device_map="auto" vs HF's."""
    dname = str(dtype).removeprefix("torch.")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, device_map="auto").eval()
    try:
        ours = HookedTransformer.from_pretrained_no_processing(str(path), dtype=dtype, device_map="auto")
    except TypeError as e:
        print(f"  device_map: skipped ({e})")
        return
    tokens = torch.randint(0, ours.cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(
        "cuda:0"
    )
    with torch.inference_mode():
        diff = (hf(tokens).logits.float().cpu() - ours(tokens).float().cpu()).abs().max().item()
        checks.append(dict(model=name, dtype=dname, check="max |logits, device_map auto|", value=diff))
        p = paired(lambda: hf(tokens).logits, lambda: ours(tokens), args.runs)
    n = torch.cuda.device_count()
    rows.append(
        Row(
            name,
            dname,
            f"{args.batch}x{args.seq}",
            f"forward, device_map auto over {n} GPUs",
            p.hf * 1e3,
            p.ours * 1e3,
            p.ratio,
            "ms",
            "HF: device_map='auto'",
        )
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| model | dtype | shape | scenario | HF | transformer_hooks | ratio | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.dtype} | {r.shape} | {r.scenario} | {r.hf:.1f} {r.unit} | {r.ours:.1f} {r.unit} | "
        f"{r.ratio:.2f}x | {r.note} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke test)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="toy sizes, 3 runs: checks the script end to end")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 10; --quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/gpu.json (not with --quick)")
    parser.add_argument("--write", type=Path, default=None, help="default: benchmarks/RESULTS.md (not with --quick)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device here, nothing measured. It needs a GPU; "
            "`--device cpu --quick` runs it end to end at toy sizes."
        )
        return 0
    here = Path(__file__).resolve().parent
    if not args.quick:
        args.json = args.json or here / "gpu.json"
        args.write = args.write or here / "RESULTS.md"
    args.runs = args.runs or (3 if args.quick else 10)
    args.batch, args.seq = (2, 32) if args.quick else (8, 512)
    args.prompt_len, args.new_tokens = (8, 8) if args.quick else (64, 64)
    args.ioi_batch = 2 if args.quick else 8
    configs = QUICK if args.quick else MODELS
    models = [m.strip() for m in args.models.split(",")]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    if set(models) - set(configs):
        parser.error(f"unknown models {sorted(set(models) - set(configs))}; choose from {list(configs)}")

    rows: list[Row] = []
    checks: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            path = build_checkpoint(name, configs[name], Path(tmp))
            for dtype in dtypes:
                print(f"{name}, {dtype}:", flush=True)
                bench(name, path, dtype, args.device, args, rows, checks)
                free_memory()
                bench_quantized(name, path, dtype, args.device, args, rows, checks)
                free_memory()
                if args.device.startswith("cuda") and torch.cuda.device_count() > 1:
                    bench_multi_gpu(name, path, dtype, args, rows, checks)
                    free_memory()
                if (args.device.startswith("cuda") and torch.cuda.device_count() > 1) or args.quick:
                    bench_split_sweep(name, path, dtype, args.device, args, rows, checks)
                    free_memory()
    seconds = time.perf_counter() - started
    gpus = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if args.device.startswith("cuda")
        else "none (CPU run)"
    )
    header = (
        f"Machine: {machine()}; GPUs: {gpus}; {args.runs} interleaved runs per measurement; "
        f"total {seconds:.0f} s.\n\nRatio = transformer_hooks / HF (SDPA) of median wall times, lower is "
        f"better; generation compares tokens per second, higher is better."
    )
    body = "\n\n".join(
        [
            header,
            table(rows),
            "Checks (same numbers as HF):",
            "\n".join(f"- {c['model']} {c['dtype']}: {c['check']} = {c['value']:.3g}" for c in checks),
        ]
    )
    print("\n" + body)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "gpus": gpus,
                    "seconds": seconds,
                    "rows": [asdict(r) for r in rows],
                    "checks": checks,
                    "median_ratio": statistics.median(r.ratio for r in rows) if rows else None,
                },
                indent=1,
            )
        )
        print(f"\nwritten to {args.json}")
    if args.write:
        flags = [a for a in (argv if argv is not None else sys.argv[1:])]
        write_section(args.write, body, "GPU", shlex.join(["python", "benchmarks/gpu.py", *flags]))
        print(f"written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
