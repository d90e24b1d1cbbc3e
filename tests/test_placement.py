"""Placement across devices (placement.py, and from_pretrained(device_map=...)): blocks
whole, embed first, final last; bad maps refused with a clear error. On a CPU-only
machine every device is "cpu"; the tests that need GPUs are marked ``cuda``."""

from __future__ import annotations

import pytest
import torch

from transformer_hooks.config import ModelConfig
from transformer_hooks.loading.placement import (
    PlacementError,
    check_device,
    check_device_map,
    group_of,
    resolve_device_map,
)

CFG = ModelConfig(
    d_model=32,
    n_layers=4,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    d_vocab=101,
    n_ctx=64,
    act_fn="gelu",
    normalization_type="LN",
    eps=1e-5,
    positional_embedding="learned",
)
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)


def test_group_of_names():
    assert group_of("blocks.3.attn.W_Q") == "blocks.3"
    assert group_of("blocks.12") == "blocks.12"
    assert group_of("pos_embed.W_pos") == "embed" and group_of("unembed.W_U") == "final"
    assert group_of("ln_final.w") == "final"


def test_dict_map_with_rest_and_aliases():
    placement = check_device_map(
        CFG, {"embed": "cpu", "blocks.0": "cpu", "unembed": "cpu", "ln_final": "cpu", "": "cpu"}
    )
    assert list(placement) == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "final"]
    assert set(placement.values()) == {"cpu"}


def test_bad_maps_have_clear_errors():
    with pytest.raises(PlacementError, match="leaves blocks.2, blocks.3, final unplaced"):
        check_device_map(CFG, {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu"})
    with pytest.raises(PlacementError, match="key 'blocks.9' names no part of this model"):
        check_device_map(CFG, {"blocks.9": "cpu", "": "cpu"})
    with pytest.raises(PlacementError, match="unknown device 'gpu:0'"):
        check_device_map(CFG, {"": "gpu:0"})
    if torch.cuda.device_count() < 8:
        with pytest.raises(PlacementError, match="names 'cuda:7', but this machine has"):
            check_device_map(CFG, {"": "cuda:7"})
    with pytest.raises(PlacementError, match="'meta', which holds no data"):
        check_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(PlacementError, match="a group is placed whole"):
            check_device_map(CFG, {"ln_final": "cpu", "unembed": 0, "": "cpu"})


def test_resolve_modes():
    assert resolve_device_map(CFG) is None
    placement = resolve_device_map(CFG, "auto")
    assert placement == {g: placement["embed"] for g in placement}
    assert resolve_device_map(CFG, {"": "cpu"}) == {g: "cpu" for g in placement}
    with pytest.raises(PlacementError, match="device_map must be 'auto', 'balanced', 'sequential' or a dict"):
        resolve_device_map(CFG, "everywhere")
    with pytest.raises(PlacementError, match="more than its max_memory"):
        resolve_device_map(CFG, {"": "cpu"}, max_memory={"cpu": "10KiB"})
    with pytest.raises(PlacementError, match="does not fit max_memory"):
        resolve_device_map(CFG, "auto", max_memory={"cpu": 1000})
    with pytest.raises(PlacementError, match="n_devices=5"):
        resolve_device_map(CFG, n_devices=5, max_memory={"cpu": "1GiB"})


@pytest.mark.cuda
@needs_two_gpus
def test_balanced_over_two_gpus_keeps_order():
    placement = resolve_device_map(CFG, n_devices=2)
    assert placement["embed"] == "cuda:0" and placement["final"] == "cuda:1"
    devices = [placement[g] for g in placement]
    assert devices == sorted(devices)


# Offload ------------------------------------------------------------------------------------
def _same_everything(a, b, tokens):
    assert torch.equal(a(tokens), b(tokens))
    _, ca = a.run_with_cache(tokens)
    _, cb = b.run_with_cache(tokens)
    assert set(ca.keys()) == set(cb.keys()) and all(torch.equal(ca[k], cb[k]) for k in ca.keys())
    grads = []
    for model in (a, b):  # gradients through a hook: d loss / d resid_pre of block 1
        seen = {}
        with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook, seen=seen: seen.update(g=g.clone()))]):
            model(tokens, return_type="loss").backward()
        grads.append(seen["g"])
        model.zero_grad(set_to_none=True)
    assert torch.equal(*grads)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_is_exact_on_cpu(hf_checkpoint, tmp_path, kind):
    from transformer_hooks import HookedTransformer
    from transformer_hooks.loading.offload import offload_blocks

    path, _ = hf_checkpoint("llama-gqa")
    plain = HookedTransformer.from_pretrained(str(path))
    offloaded = offload_blocks(HookedTransformer.from_pretrained(str(path)), kind, offload_dir=tmp_path / "off")
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    _same_everything(plain, offloaded, tokens)
    if kind == "disk":
        files = sorted((tmp_path / "off").glob("blocks.*.safetensors"))
        assert [f.name for f in files] == ["blocks.0.safetensors", "blocks.1.safetensors"]
        maps = open("/proc/self/maps").read() if __import__("os").path.exists("/proc/self/maps") else None
        if maps is not None:  # the block weights are file pages, not copies
            assert str(files[0]) in maps


def test_offload_disk_needs_a_directory():
    from transformer_hooks.loading.offload import BlockOffload

    with pytest.raises(ValueError, match="offload='disk' needs offload_dir"):
        BlockOffload("disk", "cpu")
    with pytest.raises(ValueError, match="offload must be 'cpu' or 'disk'"):
        BlockOffload("gpu", "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_to_cuda_matches_cuda(hf_checkpoint, tmp_path, kind):
    from transformer_hooks import HookedTransformer
    from transformer_hooks.loading.offload import offload_blocks

    path, _ = hf_checkpoint("llama-gqa")
    plain = HookedTransformer.from_pretrained(str(path), device="cuda")
    offloaded = offload_blocks(
        HookedTransformer.from_pretrained(str(path)), kind, device="cuda", offload_dir=tmp_path / "off"
    )
    assert offloaded.blocks[0].attn.W_Q.device.type == "cpu"
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    torch.testing.assert_close(plain(tokens), offloaded(tokens), rtol=0, atol=1e-5)


# from_pretrained(device_map=...) ---------------------------------------------------------------
def test_from_pretrained_with_a_cpu_device_map_is_exact(hf_checkpoint):
    from transformer_hooks import HookedTransformer

    path, _ = hf_checkpoint("llama-gqa")
    plain = HookedTransformer.from_pretrained(str(path))
    tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    cpu_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "ln_final": "cpu", "unembed": "cpu"}
    for kwargs in (
        dict(device_map=cpu_map),
        dict(device_map="auto"),
        dict(device_map="balanced"),
        dict(n_devices=1, max_memory={"cpu": "1GiB"}),
    ):
        placed = HookedTransformer.from_pretrained(str(path), **kwargs)
        assert placed.cfg.device_map == {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "final": "cpu"}
        assert torch.equal(placed(tokens), plain(tokens))
        assert torch.equal(
            placed.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False),
            plain.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False),
        )
    assert plain.cfg.device_map is None


def test_from_pretrained_refuses_bad_placement_before_reading_weights(hf_checkpoint):
    from transformer_hooks import HookedTransformer

    path, _ = hf_checkpoint("llama-gqa")
    with pytest.raises(PlacementError, match="leaves blocks.1, final unplaced"):
        HookedTransformer.from_pretrained(str(path), device_map={"embed": "cpu", "blocks.0": "cpu"})
    with pytest.raises(PlacementError, match="does not fit max_memory"):
        HookedTransformer.from_pretrained(str(path), device_map="auto", max_memory={"cpu": "1KiB"})
    with pytest.raises(PlacementError, match="unknown device"):
        HookedTransformer.from_pretrained(str(path), device_map={"": "npu:0"})
    with pytest.raises(PlacementError, match="n_devices=2"):
        HookedTransformer.from_pretrained(str(path), n_devices=2, max_memory={"cpu": "1GiB"})


def test_place_model_on_a_model_built_in_memory(hf_checkpoint):
    from transformer_hooks import HookedTransformer
    from transformer_hooks.loading.placement import place_model

    path, _ = hf_checkpoint("gpt2")
    model = HookedTransformer.from_pretrained(str(path))
    tokens = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(2))
    before = model(tokens)
    place_model(model, {"": "cpu"})
    assert model.cfg.device_map["final"] == "cpu" and torch.equal(model(tokens), before)


@pytest.mark.cuda
@needs_two_gpus
def test_two_gpus_match_one(hf_checkpoint):
    from transformer_hooks import HookedTransformer

    path, _ = hf_checkpoint("llama-gqa")
    one = HookedTransformer.from_pretrained(str(path), device="cuda:0")
    two = HookedTransformer.from_pretrained(
        str(path), device_map={"embed": 0, "blocks.0": 0, "blocks.1": 1, "final": 1}
    )
    assert two.blocks[1].attn.W_Q.device == torch.device("cuda:1")
    tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    seen = {}
    two.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.update(d=a.device))])
    assert seen["d"] == torch.device("cuda:1")
    torch.testing.assert_close(two(tokens).to("cuda:0"), one(tokens), rtol=0, atol=1e-5)
    _, cache = two.run_with_cache(tokens, device="cpu")
    _, ref = one.run_with_cache(tokens, device="cpu")
    for k in ref.keys():
        torch.testing.assert_close(cache[k], ref[k], rtol=0, atol=1e-5)
    assert torch.equal(
        two.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False).cpu(),
        one.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False).cpu(),
    )


def test_from_pretrained_offload_streams_blocks_to_disk(hf_checkpoint, tmp_path):
    from transformer_hooks import HookedTransformer

    path, _ = hf_checkpoint("pythia")
    plain = HookedTransformer.from_pretrained(str(path))
    off = HookedTransformer.from_pretrained(str(path), offload="disk", offload_dir=tmp_path / "off")
    tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    _same_everything(plain, off, tokens)
    assert sorted(f.name for f in (tmp_path / "off").iterdir()) == ["blocks.0.safetensors", "blocks.1.safetensors"]
    with pytest.raises(PlacementError, match="does not combine with a device_map"):
        HookedTransformer.from_pretrained(str(path), offload="cpu", device_map={"": "cpu"})
    assert HookedTransformer.from_pretrained(str(path), device="cpu", n_devices=1).cfg.device_map["final"] == "cpu"
    if torch.cuda.is_available():
        with pytest.raises(PlacementError, match="device='cpu' disagrees with the placement"):
            HookedTransformer.from_pretrained(str(path), device="cpu", device_map={"": 0})
    with pytest.raises(ValueError, match="offload='disk' needs offload_dir"):
        HookedTransformer.from_pretrained(str(path), offload="disk")


def test_offload_disk_from_a_checkpoint_that_is_not_safetensors(hf_checkpoint, tmp_path):
    """Disk offload writes its own safetensors block files from whatever the checkpoint is
    (here a .bin state dict), so any readable format works; a file given as offload_dir is refused."""
    import shutil

    from safetensors.torch import load_file

    from transformer_hooks import HookedTransformer

    path, _ = hf_checkpoint("gpt2")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(path / "config.json", bin_dir / "config.json")
    torch.save(load_file(str(path / "model.safetensors")), bin_dir / "pytorch_model.bin")
    plain = HookedTransformer.from_pretrained(str(path))
    off = HookedTransformer.from_pretrained(str(bin_dir), offload="disk", offload_dir=tmp_path / "off")
    tokens = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    _same_everything(plain, off, tokens)
    assert sorted(f.name for f in (tmp_path / "off").iterdir()) == ["blocks.0.safetensors", "blocks.1.safetensors"]
    with pytest.raises(ValueError, match=r"offload_dir=.*pytorch_model.bin' is a file, not a directory"):
        HookedTransformer.from_pretrained(str(bin_dir), offload="disk", offload_dir=bin_dir / "pytorch_model.bin")


def test_a_placed_model_caches_patches_and_processes_as_one_device(hf_checkpoint):
    from transformer_hooks import HookedTransformer
    from transformer_hooks.interventions.patching import get_act_patch_resid_pre

    path, _ = hf_checkpoint("gpt2")
    plain = HookedTransformer.from_pretrained_no_processing(str(path))
    placed = HookedTransformer.from_pretrained_no_processing(str(path), device_map={"": "cpu"})
    assert placed.block_devices == [torch.device("cpu")] * placed.cfg.n_layers
    tokens = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(4))
    _same_everything(plain, placed, tokens)
    corrupted = tokens.flip(0)
    _, clean = plain.run_with_cache(tokens)
    _, clean_placed = placed.run_with_cache(tokens)
    metric = lambda logits: logits[:, -1, 3].mean()  # noqa: E731
    assert torch.equal(
        get_act_patch_resid_pre(plain, corrupted, clean, metric, progress=False),
        get_act_patch_resid_pre(placed, corrupted, clean_placed, metric, progress=False),
    )
    plain.process_weights_()
    placed.process_weights_()
    assert placed.cfg.device_map == {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "final": "cpu"}
    assert torch.equal(plain(tokens), placed(tokens))
