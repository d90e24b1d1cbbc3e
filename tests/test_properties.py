"""Property-based tests: random small configs of every family and random inputs.

Hypothesis draws a Hugging Face config (layers, widths, heads, kv heads, head_dim,
rotary fraction, rope theta and scaling, local windows, parallel residual, tied
embeddings, activation functions, biases), builds the model in memory with weights scaled so logits are of
order one (tests/checkpoints.py), saves it to a temporary directory, loads it with
transformer_hooks, and checks on random token batches (lengths, batch, left or right
padding):

- parity with HF: logits and every resid_pre within 1e-4 (fp32); a padded row gives the
  logits HF gives for that row alone;
- fused attention = the explicit path (a pattern hook on every layer), and observing
  every site (per-head inputs and results) changes no number;
- folded = unfolded log-probs (weight processing), and after folding the decomposition
  through the final norm and unembedding gives the logits back;
- the full residual decomposition sums to the residual stream (final and any layer);
- a batched patching sweep = one patch per forward (resid_pre, mlp_out, z per head);
- stop_at_layer then start_at_layer = one forward;
- greedy generation with the KV cache = recomputing the whole sequence each step.

Every example draws a fresh config and input; the counts are in the ``@examples(n)``
decorators (355 examples in all).

Profiles: ``CI`` set -> the "ci" profile (derandomized: the same examples every run, no
example database); otherwise "dev" (random, so local runs keep exploring). Run
``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`` for ten times the examples.
Examples use tempfile, not tmp_path: a function-scoped fixture is shared by all
examples of one test.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB, make_hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig

from transformer_hooks import HookedTransformer

TOL = 1e-4  # parity with HF, fp32
PATH_TOL = 1e-5  # two code paths of this library (fused vs explicit attention)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", **_COMMON)
settings.register_profile("thorough", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
_SCALE = 10 if settings.default is settings.get_profile("thorough") else 1


def examples(n: int) -> settings:
    """Bounded example counts per test (times ten under the "thorough" profile)."""
    return settings(max_examples=n * _SCALE)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# Configs -----------------------------------------------------------------------------
FAMILIES = ("gpt2", "gpt_neo", "gpt_neox", "llama")
# make_hf_model(base, **overrides) builds any config of the base's family: every key of
# the base config is overridden below, so only the scaled random init is reused.
BASE = {"gpt2": "gpt2", "gpt_neo": "gpt-neo-local", "gpt_neox": "pythia", "llama": "llama-gqa"}
CONFIG_CLASS = {"gpt2": GPT2Config, "gpt_neo": GPTNeoConfig, "gpt_neox": GPTNeoXConfig, "llama": LlamaConfig}
GELU_FAMILY_ACTS = ("gelu_new", "gelu", "relu", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "silu")
GATED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class Spec:
    """A drawn config: the family, the HF kwargs, and the seed of the random weights."""

    family: str
    kwargs: dict
    seed: int

    @property
    def n_ctx(self) -> int:
        return self.kwargs.get("n_positions") or self.kwargs["max_position_embeddings"]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Spec({self.family!r}, seed={self.seed}, {self.kwargs})"


def rope_scalings(llama3: bool) -> st.SearchStrategy[dict | None]:
    """None, linear position interpolation, or Llama 3.1's per-frequency scaling."""
    options = [st.none(), st.builds(lambda f: {"rope_type": "linear", "factor": f}, st.sampled_from((2.0, 4.0)))]
    if llama3:
        options.append(
            st.builds(
                lambda f, orig: {
                    "rope_type": "llama3",
                    "factor": f,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": orig,
                },
                st.sampled_from((2.0, 8.0)),
                st.sampled_from((4, 16)),
            )
        )
    return st.one_of(options)


@st.composite
def specs(draw, families: tuple[str, ...] = FAMILIES) -> Spec:
    family = draw(st.sampled_from(families))
    n_layers = draw(st.integers(1, 3))
    n_heads = draw(st.integers(1, 4))
    d_head = draw(st.sampled_from((4, 8, 12, 16)))
    d_model = n_heads * d_head
    d_mlp = draw(st.integers(4, 80))
    n_ctx = draw(st.integers(20, 64))
    tie = draw(st.booleans())
    if family == "gpt2":
        kwargs = dict(
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=n_ctx,
            n_inner=d_mlp,
            activation_function=draw(st.sampled_from(GELU_FAMILY_ACTS)),
            tie_word_embeddings=tie,
            scale_attn_weights=draw(st.booleans()),
            scale_attn_by_inverse_layer_idx=draw(st.booleans()),
        )
    elif family == "gpt_neo":
        kinds = draw(st.lists(st.sampled_from(("global", "local")), min_size=n_layers, max_size=n_layers))
        kwargs = dict(
            hidden_size=d_model,
            num_layers=n_layers,
            num_heads=n_heads,
            max_position_embeddings=n_ctx,
            attention_types=[[[kind], 1] for kind in kinds],
            window_size=draw(st.integers(1, 12)),
            intermediate_size=d_mlp,
            activation_function=draw(st.sampled_from(GELU_FAMILY_ACTS)),
            tie_word_embeddings=tie,
        )
    elif family == "gpt_neox":
        # HF takes int(d_head * rotary_pct) dims; the rotate-half layout needs an even count.
        rotary_dim = draw(st.sampled_from([r for r in range(2, d_head + 1, 2)]))
        kwargs = dict(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=d_mlp,
            max_position_embeddings=n_ctx,
            rotary_pct=rotary_dim / d_head,
            rotary_emb_base=draw(st.sampled_from((100.0, 10000.0))),
            rope_scaling=draw(rope_scalings(llama3=False)),
            use_parallel_residual=draw(st.booleans()),
            attention_bias=draw(st.booleans()),
            hidden_act=draw(st.sampled_from(GELU_FAMILY_ACTS)),
            tie_word_embeddings=tie,
        )
        assert int(d_head * kwargs["rotary_pct"]) == rotary_dim  # no float rounding to an odd count
    else:
        n_kv_heads = draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0]))
        # head_dim need not be hidden_size / heads (HF still wants hidden_size a multiple of heads)
        hidden_size = n_heads * draw(st.sampled_from((d_head, 6, 10)))
        kwargs = dict(
            hidden_size=hidden_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=d_head,
            intermediate_size=d_mlp,
            max_position_embeddings=n_ctx,
            rope_theta=draw(st.sampled_from((500.0, 10000.0))),
            rope_scaling=draw(rope_scalings(llama3=True)),
            attention_bias=draw(st.booleans()),
            mlp_bias=draw(st.booleans()),
            hidden_act=draw(st.sampled_from(GATED_ACTS)),
            tie_word_embeddings=tie,
        )
    return Spec(family, kwargs, draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class Batch:
    """Token rows of different real lengths, padded on one side (no mask if all are full)."""

    tokens: torch.Tensor  # [batch, pos]
    mask: torch.Tensor | None  # [batch, pos], 1 for real tokens
    lengths: tuple[int, ...]
    side: str

    def real(self, row: int) -> slice:
        width, n = self.tokens.shape[1], self.lengths[row]
        return slice(width - n, width) if self.side == "left" else slice(0, n)


@st.composite
def batches(draw, n_ctx: int, max_len: int = 16) -> Batch:
    n_rows = draw(st.integers(1, 3))
    side = draw(st.sampled_from(("none", "left", "right")))
    top = min(n_ctx, max_len)
    if side == "none":
        lengths = (draw(st.integers(1, top)),) * n_rows
    else:
        lengths = tuple(draw(st.lists(st.integers(1, top), min_size=n_rows, max_size=n_rows)))
    width = max(lengths)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = torch.randint(0, VOCAB, (n_rows, width), generator=g)
    mask = torch.ones_like(tokens)
    for i, n in enumerate(lengths):
        cols = slice(0, width - n) if side == "left" else slice(n, width)
        mask[i, cols] = 0
    if bool(mask.all()):
        return Batch(tokens, None, lengths, side)
    # Padding ids are arbitrary tokens: the mask alone must keep them out.
    return Batch(tokens, mask, lengths, side)


# Building ----------------------------------------------------------------------------
class Built:
    """The HF model and a transformer_hooks load of the same checkpoint, saved in a temp dir."""

    def __init__(self, spec: Spec, hf_attn: str = "eager", processed: bool = False) -> None:
        self.spec = spec
        self.hf = make_hf_model(BASE[spec.family], spec.seed, **spec.kwargs)
        assert isinstance(self.hf.config, CONFIG_CLASS[spec.family])
        self.hf.set_attn_implementation(hf_attn)
        self._dir = tempfile.TemporaryDirectory(prefix="th-prop-")
        self.path = Path(self._dir.name)
        self.hf.save_pretrained(self.path)
        self.model = self.load(processed=False)
        self.processed = self.load(processed=True) if processed else None

    def load(self, processed: bool) -> HookedTransformer:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every tensor of the checkpoint is used
            if processed:
                return HookedTransformer.from_pretrained(str(self.path))
            return HookedTransformer.from_pretrained_no_processing(str(self.path))

    def __enter__(self) -> "Built":
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()


def assert_no_hooks(model: HookedTransformer) -> None:
    attached = [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not attached, f"hooks left attached: {attached}"


def assert_config_read(spec: Spec, model: HookedTransformer) -> None:
    """Every drawn quirk reached the model's config (so the example tests what it claims)."""
    cfg, kw = model.cfg, spec.kwargs
    assert cfg.tie_word_embeddings == kw["tie_word_embeddings"]
    if spec.family == "gpt_neo":
        kinds = [kind for (kind,), _ in kw["attention_types"]]
        assert list(cfg.attn_windows) == [kw["window_size"] if k == "local" else None for k in kinds]
    if spec.family == "gpt_neox":
        assert cfg.rotary_dim == round(cfg.d_head * kw["rotary_pct"])
        assert cfg.parallel_residual == kw["use_parallel_residual"]
    scaling = kw.get("rope_scaling")
    if spec.family in ("gpt_neox", "llama"):
        assert (cfg.rope_scaling is None) == (scaling is None)
        if scaling is not None:
            assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == (scaling["rope_type"], scaling["factor"])
    if spec.family == "llama":
        assert (cfg.n_kv_heads, cfg.d_head, cfg.d_model) == (
            kw["num_key_value_heads"],
            kw["head_dim"],
            kw["hidden_size"],
        )


# Properties --------------------------------------------------------------------------
@examples(100)
@given(data=st.data(), spec=specs(), hf_attn=st.sampled_from(("eager", "sdpa")))
def test_parity_with_hf(data, spec: Spec, hf_attn: str):
    """Logits and resid_pre of every layer equal HF's; a padded row equals the row alone."""
    hf_attn = "eager" if spec.family == "gpt_neo" else hf_attn  # HF has no SDPA for GPT-Neo
    batch = data.draw(batches(spec.n_ctx), label="batch")
    with Built(spec, hf_attn) as built, torch.no_grad():
        model, hf = built.model, built.hf
        assert_config_read(spec, model)
        if batch.mask is None:
            ref = hf(batch.tokens, output_hidden_states=True)
            assert ref.logits.abs().max() > 0.1, "logits too small for the tolerance to mean anything"
            logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
            torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
            for layer in range(model.cfg.n_layers):
                torch.testing.assert_close(
                    cache[f"blocks.{layer}.hook_resid_pre"],
                    ref.hidden_states[layer],
                    atol=TOL,
                    rtol=0,
                    msg=lambda m, layer=layer: f"resid_pre {layer}: {m}",
                )
        else:
            logits = model(batch.tokens, attention_mask=batch.mask)
            for row in range(batch.tokens.shape[0]):
                alone = batch.tokens[row : row + 1, batch.real(row)]
                torch.testing.assert_close(
                    logits[row : row + 1, batch.real(row)],
                    hf(alone).logits,
                    atol=TOL,
                    rtol=0,
                    msg=lambda m, row=row: f"row {row} ({batch.side} padded): {m}",
                )
        assert torch.isfinite(logits).all(), "padding rows must stay finite too"
        assert_no_hooks(model)


@examples(60)
@given(data=st.data(), spec=specs())
def test_fused_attention_equals_explicit_and_observing_changes_nothing(data, spec: Spec):
    """SDPA (no hooks) = explicit softmax (pattern observed) = every site observed."""
    batch = data.draw(batches(spec.n_ctx), label="batch")
    with Built(spec) as built, torch.no_grad():
        model = built.model
        fused = model(batch.tokens, attention_mask=batch.mask)
        explicit = model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.mask,
            fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)],
        )
        # Observing every site, per-head inputs and results included, takes every slow path.
        # A list: a predicate skips the sites whose TransformerLens switch (set_use_*) is off.
        everything, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.mask, names_filter=list(model.hook_dict)
        )
        assert "blocks.0.hook_q_input" in cache and "blocks.0.attn.hook_result" in cache
        for row in range(batch.tokens.shape[0]):
            real = batch.real(row)
            torch.testing.assert_close(explicit[row, real], fused[row, real], atol=PATH_TOL, rtol=PATH_TOL)
            torch.testing.assert_close(everything[row, real], fused[row, real], atol=PATH_TOL, rtol=PATH_TOL)
        assert_no_hooks(model)


@examples(50)
@given(data=st.data(), spec=specs())
def test_folded_equals_unfolded_log_probs(data, spec: Spec):
    """fold_ln, center_writing_weights, center_unembed, fold_value_biases keep log-probs."""
    batch = data.draw(batches(spec.n_ctx), label="batch")
    with Built(spec, processed=True) as built, torch.no_grad():
        assert built.processed.cfg.processing, "from_pretrained must record the processing it applied"
        plain = built.model(batch.tokens, attention_mask=batch.mask).log_softmax(-1)
        folded = built.processed(batch.tokens, attention_mask=batch.mask).log_softmax(-1)
        for row in range(batch.tokens.shape[0]):
            real = batch.real(row)
            torch.testing.assert_close(folded[row, real], plain[row, real], atol=TOL, rtol=0)
        # After folding, the final norm is a pure scale: the decomposition through it, read
        # by the unembedding, gives the logits back (what direct logit attribution relies on).
        model = built.processed
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.mask)
        parts = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False)
        torch.testing.assert_close(parts.sum(0) @ model.W_U + model.b_U, logits, atol=TOL, rtol=TOL)


@examples(50)
@given(data=st.data(), spec=specs())
def test_full_resid_decomposition_sums_to_the_residual(data, spec: Spec):
    """embed (+ pos_embed) + every head's result + every neuron's output + biases = resid."""
    batch = data.draw(batches(spec.n_ctx), label="batch")
    with Built(spec) as built, torch.no_grad():
        model = built.model
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.mask)
        resid = cache["resid_post", -1]
        scale = resid.abs().max().item()
        for expand_neurons in (True, False):
            parts = cache.get_full_resid_decomposition(expand_neurons=expand_neurons)
            torch.testing.assert_close(
                parts.sum(0),
                resid,
                atol=TOL * max(1.0, scale),
                rtol=0,
                msg=lambda m, expand_neurons=expand_neurons: f"expand_neurons={expand_neurons}: {m}",
            )
        # Any intermediate layer too: the decomposition of the stream entering it.
        layer = data.draw(st.integers(0, model.cfg.n_layers - 1), label="layer")
        parts = cache.get_full_resid_decomposition(layer=layer, expand_neurons=False)
        torch.testing.assert_close(parts.sum(0), cache["resid_pre", layer], atol=TOL * max(1.0, scale), rtol=0)


def _patch_each_alone(model, corrupted, clean_cache, metric, site: str, heads: bool) -> torch.Tensor:
    """The reference: one forward per (layer, pos[, head]), patching the clean activation in."""
    n_heads = model.cfg.n_heads if heads else 1
    out = torch.empty(model.cfg.n_layers, corrupted.shape[1], n_heads)
    for layer, pos, head in itertools.product(*(range(n) for n in out.shape)):
        name = f"blocks.{layer}.{site}"
        index = (slice(None), pos, head) if heads else (slice(None), pos)

        def patch(act, hook, index=index, name=name):
            act = act.clone()
            act[index] = clean_cache[name][index]
            return act

        out[layer, pos, head] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))
    return out if heads else out[..., 0]


@examples(25)
@given(data=st.data(), spec=specs())
def test_batched_patching_equals_one_patch_per_forward(data, spec: Spec):
    """Patches stacked on the batch axis (in chunks of batch_size) = one forward per patch."""
    from transformer_hooks.interventions import patching

    n_pos = data.draw(st.integers(2, 4), label="n_pos")
    n_rows = data.draw(st.integers(1, 2), label="n_rows")
    batch_size = data.draw(st.sampled_from((None, 1, 2, 3, 5)), label="batch_size")
    g = torch.Generator().manual_seed(spec.seed)
    clean = torch.randint(0, VOCAB, (n_rows, n_pos), generator=g)
    corrupted = torch.randint(0, VOCAB, (n_rows, n_pos), generator=g)
    answer = int(torch.randint(0, VOCAB, (), generator=g))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, answer].mean()

    sweeps = (
        ("hook_resid_pre", patching.get_act_patch_resid_pre, False),
        ("hook_mlp_out", patching.get_act_patch_mlp_out, False),
        ("attn.hook_z", patching.get_act_patch_attn_head_out_by_pos, True),
    )
    with Built(spec) as built, torch.no_grad():
        model = built.model
        _, clean_cache = model.run_with_cache(clean)
        for site, sweep, heads in sweeps:
            batched = sweep(model, corrupted, clean_cache, metric, batch_size=batch_size, progress=False)
            alone = _patch_each_alone(model, corrupted, clean_cache, metric, site, heads)
            torch.testing.assert_close(
                batched.float().cpu(), alone, atol=TOL, rtol=TOL, msg=lambda m, site=site: f"{site}: {m}"
            )
        assert_no_hooks(model)


@examples(40)
@given(data=st.data(), spec=specs())
def test_stop_and_start_at_layer_compose(data, spec: Spec):
    """Stopping at layer L gives resid_pre L; starting there from it gives the full logits."""
    batch = data.draw(batches(spec.n_ctx), label="batch")
    with Built(spec) as built, torch.no_grad():
        model = built.model
        layer = data.draw(st.integers(0, model.cfg.n_layers), label="layer")
        logits, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.mask, names_filter=lambda n: n.endswith("hook_resid_pre")
        )
        resid = model(batch.tokens, attention_mask=batch.mask, stop_at_layer=layer)
        if layer < model.cfg.n_layers:
            torch.testing.assert_close(resid, cache["resid_pre", layer], atol=0, rtol=0)
            resumed = model(resid, attention_mask=batch.mask, start_at_layer=layer)
            torch.testing.assert_close(resumed, logits, atol=PATH_TOL, rtol=PATH_TOL)


@examples(30)
@given(data=st.data(), spec=specs())
def test_generation_with_the_kv_cache_equals_rerunning_the_sequence(data, spec: Spec):
    """Greedy tokens with the preallocated KV cache = recomputing every step, padded prompts too."""
    batch = data.draw(batches(spec.n_ctx, max_len=8), label="batch")
    new = data.draw(st.integers(1, min(6, spec.n_ctx - batch.tokens.shape[1])), label="max_new_tokens")
    with Built(spec) as built, torch.no_grad():
        model = built.model
        runs = [
            model.generate(
                batch.tokens,
                attention_mask=batch.mask,
                max_new_tokens=new,
                do_sample=False,
                stop_at_eos=False,
                use_past_kv_cache=kv,
                verbose=False,
            )
            for kv in (True, False)
        ]
        assert runs[0].shape == (batch.tokens.shape[0], batch.tokens.shape[1] + new)
        differ = (runs[0] != runs[1]).any(0).nonzero()
        if len(differ):  # only a near-tie of the two top logits (float rounding) may flip a greedy choice
            col = int(differ[0])
            row = int((runs[0][:, col] != runs[1][:, col]).nonzero()[0])
            mask = torch.ones_like(runs[1][:, :col])  # generate moves padding to the left
            for i, n in enumerate(batch.lengths):
                mask[i, : batch.tokens.shape[1] - n] = 0
            last = model(runs[1][:, :col], attention_mask=mask)[row, -1]
            gap = (last[runs[0][row, col]] - last[runs[1][row, col]]).abs()
            assert gap < PATH_TOL, f"KV cache changed greedy token {col} of row {row} (logit gap {gap:.2e})"
        assert_no_hooks(model)
