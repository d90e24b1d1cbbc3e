"""Memory: repeated caching keeps the resident set flat, a deleted model is freed at once
(nothing holds it in a reference cycle), and cached activations carry no autograd graph
unless one was asked for.

RSS is read from /proc/self/statm (resident pages x page size). That a deleted model's
tensors are released is checked with weak references, not RSS: glibc keeps freed heap
memory mapped (its mmap threshold adapts to the sizes freed), so in a long test process
RSS after ``del`` says little about what the library holds.
"""

from __future__ import annotations

import gc
import math
import os
import weakref

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer

PAGE = os.sysconf("SC_PAGE_SIZE")
CALLS, WARMUP, MAX_GROWTH = 200, 20, 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())


@pytest.fixture(scope="module")
def model(hooked_model) -> HookedTransformer:
    return hooked_model("gpt2")


def test_rss_stays_flat_over_200_run_with_cache_calls(model, capsys):
    # Size the batch so that keeping every cache alive would cross the threshold twice over,
    # whatever this process's RSS already is (it grows with the other tests' models).
    row = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    per_row = cache_bytes(model.run_with_cache(row)[1])
    rows = max(4, math.ceil(2 * MAX_GROWTH * rss_bytes() / (CALLS * per_row)))
    tokens = torch.randint(0, VOCAB, (rows, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(WARMUP):
        _, cache = model.run_with_cache(tokens)
    one_cache = cache_bytes(cache)
    del cache
    gc.collect()
    start = rss_bytes()
    assert CALLS * one_cache > 1.5 * MAX_GROWTH * start, "caches too small for this test to see a leak"

    peak = start
    for i in range(CALLS):
        logits, cache = model.run_with_cache(tokens)
        assert cache["resid_post", -1].shape == (*tokens.shape, model.cfg.d_model)
        del logits, cache
        if i % 20 == 19:  # fail early rather than after eating gigabytes
            peak = max(peak, rss_bytes())
            assert peak - start < MAX_GROWTH * start, f"RSS grew {(peak - start) / 2**20:.1f} MiB after {i + 1} calls"
    growth = (rss_bytes() - start) / start
    with capsys.disabled():
        print(
            f"\n[memory] {CALLS} x run_with_cache ({one_cache / 2**20:.1f} MiB each): RSS {start / 2**20:.0f} MiB "
            f"-> {rss_bytes() / 2**20:.0f} MiB ({100 * growth:+.2f}%), peak {(peak - start) / 2**20:+.1f} MiB"
        )
    assert growth < MAX_GROWTH


def _exercise(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Every API that could leave a reference to the model or its tensors behind."""
    from transformer_hooks.interventions.patching import get_act_patch_resid_pre

    model(tokens)
    _, cache = model.run_with_cache(tokens)
    cache.get_full_resid_decomposition(expand_neurons=False)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 1.0)])
    with model.hooks(bwd_hooks=[("hook_embed", lambda g, hook: None)]):
        model(tokens, return_type="loss").backward()
    model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    get_act_patch_resid_pre(model, tokens, cache, lambda logits: logits[:, -1, 0].mean(), progress=False)
    return cache["resid_post", -1]


@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "processed"])
def test_deleted_model_is_freed_without_the_cycle_collector(hf_checkpoint, processed):
    path, _ = hf_checkpoint("llama-gqa")
    load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    model = load(str(path))
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    cached = _exercise(model, tokens)
    refs = {
        "model": weakref.ref(model),
        "W_E": weakref.ref(model.embed.W_E),
        "W_Q[0]": weakref.ref(model.blocks[0].attn.W_Q),
        "grad": weakref.ref(model.embed.W_E.grad),
        "hook point": weakref.ref(model.blocks[0].hook_resid_pre),
        "cached": weakref.ref(cached),
    }
    gc.collect()
    gc.disable()  # reference counting alone must free it: a cycle would keep it until a collection
    try:
        del model, cached
        alive = [name for name, ref in refs.items() if ref() is not None]
    finally:
        gc.enable()
    assert not alive, f"still alive after del (held by a reference cycle or a global): {alive}"


# Detached caches -------------------------------------------------------------------------------
def test_cached_activations_are_detached_by_default(model):
    assert model.embed.W_E.requires_grad, "weights must require grad for this test to mean anything"
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    for kwargs in (
        dict(),
        dict(names_filter=lambda n: True),
        dict(remove_batch_dim=True, input=tokens[:1]),
        dict(device="cpu"),
    ):
        _, cache = model.run_with_cache(kwargs.pop("input", tokens), **kwargs)
        graph = [name for name, t in cache.items() if t.requires_grad or t.grad_fn is not None]
        assert not graph, f"{kwargs}: cached with an autograd graph: {graph}"
        stacks = (
            cache.accumulated_resid(),
            cache.decompose_resid(),
            cache.stack_head_results(),
            cache.get_full_resid_decomposition(expand_neurons=True),
        )
        assert not any(s.requires_grad for s in stacks), "a stack built from a detached cache carries a graph"


def test_cached_gradients_are_detached(model):
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    assert "blocks.0.hook_resid_pre_grad" in cache
    graph = [name for name, t in cache.items() if t.requires_grad or t.grad_fn is not None]
    assert not graph, f"cached with an autograd graph: {graph}"


def test_detach_false_keeps_the_graph_for_gradients(model):
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    _, cache = model.run_with_cache(tokens, detach=False)
    resid = cache["resid_post", -1]
    assert resid.requires_grad and resid.grad_fn is not None
    (grad,) = torch.autograd.grad(resid.sum(), model.embed.W_E)
    assert grad.abs().sum() > 0
    assert model.embed.W_E.grad is None, "autograd.grad must not touch .grad"


KEEP_FREED_PROBE = """
import resource, sys, torch
from transformer_hooks.memory import keep_freed_memory
if sys.argv[1] in ("keep", "restored"):
    assert keep_freed_memory()
if sys.argv[1] == "restored":
    assert keep_freed_memory(False)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 64 * 2**18  # 64 MiB of float32
counts = []
for _ in range(11):  # the first ones are fresh memory either way, while the heap grows
    before = faults()
    torch.empty(n).fill_(1)
    counts.append(faults() - before)
print(sorted(counts)[len(counts) // 2])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="glibc's malloc: Linux only")
def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_them_in_again():
    """64 MiB freed and allocated again (median of 11 times): 16384 fresh 4 KiB pages with
    glibc's defaults (the block was unmapped), none once freed memory is kept, as many again
    after keep_freed_memory(False). In a child process: the setting is process-wide."""
    import subprocess
    import sys

    def faults_per_allocation(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    pages = 64 * 2**20 / PAGE
    assert faults_per_allocation("default") > 0.9 * pages
    assert faults_per_allocation("keep") < 0.01 * pages
    assert faults_per_allocation("restored") > 0.9 * pages


LARGE_CACHE_PROBE = """
import resource, torch
from transformer_hooks import HookedTransformer
model = HookedTransformer.from_pretrained_no_processing("smollm2-135m-instruct")
tokens = torch.randint(0, model.cfg.d_vocab, (1, 1024), generator=torch.Generator().manual_seed(0))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
with torch.inference_mode():
    for _ in range(3):  # every layer's scores and pattern: a 2.3 GB cache
        before = faults()
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores")))
        counts.append(faults() - before)
        pages = sum(t.untyped_storage().nbytes() for t in cache.values()) / resource.getpagesize()
        del cache
print(counts[-1], pages)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_kept_for_a_cache_larger_than_2_gib():
    """glibc returns the whole free top of its heap once it passes the trim threshold, and
    mallopt's largest finite threshold is 2 GiB: with it, a cache bigger than that (SmolLM2's
    scores and patterns at 1 x 1024, 2.3 GB) was faulted in afresh on every call. The default
    never trims, so the third call reuses the memory of the second."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LARGE_CACHE_PROBE], capture_output=True, text=True, check=True)
    faults, pages = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    assert pages * PAGE > 2**31, "the cache must be larger than 2 GiB for this test to mean anything"
    # Trimming at 2 GiB faults in nearly every page each call. Kept memory faults in almost none
    # alone (< 1%), but 9% (about 190 MB) when this runs after the rest of the suite, for a
    # reason not found yet (the child process is fresh either way): a quarter still separates them.
    assert faults < 0.25 * pages, f"{faults:.0f} page faults for a cache of {pages:.0f} pages"


# Reusing freed memory by default -------------------------------------------------------------
def test_a_held_cache_is_never_overwritten_by_later_runs(model):
    """run_with_cache keeps freed memory for reuse: the runs after it must reuse only what
    was freed, never a tensor of a cache still held."""
    first, other = (torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    _, held = model.run_with_cache(first)
    copies = {name: t.clone() for name, t in held.items()}
    for _ in range(5):
        _, cache = model.run_with_cache(other)
        del cache
        gc.collect()
    changed = [name for name, t in held.items() if not torch.equal(t, copies[name])]
    assert not changed, f"a later run wrote into a held cache: {changed}"
    _, again = model.run_with_cache(first)
    assert all(torch.equal(again[name], t) for name, t in held.items())


REUSE_PROBE = """
import gc, os, resource, statistics, sys, torch
from transformer_hooks import HookedTransformer, memory
if sys.argv[2] == "opt-out":
    memory.keep_freed_memory(False)
model = HookedTransformer.from_pretrained_no_processing(sys.argv[1])
tokens = torch.randint(0, int(sys.argv[3]), (16, 64), generator=torch.Generator().manual_seed(0))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
with torch.inference_mode():
    for _ in range(9):
        before = faults()
        _, cache = model.run_with_cache(tokens)
        counts.append(faults() - before)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.values()}
        nbytes = sum(storages.values())
        del cache
        gc.collect()
print(statistics.median(counts[3:]), nbytes / os.sysconf("SC_PAGE_SIZE"), memory.keep_freed_memory_by_default())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="glibc's malloc: Linux only")
def test_repeated_run_with_cache_reuses_memory_by_default(hf_checkpoint):
    """With no setting, the fourth and later run_with_cache calls in a fresh process fault in
    almost none of the cache's pages (they reuse the previous cache's); after
    keep_freed_memory(False) each call faults most of them in again (in a child process:
    the setting is process-wide)."""
    import subprocess
    import sys

    path, _ = hf_checkpoint("gpt2")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k != "TRANSFORMER_HOOKS_KEEP_FREED_MEMORY"
    }

    def probe(mode: str, **extra: str) -> tuple[float, float, str]:
        out = subprocess.run(
            [sys.executable, "-c", REUSE_PROBE, str(path), mode, str(VOCAB)],
            capture_output=True,
            text=True,
            check=True,
            env={**env, **extra},
        )
        faults, pages, again = out.stdout.split()[-3:]
        return float(faults), float(pages), again

    faults, pages, again = probe("default")
    assert faults < 0.05 * pages, f"{faults:.0f} page faults per run_with_cache for a cache of {pages:.0f} pages"
    assert again == "False", "the default must apply once per process"
    faults, pages, _ = probe("opt-out")
    assert faults > 0.5 * pages, (
        f"opted out, yet only {faults:.0f} faults for {pages:.0f} pages: is the probe measuring?"
    )


def test_the_default_leaves_a_choice_made_by_the_environment_alone(hf_checkpoint):
    import subprocess
    import sys

    script = "from transformer_hooks import memory; print(memory.keep_freed_memory_by_default())"
    for variable, value in (("TRANSFORMER_HOOKS_KEEP_FREED_MEMORY", "0"), ("MALLOC_MMAP_THRESHOLD_", "131072")):
        env = {**os.environ, variable: value}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.split()[-1] == "False", f"{variable}={value} must leave glibc's settings alone"
