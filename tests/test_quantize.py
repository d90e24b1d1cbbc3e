"""Quantized loads (loading/quantize.py) on CPU with torchao: the quantized model computes what
the model with its dequantized weights computes (float rounding apart), each linear moves
by at most half a quantization step per weight against full precision (the bound derived
from the scheme's step, with every other input held at the full-precision values through
hooks), gradients flow to activations, and bad choices say what to do."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from checkpoints import save_checkpoint

from transformer_hooks import HookedTransformer
from transformer_hooks.loading.quantize import (
    MATRIX,
    Packed,
    QuantizedWeight,
    QuantizeError,
    check_quantize,
    int4_group_size,
    is_quantized_parameter,
    model_bytes,
    quantized_matrix_bytes,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")

# Widths that int4's CPU kernel packs (inputs in groups of 32, outputs by 16).
MODELS = {
    "gpt2": dict(n_embd=64, n_head=4),
    "llama-gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
}
SCHEMES = ["int8", "int4"]
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 2, 6, 6, 1, 9, 3, 10]])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    return {name: save_checkpoint(name, root, **overrides)[0] for name, overrides in MODELS.items()}


@pytest.fixture(scope="module")
def loaded(paths):
    out = {}
    for name, path in paths.items():
        out[name, None] = HookedTransformer.from_pretrained(str(path))
        for scheme in SCHEMES:
            out[name, scheme] = HookedTransformer.from_pretrained(str(path), quantize=scheme)
    return out


def _dequantized_copy(quantized: HookedTransformer, path) -> HookedTransformer:
    """A plain model (no quantization) holding the quantized model's dequantized weights."""
    model = HookedTransformer.from_pretrained(str(path))
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = quantized.get_parameter(name)
            p.copy_(q.dequantize() if isinstance(q, QuantizedWeight) else q)
    return model


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls = [0]
    for cls in Packed.__subclasses__():
        original = cls.linear

        def counted(self, x, bias, original=original):
            calls[0] += 1
            return original(self, x, bias)

        monkeypatch.setattr(cls, "linear", counted)
    return calls


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of sums taken in another order: 1e-4 of the tensor's scale
    (float32's 1.2e-7 times sums of a few hundred terms, over two layers)."""
    finite = b.isfinite()
    if not torch.equal(finite, a.isfinite()) or not torch.equal(a[~finite], b[~finite]):  # the masked scores
        return False
    a, b = a[finite], b[finite]
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantized_model_computes_what_its_dequantized_weights_compute(loaded, paths, name, scheme, monkeypatch):
    quantized = loaded[name, scheme]
    quantized_names = [n for n, p in quantized.named_parameters() if isinstance(p, QuantizedWeight)]
    assert quantized_names == [n for n, _ in quantized.named_parameters() if is_quantized_parameter(n)]
    assert len(quantized_names) == quantized.cfg.n_layers * (7 if quantized.cfg.gated_mlp else 6)
    dense = _dequantized_copy(quantized, paths[name])
    calls = _count_kernel_calls(monkeypatch)
    logits, cache = quantized.run_with_cache(TOKENS)
    assert calls[0] == len(quantized_names)  # every quantized matrix ran the library's kernel, once
    ref_logits, ref_cache = dense.run_with_cache(TOKENS)
    assert set(cache.keys()) == set(ref_cache.keys())
    for key in ref_cache.keys():
        assert _close(cache[key], ref_cache[key]), key
    assert _close(logits, ref_logits)

    # hooks that change activations (a head ablated) see and do the same
    def ablate(z, hook):
        z[:, :, 1] = 0
        return z

    hooks = [("blocks.0.attn.hook_z", ablate)]
    assert _close(quantized.run_with_hooks(TOKENS, fwd_hooks=hooks), dense.run_with_hooks(TOKENS, fwd_hooks=hooks))
    # gradients reach activations through the quantized matrices (attribution patching), as through dense ones
    grads = []
    for model in (quantized, dense):
        model.zero_grad()
        model(TOKENS).logsumexp(-1).sum().backward()
        grads.append(model.embed.W_E.grad.clone())
    assert all(quantized.get_parameter(n).grad is None for n in quantized_names)  # quantized weights get none
    assert _close(grads[0], grads[1])


def _step(W: torch.Tensor, scheme: str) -> torch.Tensor:
    """The quantization step of each weight of an [out, in] matrix: int8 is symmetric per row
    (255 levels over [-max|w|, max|w|]); int4 is affine per group of inputs (16 levels over [min, max])."""
    if scheme == "int8":
        return (W.abs().amax(1, keepdim=True) / 127.5).expand_as(W)
    group = int4_group_size(W.shape[1])
    g = W.unflatten(1, (-1, group))
    return ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g).flatten(1)


# site read by each quantized matrix -> site it writes, and the matrix
LINEARS = [
    ("ln1.hook_normalized", "attn.hook_q", "attn", "W_Q"),
    ("ln1.hook_normalized", "attn.hook_k", "attn", "W_K"),
    ("ln1.hook_normalized", "attn.hook_v", "attn", "W_V"),
    ("attn.hook_z", "hook_attn_out", "attn", "W_O"),
    ("ln2.hook_normalized", "mlp.hook_pre", "mlp", "W_gate|W_in"),
    ("ln2.hook_normalized", "mlp.hook_pre_linear", "mlp", "W_in"),
    ("mlp.hook_post", "hook_mlp_out", "mlp", "W_out"),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_linear_moves_by_at_most_half_a_step_per_weight(loaded, name, scheme):
    """With every matrix's input held at the full-precision model's value (hooks), each output
    differs from full precision by the quantization error of that matrix alone, which is at most
    sum_k |x_k| * step_jk / 2 (plus float32 rounding of the sum)."""
    full, quantized = loaded[name, None], loaded[name, scheme]
    _, ref = full.run_with_cache(TOKENS)
    inputs = {f"blocks.{L}.{site}" for L in range(full.cfg.n_layers) for site, *_ in LINEARS}
    forced = [(site, lambda x, hook: ref[hook.name].clone()) for site in sorted(inputs) if site in ref]
    with quantized.hooks(fwd_hooks=forced):
        _, got = quantized.run_with_cache(TOKENS)
    used = []
    for L in range(full.cfg.n_layers):
        block = full.blocks[L]
        for src, dst, module, leaf in LINEARS:
            src, dst = f"blocks.{L}.{src}", f"blocks.{L}.{dst}"
            if dst not in ref:
                continue
            leaf = leaf.split("|")[0] if full.cfg.gated_mlp else leaf.split("|")[-1]
            W = MATRIX[leaf](getattr(getattr(block, module), leaf).detach())  # [out, in], full precision
            x = ref[src].flatten(-2) if src.endswith("hook_z") else ref[src]
            bound = x.abs() @ (_step(W, scheme) / 2).T * (1 + 1e-3) + 1e-5 * (x.abs() @ W.abs().T)
            error = (
                (got[dst] - ref[dst]).flatten(2)
                if dst.endswith(("hook_q", "hook_k", "hook_v"))
                else got[dst] - ref[dst]
            )
            bound = bound if error.shape == bound.shape else bound.unflatten(-1, error.shape[-2:])
            assert bool((error.abs() <= bound.reshape(error.shape)).all()), (dst, (error.abs() / bound).max())
            used.append((error.abs() / bound.reshape(error.shape)).max().item())
    assert len(used) == full.cfg.n_layers * (7 if full.cfg.gated_mlp else 6)
    assert min(used) > 0.01  # the weights were quantized: the errors are of the order of the bound


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_bytes_are_what_the_formula_says(loaded, scheme):
    for name in MODELS:
        full, quantized = loaded[name, None], loaded[name, scheme]
        for pname, p in quantized.named_parameters():
            if isinstance(p, QuantizedWeight):
                n_out, n_in = MATRIX[pname.rpartition(".")[2]](full.get_parameter(pname)).shape
                assert p.nbytes == quantized_matrix_bytes(n_out, n_in, scheme, torch.float32)
                assert p.nbytes == sum(t.numel() * t.element_size() for t in p.packed.tensors())
        assert model_bytes(quantized) < model_bytes(full)


def test_weight_views_and_processing_read_the_dequantized_weights(loaded, paths):
    quantized = loaded["llama-gqa", "int8"]
    dense = _dequantized_copy(quantized, paths["llama-gqa"])
    for view in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out", "W_U", "W_E"):
        assert torch.equal(getattr(quantized, view), getattr(dense, view)), view
    assert torch.allclose(quantized.OV.AB, dense.OV.AB)
    unprocessed = HookedTransformer.from_pretrained_no_processing(str(paths["llama-gqa"]), quantize="int8")
    with pytest.raises(QuantizeError, match="quantize them a second time"):
        unprocessed.process_weights_()
    with pytest.raises(QuantizeError, match="keeps its dtype"):
        quantized.blocks[0].attn.W_Q.to(torch.float16)
    assert quantized.blocks[0].attn.W_Q.to("cpu") is quantized.blocks[0].attn.W_Q
    with torch.no_grad(), pytest.raises(QuantizeError, match="zero_ would change a quantized weight"):
        quantized.blocks[0].attn.W_Q.zero_()
    with torch.no_grad(), pytest.raises(QuantizeError, match="load without quantize= to edit weights"):
        quantized.blocks[0].mlp.W_out[0] = 1.0


def test_bad_choices_name_the_choices_and_the_fix(paths, monkeypatch):
    path = str(paths["gpt2"])
    with pytest.raises(QuantizeError, match="'int3' is not a choice: quantize takes None, 'int8'"):
        HookedTransformer.from_pretrained(path, quantize="int3")
    with pytest.raises(QuantizeError, match="does not combine with offload"):
        HookedTransformer.from_pretrained(path, quantize="int8", offload="cpu")
    with pytest.raises(QuantizeError, match="bitsandbytes' kernels run on CUDA only.*'int8' or 'int4'"):
        check_quantize("bnb-nf4", "cpu", torch.float32)
    with pytest.raises(QuantizeError, match="takes bfloat16 weights.*dtype='bfloat16'"):
        check_quantize("int4", "cuda", torch.float32)
    with pytest.raises(QuantizeError, match="run on CPU and CUDA, not mps"):
        check_quantize("int4", "mps", torch.float32)
    assert check_quantize("int4", "cuda", torch.bfloat16) is not None  # the check alone: no GPU needed
    with pytest.warns(UserWarning, match="dtype='bfloat16' for its fast kernel"):
        check_quantize("int4", "cpu", torch.float32)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    with pytest.raises(QuantizeError, match=r"needs torchao.*pip install 'transformer_hooks\[quant\]'"):
        HookedTransformer.from_pretrained(path, quantize="int8")


def test_int4_needs_inputs_in_groups(tmp_path):
    path, _ = save_checkpoint("gpt2", tmp_path)  # d_model 48: no int4 group size divides it
    with pytest.raises(QuantizeError, match="none divides"):
        HookedTransformer.from_pretrained(str(path), quantize="int4")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["int8", "int4", "bnb-int8", "bnb-nf4"])
def test_cuda_schemes_compute_what_their_dequantized_weights_compute(paths, scheme):
    if scheme.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    path = paths["llama-gqa"]
    quantized = HookedTransformer.from_pretrained(str(path), device="cuda", dtype="bfloat16", quantize=scheme)
    dense = HookedTransformer.from_pretrained(str(path), device="cuda", dtype="bfloat16")
    with torch.no_grad():
        for n, p in dense.named_parameters():
            q = quantized.get_parameter(n)
            p.copy_(q.dequantize() if isinstance(q, QuantizedWeight) else q)
    tokens = TOKENS.cuda()
    a, b = quantized(tokens).float(), dense(tokens).float()
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()  # bfloat16 rounding (8 bits of mantissa)


def _pipeline_worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = HookedTransformer.from_pretrained(path, quantize="int8", pipeline_ranks=world)
        held = [n for n, p in model.named_parameters() if isinstance(p, QuantizedWeight)]
        logits, cache = model.run_with_cache(TOKENS)
        result = {"held": held}
        if logits is not None:
            result.update(logits=logits, cache={k: cache[k] for k in cache.keys()})
        torch.save(result, f"{out}.rank{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_a_quantized_model_split_over_two_processes_equals_one_process(loaded, paths, tmp_path):
    from ranks import free_port, run_ranks

    out, port = str(tmp_path / "result"), free_port()
    codes = run_ranks(_pipeline_worker, lambda rank: (rank, 2, port, str(paths["llama-gqa"]), out), world=2)
    assert codes == [0, 0]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    one = loaded["llama-gqa", "int8"]
    assert sorted(ranks[0]["held"] + ranks[1]["held"]) == sorted(
        n for n, p in one.named_parameters() if isinstance(p, QuantizedWeight)
    )  # each rank quantized its own blocks
    logits, cache = one.run_with_cache(TOKENS)
    assert _close(ranks[0]["logits"], logits)
    assert set(ranks[0]["cache"]) == set(cache.keys())
    for key, value in ranks[0]["cache"].items():
        assert _close(value, cache[key]), key
