"""model.compile(): the forward through torch.compile gives the eager numbers, hooks still
fire (and edit), and changing which sites are observed compiles a bounded number of times
per set of sites (then never again), never reusing a graph built for another set.

One-layer Llama-shaped model (rotary, GQA, gated MLP): inductor's compile on CPU takes
seconds per graph, so the recompile bookkeeping is checked with a counting backend.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB, save_checkpoint

from transformer_hooks import HookedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
TOL = 1e-5


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path, _ = save_checkpoint("llama-gqa", tmp_path_factory.mktemp("compile"), num_hidden_layers=1)
    return str(path)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def load(path: str) -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(path)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=TOL)  # -inf (masked scores) equals -inf


def double(act, hook):
    return act * 2


def test_compiled_forward_equals_eager_with_and_without_hooks(path, tokens):
    torch._dynamo.reset()
    eager, compiled = load(path), load(path).compile()
    assert compiled is not eager and close(compiled(tokens), eager(tokens))

    # A hook that edits the pattern (the layer then runs explicit attention) and one that reads.
    seen: dict[str, torch.Tensor] = {}
    hooks = lambda: [  # noqa: E731
        ("blocks.0.attn.hook_pattern", double),
        ("blocks.0.hook_resid_post", lambda act, hook: seen.__setitem__(hook.name, act.clone())),
    ]
    want = eager.run_with_hooks(tokens, fwd_hooks=hooks())
    want_resid = seen.pop("blocks.0.hook_resid_post")
    got = compiled.run_with_hooks(tokens, fwd_hooks=hooks())
    assert "blocks.0.hook_resid_post" in seen, "a hook did not fire in the compiled forward"
    assert close(got, want) and close(seen["blocks.0.hook_resid_post"], want_resid)
    assert not close(got, eager(tokens)), "the editing hook had no effect: the test proves nothing"


def test_changing_the_observed_sites_compiles_once_per_set_and_never_reuses_another_sets_graph(path, tokens):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    eager, counter = load(path), CompileCounter()
    compiled = load(path).compile(backend=counter)
    runs = {
        "no hooks": lambda m: m(tokens),
        "resid_mid doubled": lambda m: m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_mid", double)]),
        "pattern doubled": lambda m: m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", double)]),
        "cache every site": lambda m: m.run_with_cache(tokens),
    }

    def check(label: str) -> None:
        got, want = runs[label](compiled), runs[label](eager)
        if isinstance(want, tuple):  # run_with_cache: logits and the cache
            assert close(got[0], want[0]), label
            assert got[1].keys() == want[1].keys()
            wrong = [k for k in want[1].keys() if not close(got[1][k], want[1][k])]
            assert not wrong, f"{label}: cached activations differ from eager: {wrong}"
        else:
            assert close(got, want), f"{label}: compiled logits differ from eager"

    for label in runs:
        check(label)
    first = counter.frame_count
    assert first > 0, "nothing was compiled"
    for label in [*runs, *reversed(runs)]:  # every set again, after each other set
        check(label)
    # A resume function after a graph break (an observed site) can be reached first from
    # another set's frame: at most one more compile per set, and then none.
    second = counter.frame_count
    assert second - first <= len(runs), f"{second - first} compiles for {len(runs)} sets seen before"
    for label in [*runs, *reversed(runs)]:
        check(label)
    assert counter.frame_count == second, "sets of observed sites seen before were compiled again"


def test_generation_with_a_compiled_model_gives_the_eager_tokens(path, tokens):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    eager, compiled = load(path), load(path).compile(backend=CompileCounter())
    kwargs = dict(max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    assert torch.equal(compiled.generate(tokens, **kwargs), eager.generate(tokens, **kwargs))


def test_from_pretrained_compile_option_compiles_with_the_given_arguments(path, tokens):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = HookedTransformer.from_pretrained_no_processing(path, compile={"backend": counter})
    assert close(compiled(tokens), load(path)(tokens))
    assert counter.frame_count > 0, "compile= did not route the forward through torch.compile"
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        HookedTransformer.from_pretrained_no_processing(path, compile="inductor")
