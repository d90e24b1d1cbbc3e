"""sites.py, the one table of hook sites, against the real models: every family has exactly
the sites the table says, with the axes it says; the short names, the default cache,
pos_slice, patching's layouts and the error messages all follow the table; the README shows it."""

import re
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB

from transformer_hooks import UnknownHookError, sites
from transformer_hooks.cache import NotCachedError
from transformer_hooks.interventions.patching.engine import _axis_sizes, _layout
from transformer_hooks.utils import IndexOutOfRangeError, check_index, get_act_name

# GPT-2, GPT-Neo, NeoX parallel (Pythia), NeoX sequential, Llama (gated MLP, GQA).
FAMILIES = [
    "gpt2",
    "gpt-neo-local",
    "pythia",
    "neox-sequential-full-rotary",
    "llama-gqa",
    "qwen3",
    "gemma2",
    "gemma3",
    "olmo2",
]
B, P = 2, 5
PER_HEAD_INPUTS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, hooked_model):
    return hooked_model(request.param)


def tokens():
    return torch.randint(0, VOCAB, (B, P), generator=torch.Generator().manual_seed(0))


def full_cache(model, **kwargs):
    """Every site, cached. Observing the per-head inputs makes ln1 read [batch, pos, head,
    d_model] (its scale gains a head axis), so those are cached in a second run."""
    # Lists, not predicates: a predicate leaves out the sites whose TransformerLens switch is off.
    names = list(model.hook_dict)
    _, cache = model.run_with_cache(
        tokens(), names_filter=[n for n in names if not n.endswith(PER_HEAD_INPUTS)], **kwargs
    )
    _, heads = model.run_with_cache(tokens(), names_filter=[n for n in names if n.endswith(PER_HEAD_INPUTS)], **kwargs)
    return {**cache.cache_dict, **heads.cache_dict}


def test_the_model_has_exactly_the_sites_of_the_table_with_their_axes(model):
    cfg = model.cfg
    assert sorted(model.hook_dict) == sorted(sites.hook_names(cfg))
    acts = full_cache(model)
    assert sorted(acts) == sorted(model.hook_dict)
    for name, act in acts.items():
        row = sites.lookup(name)
        assert act.ndim == len(row.axes_in(cfg)), (name, row.axes_in(cfg), tuple(act.shape))
        assert tuple(act.shape) == row.shape(cfg, B, P), (name, row.axes_in(cfg))


def test_the_conditions_are_the_architecture(model):
    cfg = model.cfg
    present = {sites.split_name(n)[1] for n in model.hook_dict}
    assert ("hook_pos_embed" in present) == (cfg.positional_embedding == "learned")
    assert ("attn.hook_rot_q" in present) == (cfg.positional_embedding == "rotary")
    assert ("hook_resid_mid" in present) == (not cfg.parallel_residual)
    assert ("mlp.hook_pre_linear" in present) == cfg.gated_mlp
    assert ("ln1.hook_scale" in present) == hasattr(model.blocks[0].ln1, "hook_scale")
    assert ("ln2_post.hook_normalized" in present) == hasattr(model.blocks[0].ln2_post, "hook_normalized")
    assert ("attn.k_norm.hook_scale" in present) == hasattr(model.blocks[0].attn, "k_norm")
    for row in sites.SITES:
        if not row.when.holds(cfg):
            name = row.full_name(0)
            with pytest.raises(UnknownHookError, match=re.escape(row.when.absent_because.split(":")[0])):
                model.run_with_hooks(tokens(), fwd_hooks=[(name, lambda a, hook: None)])
            _, cache = model.run_with_cache(tokens(), names_filter="hook_embed")
            with pytest.raises(NotCachedError, match=re.escape(row.when.absent_because.split(":")[0])):
                cache[name]


def test_pos_slice_cuts_the_position_axis_the_table_names(model):
    acts = full_cache(model, pos_slice=(1, 3))
    for name, act in acts.items():
        row = sites.lookup(name)
        expected = list(row.shape(model.cfg, B, P))
        expected[row.position_axis] = 2
        assert list(act.shape) == expected, name


def test_default_cache_is_every_site_but_the_per_head_expansions(model):
    """... and hook_mlp_in: the sites whose TransformerLens switch is off, as in TransformerLens."""
    _, cache = model.run_with_cache(tokens())
    expected = [n for n in sites.hook_names(model.cfg) if not sites.lookup(n).tl_flag]
    assert sorted(cache.keys()) == sorted(expected)
    assert all(sites.lookup(n).tl_flag for n in sites.hook_names(model.cfg) if sites.lookup(n).per_head_expansion)
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens())
        assert "blocks.0.attn.hook_result" in cache
    finally:
        model.set_use_attn_result(False)


def test_patching_layouts_follow_the_table(model):
    cfg = model.cfg
    for name in model.hook_dict:
        row = sites.lookup(name)
        layout = _layout(name)
        assert len(layout) == len(row.axes)
        assert layout[row.position_axis] in ("pos", "dest_pos")
        heads = _axis_sizes(model, name, P)["head"]
        assert heads == (cfg.n_kv_heads if "kv_head" in row.axes else cfg.n_heads)


def test_every_short_name_names_a_row():
    for row in sites.SITES:
        for alias in row.aliases:
            if row.per_block:
                assert get_act_name(alias, 3, row.sublayer) == f"blocks.3.{row.name}"
            else:
                assert get_act_name(alias) == row.name
    assert sites.PER_HEAD_EXPANSIONS == tuple(r.name for r in sites.SITES if r.per_head_expansion)
    from transformer_hooks.hooks import PER_HEAD_EXPANSIONS  # its old home still works

    assert PER_HEAD_EXPANSIONS == sites.PER_HEAD_EXPANSIONS


def test_readme_shows_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert sites.markdown_table() in readme, "README's site table is stale: paste sites.markdown_table() into it"


def test_one_range_check_with_one_message():
    assert check_index(-1, 4, "layer", "a model with 4 layers") == 3
    assert check_index(4, 4, "stop", "a model with 4 layers", allow_end=True) == 4
    with pytest.raises(
        IndexOutOfRangeError,
        match=r"^layer=4 is out of range for a model with 4 layers "
        r"\(valid: -4\.\.3\)$",
    ):
        check_index(4, 4, "layer", "a model with 4 layers")
    with pytest.raises(ValueError, match=r"layer=-1 is out of range.*valid: 0\.\.4; 4: the unembedding"):
        check_index(-1, 4, "layer", "x", allow_end=True, allow_negative=False, note="4: the unembedding")
    with pytest.raises(TypeError, match="layer must be an int, got float"):
        check_index(1.0, 4, "layer", "x")


@pytest.mark.parametrize(
    "name, layer",
    [
        ("blocks.3.attn.hook_z", 3),
        ("blocks.12.hook_resid_post", 12),
        ("blocks.3.attn.W_O", 3),  # a parameter
        ("blocks.3", 3),  # a placement group
        ("hook_embed", None),
        ("ln_final.hook_scale", None),
        ("embed", None),
        ("blocks.x.hook_z", None),
        ("myblocks.3.hook_z", None),
    ],
)
def test_layer_of(name, layer):
    assert sites.layer_of(name) == layer
    if "." in name and layer is not None and name.count(".") >= 2:
        assert sites.split_name(name) == (layer, name.split(".", 2)[2])


def test_the_layer_of_a_name_has_one_parser():
    """``sites.layer_of`` is the one place that reads a layer out of a name; hand parsers
    (``int(name.split(".")[1])``, a ``blocks\\.(\\d+)`` pattern) elsewhere drift from it."""
    root = Path(__file__).resolve().parents[1]
    hand = re.compile(r'split\("\."\)\[1\]|blocks\\\\?\.\(\\\\?d\+\)|parts\[0\] == "blocks"')
    found = [
        f"{path.relative_to(root)}:{i}: {line.strip()}"
        for package in ("transformer_hooks", "weights_conversion")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "sites.py" or path.parent.name != "transformer_hooks"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if hand.search(line)
    ]
    assert not found, "parse a name's layer with sites.layer_of:\n" + "\n".join(found)
