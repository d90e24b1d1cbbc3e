"""Issue 27: SAE files read with every field checked (a ValueError naming the field, never a
string read as a bool), SAEs that threads may share, and training sizes checked up front."""

import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transformer_hooks.sae import SAE, SAEConfig, load_gemma_scope, train_sae

D_IN, D_SAE = 6, 10
GOOD = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post", "dtype": "float32"}


def saved(tmp_path, cfg, sae=None):
    sae = sae or SAE(SAEConfig(**GOOD))
    sae.save_model(tmp_path)
    (tmp_path / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return tmp_path


def test_a_bool_written_as_a_string_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cfg.json: .*'apply_b_dec_to_input' must be a JSON bool.*'false' \(str\)"):
        SAE.load_from_disk(saved(tmp_path, {**GOOD, "apply_b_dec_to_input": "false"}))
    assert not SAE.load_from_disk(saved(tmp_path, {**GOOD, "apply_b_dec_to_input": False})).cfg.apply_b_dec_to_input


@pytest.mark.parametrize(
    "cfg, field",
    [
        ('{"d_in": 6, "d_sae": ', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({k: v for k, v in GOOD.items() if k != "d_in"}, "'d_in' is missing"),
        ({**GOOD, "d_sae": -10}, "'d_sae' must be a positive int"),
        ({**GOOD, "d_in": "6"}, "'d_in' must be a positive int"),
        ({**GOOD, "dtype": "int8"}, "'dtype' must name a float dtype"),
        ({**GOOD, "dtype": 32}, "'dtype' must be the name of a float dtype"),
        ({**GOOD, "architecture": "topk", "k": 11}, "'k' is 11, more than d_sae=10"),
        ({**GOOD, "architecture": "topk", "k": 0}, "'k' must be a positive int"),
        ({**GOOD, "architecture": "topk", "k": "3"}, "'k' must be a positive int"),
        ({**GOOD, "hook_name": 3}, "'hook_name' must be str"),
        ({**GOOD, "norm_scaling_factor": -1.0}, "'norm_scaling_factor' must be a positive number"),
        ({**GOOD, "model_from_pretrained_kwargs": "fold_ln"}, "'model_from_pretrained_kwargs' must be dict"),
    ],
)
def test_each_malformed_config_names_its_field(tmp_path, cfg, field):
    with pytest.raises(ValueError, match=field):
        SAE.load_from_disk(saved(tmp_path, cfg))


@pytest.mark.parametrize(
    "spelling, dtype",
    [
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("torch.float32", torch.float32),
        ("float16", torch.float16),
    ],
)
def test_the_dtype_spellings_saelens_writes_are_read(tmp_path, spelling, dtype):
    sae = SAE.load_from_disk(saved(tmp_path, {**GOOD, "dtype": spelling}))
    assert sae.W_enc.dtype == dtype


def test_an_npz_without_w_enc_names_it(tmp_path):
    arrays = {
        "W_dec": np.zeros((D_SAE, D_IN)),
        "b_enc": np.zeros(D_SAE),
        "b_dec": np.zeros(D_IN),
        "threshold": np.zeros(D_SAE),
    }
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(ValueError, match=r"params.npz lacks \['W_enc'\]"):
        load_gemma_scope(tmp_path / "params.npz", hook_name="blocks.0.hook_resid_post")
    np.savez(tmp_path / "params.npz", W_enc=np.array([object()], dtype=object), **arrays)
    with pytest.raises(ValueError, match="cannot be read as an npz of arrays"):  # never unpickled
        load_gemma_scope(tmp_path / "params.npz", hook_name="blocks.0.hook_resid_post")


FIELDS = [
    "d_in",
    "d_sae",
    "hook_name",
    "apply_b_dec_to_input",
    "normalize_activations",
    "dtype",
    "architecture",
    "k",
    "rescale_acts_by_decoder_norm",
    "norm_scaling_factor",
    "hook_layer",
    "model_from_pretrained_kwargs",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 20),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["false", "true", "topk", "layer_norm", "bf16", "int8"]),
    st.just([]),
    st.just({}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_field_of_any_type_loads_or_names_a_field(field, value):
    """Property: a config with one field set to anything is read, or refused with a
    ValueError naming a field; never a bare KeyError, TypeError or AttributeError."""
    try:
        cfg = SAEConfig.from_dict({**GOOD, field: value})
    except ValueError as e:
        assert any(name in str(e) for name in [*FIELDS, "hook", "activation", "architecture"]), str(e)
        return
    if field in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm") and value is not None:
        assert getattr(cfg, field) is value  # a bool only when it is one
    if cfg.d_in * cfg.d_sae < 10**4:
        SAE(cfg)  # and it builds


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_threads_sharing_an_sae_get_the_single_threaded_answers(norm):
    """Two threads encode, meet at a barrier (so each encodes before the other decodes),
    then decode: each must use its own statistics."""
    sae = SAE(SAEConfig(**GOOD, normalize_activations=norm))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    xs = [torch.randn(3, D_IN, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(2)]
    with torch.no_grad():
        alone = [sae(x) for x in xs]
        alone_split = [sae.decode(sae.encode(x)) for x in xs]
    barrier = threading.Barrier(2, timeout=10)
    got: dict = {}

    def meet(act, hook):
        barrier.wait()
        return act

    sae.hook_sae_acts_post.add_hook(meet)

    def run(i):
        with torch.no_grad():
            got[i] = sae(xs[i])
            got[i, "split"] = sae.decode(sae.encode(xs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sae.reset_hooks()
    for i in range(2):
        assert torch.equal(got[i], alone[i]) and torch.equal(got[i, "split"], alone_split[i])


def test_training_sizes_are_checked_and_small_data_trains():
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no activations to train on"):
        train_sae(x[:0], "blocks.0.hook_resid_post", D_SAE, steps=3, progress=False)
    for bad in ({"batch_size": 0}, {"batch_size": -1}, {"steps": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer >="):
            train_sae(x, "blocks.0.hook_resid_post", D_SAE, progress=False, **{"steps": 3, **bad})
    with pytest.warns(UserWarning, match="only 5 rows to train on, fewer than batch_size=256"):
        sae = train_sae(x, "blocks.0.hook_resid_post", D_SAE, steps=3, progress=False)
    assert all(torch.isfinite(p).all() for p in sae.parameters()) and len(sae.training_log) == 3
