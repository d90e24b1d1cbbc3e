"""Bad inputs: each one raises an error that names the problem (and, where there is one,
the fix), and leaves the model as it was: the same logits bit for bit, the same
weights, and no hook attached to any site.

A test per case. The running model is a small GPT-2 (learned positions, so a context
limit exists) with a character-level tokenizer built in memory (no download). Loading
cases write broken checkpoints into ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB
from safetensors.torch import load_file, save_file

from transformer_hooks import HookedTransformer
from transformer_hooks.hooks import HookShapeError, UnknownHookError

N_CTX = 64  # the "gpt2" checkpoint's n_positions
D_MODEL = 48
N_LAYERS = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def char_tokenizer():
    """A tokenizer with one token per lower-case letter, space and punctuation mark."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(" .,")
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


class Snapshot:
    """What "unchanged" means: logits on a probe batch, every weight, and no hooks."""

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.logits = model(self.tokens)
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}

    def assert_unchanged(self) -> None:
        model = self.model
        attached = [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
        assert not attached, f"hooks left attached after the error: {attached}"
        assert all(not hp.ctx for hp in model.hook_dict.values()), "hook contexts left filled"
        for name, before in self.weights.items():
            assert torch.equal(model.state_dict()[name], before), f"{name} changed"
        with torch.no_grad():
            assert torch.equal(model(self.tokens), self.logits), "logits changed"


@pytest.fixture(scope="module")
def snapshot(hf_checkpoint) -> Snapshot:
    path, _ = hf_checkpoint("gpt2")
    model = HookedTransformer.from_pretrained_no_processing(str(path), tokenizer=char_tokenizer())
    assert (model.cfg.n_ctx, model.cfg.d_model, model.cfg.n_layers) == (N_CTX, D_MODEL, N_LAYERS)
    return Snapshot(model)


@pytest.fixture
def model(snapshot: Snapshot) -> HookedTransformer:
    return snapshot.model


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def rejected(snapshot: Snapshot):
    """``with rejected(Error, match=...)``: the block raises it, and the model is unchanged."""

    @contextlib.contextmanager
    def check(error: type[BaseException], match: str) -> Iterator[pytest.ExceptionInfo]:
        with pytest.raises(error, match=match) as info:
            yield info
        snapshot.assert_unchanged()

    return check


def never_called(x, hook):
    raise AssertionError("a hook ran although the call was rejected")


# Misspelt hook names ------------------------------------------------------------------
def test_add_hook_misspelt_name_lists_close_names(model, rejected):
    with rejected(UnknownHookError, r"no hook point 'blocks\.0\.hook_resid_pree'.*Closest: blocks\.0\.hook_resid_pre"):
        model.add_hook("blocks.0.hook_resid_pree", never_called)


def test_run_with_hooks_misspelt_name_attaches_none_of_the_hooks(model, tokens, rejected):
    with rejected(UnknownHookError, r"'blocks\.1\.attn\.hook_patern'.*Closest: blocks\.1\.attn\.hook_pattern"):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_pre", never_called), ("blocks.1.attn.hook_patern", never_called)]
        )


def test_run_with_hooks_misspelt_bwd_name_attaches_nothing_even_without_reset(model, tokens, rejected):
    """reset_hooks_end=False keeps hooks after the call; a typo must still attach none."""
    with rejected(UnknownHookError, r"'blocks\.0\.hook_mlp_outt'.*Closest: blocks\.0\.hook_mlp_out"):
        model.run_with_hooks(
            tokens,
            reset_hooks_end=False,
            bwd_hooks=[("blocks.0.hook_resid_pre", never_called), ("blocks.0.hook_mlp_outt", never_called)],
        )


def test_run_with_cache_misspelt_names_filter(model, tokens, rejected):
    with rejected(UnknownHookError, r"'blocks\.1\.hook_resid_poste'.*Closest: blocks\.1\.hook_resid_post"):
        model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_poste"])


def test_run_with_cache_glob_matching_nothing(model, tokens, rejected):
    with rejected(UnknownHookError, r"'blocks\.\*\.hook_atn_out'.*Closest: blocks\.\d\.hook_attn_out"):
        model.run_with_cache(tokens, names_filter="blocks.*.hook_atn_out")


def test_hook_name_of_a_layer_the_model_does_not_have(model, tokens, rejected):
    with rejected(UnknownHookError, r"'blocks\.7\.hook_resid_pre'.*Closest: blocks\.[01]\.hook_resid_pre"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.7.hook_resid_pre", never_called)])


def test_hooks_context_misspelt_name(model, tokens, rejected):
    with rejected(UnknownHookError, r"'hook_embd'.*Closest: hook_embed"):
        with model.hooks(fwd_hooks=[("hook_embed", never_called), ("hook_embd", never_called)]):
            model(tokens)


# Hooks returning what cannot replace the activation -------------------------------------
def test_hook_returning_a_wrong_shape(model, tokens, rejected):
    with rejected(HookShapeError, r"blocks\.0\.hook_resid_pre returned shape \(2, 7, 48\).*\(2, 8, 48\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[:, :-1])])


def test_hook_returning_a_broadcastable_shape(model, tokens, rejected):
    """Broadcasting would silently give every example the first one's activation."""
    with rejected(HookShapeError, r"returned shape \(1, 8, 48\).*\(2, 8, 48\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x[:1])])


def test_hook_returning_a_wrong_dtype(model, tokens, rejected):
    with rejected(HookShapeError, r"returned dtype torch\.float64.*torch\.float32.*\.to\(torch\.float32\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x.double())])


@pytest.mark.parametrize("returned", [0.0, (1,), "x"], ids=["float", "tuple", "str"])
def test_hook_returning_a_non_tensor(model, tokens, rejected, returned):
    with rejected(HookShapeError, rf"returned {type(returned).__name__}; a hook must return a tensor.*or None"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda x, hook: returned)])


def test_hook_returning_a_numpy_array(model, tokens, rejected):
    with rejected(HookShapeError, r"returned ndarray; a hook must return a tensor"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: x.detach().numpy())])


def test_hook_returning_a_tensor_on_another_device(model, tokens, rejected):
    """The meta device stands in for a GPU: a hook's result on the wrong device."""
    with rejected(HookShapeError, r"device"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: torch.empty_like(x, device="meta"))])


def test_backward_hook_returning_a_wrong_shape(model, tokens, rejected):
    with rejected(HookShapeError, r"blocks\.0\.hook_resid_pre returned shape \(2, 1, 48\)"):
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, hook: g[:, :1])]):
            model(tokens).sum().backward()
    model.zero_grad(set_to_none=True)


# Tokens -------------------------------------------------------------------------------
def test_token_id_past_the_vocabulary(model, rejected):
    with rejected(ValueError, rf"token id {VOCAB} is outside the vocabulary \[0, {VOCAB}\).*another model's tokenizer"):
        model(torch.tensor([[1, 2, VOCAB]]))


def test_negative_token_id(model, rejected):
    with rejected(ValueError, r"token id -1 is outside the vocabulary"):
        model(torch.tensor([[5, -1, 3]]))


def test_float_tokens(model, rejected):
    with rejected(ValueError, r"tokens must be integer ids.*float32.*tokens\.long\(\)"):
        model(torch.tensor([[1.0, 2.0]]))


def test_bool_tokens(model, rejected):
    with rejected(ValueError, r"tokens must be integer ids.*bool"):
        model(torch.tensor([[True, False]]))


def test_tokens_of_three_dims(model, rejected):
    with rejected(ValueError, r"tokens must be \[batch, pos\] or \[pos\], got shape \(1, 2, 3\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))


def test_ragged_token_lists(model, rejected):
    """Lists of token ids of different lengths: say to pad them (with a mask)."""
    with rejected((ValueError, TypeError), r"(?i)length.*(pad|attention_mask)"):
        model([[1, 2, 3], [4]])


def test_input_of_an_unsupported_type(model, rejected):
    with rejected(TypeError, r"input must be a string, a list of strings or a token tensor, got dict"):
        model({"input_ids": [1, 2]})


# Empty inputs ---------------------------------------------------------------------------
def test_empty_string_without_bos(model, rejected):
    with rejected(ValueError, r"empty prompt"):
        model("", prepend_bos=False)


def test_empty_string_in_a_batch_of_strings(model, rejected):
    with rejected(ValueError, r"empty prompt"):
        model(["abc", ""], prepend_bos=False)


def test_empty_token_tensor(model, rejected):
    with rejected(ValueError, r"empty input.*\(1, 0\).*at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_empty_one_dimensional_token_tensor(model, rejected):
    with rejected(ValueError, r"empty input.*at least one token"):
        model(torch.tensor([], dtype=torch.long))


def test_empty_list(model, rejected):
    with rejected(ValueError, r"empty input.*at least one token or a non-empty string"):
        model([])


# Context length, layers, masks -------------------------------------------------------------
def test_tokens_longer_than_the_learned_context(model, rejected):
    with rejected(
        ValueError,
        rf"{N_CTX + 1} positions is longer than this model's context \(n_ctx={N_CTX}.*"
        rf"truncate the input to {N_CTX} tokens",
    ):
        model(torch.zeros(1, N_CTX + 1, dtype=torch.long))


def test_text_longer_than_the_learned_context(model, rejected):
    with rejected(ValueError, rf"longer than this model's context \(n_ctx={N_CTX}"):
        model("ab" * N_CTX, prepend_bos=False)


def test_generation_past_the_learned_context_fails_before_generating(model, rejected):
    """The prompt fits but prompt + max_new_tokens does not: say so up front, naming
    max_new_tokens, rather than failing halfway with a position count the user never gave."""
    calls = []
    with rejected(ValueError, r"max_new_tokens"):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(1))]):
            model.generate(
                torch.zeros(1, N_CTX - 4, dtype=torch.long), max_new_tokens=10, do_sample=False, verbose=False
            )
    assert not calls, "the model ran before the length was checked"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stop_at_layer=N_LAYERS + 1), rf"stop_at_layer={N_LAYERS + 1} is out of range.*{N_LAYERS} layers"),
        (dict(stop_at_layer=-N_LAYERS - 1), rf"stop_at_layer={-N_LAYERS - 1} is out of range"),
    ],
)
def test_stop_at_layer_out_of_range(model, tokens, rejected, kwargs, match):
    with rejected(ValueError, match):
        model(tokens, **kwargs)


def test_start_at_layer_out_of_range(model, rejected):
    with rejected(ValueError, rf"start_at_layer={N_LAYERS} is out of range.*valid: {-N_LAYERS}\.\.{N_LAYERS - 1}"):
        model(torch.zeros(1, 3, D_MODEL), start_at_layer=N_LAYERS)


def test_start_at_layer_given_tokens_instead_of_the_residual(model, tokens, rejected):
    with rejected(ValueError, rf"with start_at_layer, input is the residual stream \[batch, pos, d_model={D_MODEL}\]"):
        model(tokens, start_at_layer=1)


def test_start_after_stop(model, rejected):
    """An empty range of layers would silently return the input unchanged."""
    with rejected(ValueError, r"start_at_layer.*stop_at_layer"):
        model(torch.zeros(1, 3, D_MODEL), start_at_layer=1, stop_at_layer=0)


def test_start_at_layer_given_a_residual_of_another_dtype(model, rejected):
    with rejected((ValueError, TypeError), r"(?i)(residual|input).*float64.*float32|float32.*float64"):
        model(torch.zeros(1, 3, D_MODEL, dtype=torch.float64), start_at_layer=1)


def test_loss_of_a_single_token_is_an_error_not_nan(model, rejected):
    """A next-token loss needs two tokens; the mean over zero predictions is NaN."""
    with rejected(ValueError, r"(?i)loss.*(two|2|at least)"):
        model(torch.tensor([[5]]), return_type="loss")


def test_remove_batch_dim_on_a_batch_of_two(model, tokens, rejected):
    """Silently keeping example 0 of 2 would be wrong data; cache.remove_batch_dim() refuses too."""
    with rejected(ValueError, r"(?i)remove_batch_dim.*batch"):
        model.run_with_cache(tokens, remove_batch_dim=True)


def test_hook_that_is_not_callable(model, tokens, rejected):
    calls = []
    with rejected(TypeError, r"(?i)hook.*hook_embed.*(callable|function)"):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1)), ("hook_embed", 3)]
        )
    assert not calls, "the forward ran before the hooks were checked"


def test_generate_with_a_negative_number_of_tokens(model, tokens, rejected):
    with rejected(ValueError, r"max_new_tokens.*-1"):
        model.generate(tokens, max_new_tokens=-1, verbose=False)


def test_unknown_return_type(model, tokens, rejected):
    with rejected(ValueError, r"return_type must be 'logits', 'loss', 'both' or None, got 'logit'"):
        model(tokens, return_type="logit")


def test_attention_mask_of_another_shape(model, tokens, rejected):
    with rejected(ValueError, r"attention_mask has shape \(2, 7\), tokens \(2, 8\); they must match"):
        model(tokens, attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_attention_mask_with_values_other_than_zero_and_one(model, tokens, rejected):
    """Positions are counted from the mask: a 2 would silently skip a position."""
    with rejected(ValueError, r"attention_mask.*(0 and 1|0 or 1|zeros and ones)"):
        model(tokens, attention_mask=torch.full(tokens.shape, 2))


def test_float_and_bool_attention_masks_mean_what_integer_ones_do(model, tokens, snapshot):
    """Not an error: HF users pass float or bool masks; they must give the integer mask's logits."""
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
        for other in (mask.float(), mask.bool()):
            torch.testing.assert_close(model(tokens, attention_mask=other), expected, atol=0, rtol=0)
    snapshot.assert_unchanged()


# Cache lookups ----------------------------------------------------------------------------
@pytest.fixture
def small_cache(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.*.attn.hook_z"])
    return cache


def test_cache_site_that_was_not_cached_says_which_filter_would_cache_it(small_cache, rejected):
    with rejected(
        KeyError, r"'blocks\.1\.hook_resid_post' is not in this cache.*names_filter=.*blocks\.\*\.hook_resid_post"
    ):
        small_cache["resid_post", 1]


def test_cache_layer_out_of_range(small_cache, rejected):
    with rejected(ValueError, rf"layer=5 is out of range for a model with {N_LAYERS} layers"):
        small_cache["resid_pre", 5]


def test_cache_negative_layer_out_of_range(small_cache, rejected):
    with rejected(ValueError, rf"layer=-3 is out of range for a model with {N_LAYERS} layers"):
        small_cache["z", -3]


def test_cache_site_this_architecture_does_not_have(small_cache, rejected):
    with rejected(KeyError, r"'blocks\.0\.attn\.hook_rot_q' is not a hook point of this model \(only rotary models"):
        small_cache["rot_q", 0]


def test_cache_misspelt_short_name(small_cache, rejected):
    with rejected(ValueError, r"unknown activation name 'resid_poost'.*resid_post"):
        small_cache["resid_poost", 0]


def test_cache_per_head_results_not_cached_by_default(model, tokens, rejected):
    _, cache = model.run_with_cache(tokens)
    with rejected(KeyError, r"hook_result' is not in this cache \(run_with_cache leaves per-head expansions out"):
        cache["result", 0]


def test_cache_stacking_past_the_last_layer(small_cache, rejected):
    with rejected(ValueError, rf"layer=7 is out of range.*0\.\.{N_LAYERS}"):
        small_cache.stack_activation("z", layer=7)


# Loading --------------------------------------------------------------------------------
@pytest.fixture
def good_checkpoint(hf_checkpoint, tmp_path) -> Path:
    """A private copy of the gpt2 checkpoint that a test may break."""
    path, _ = hf_checkpoint("gpt2")
    return Path(shutil.copytree(path, tmp_path / "gpt2"))


def load(path: Path) -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(str(path))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(path: Path, drop: tuple[str, ...] = (), **replace: torch.Tensor) -> None:
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    from transformer_hooks.loading import UnsupportedArchitectureError

    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"model_type='opt'.*OPTForCausalLM.*gpt2.*gpt_neo.*"
        r"gpt_neox.*llama",
    ):
        load(tmp_path / "opt")


def test_config_without_a_model_type(good_checkpoint):
    config = json.loads((good_checkpoint / "config.json").read_text())
    del config["model_type"]
    (good_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type=None.*implements gpt2"):
        load(good_checkpoint)


def test_missing_weight_file(good_checkpoint):
    (good_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No weights in .*gpt2.*model\.safetensors"):
        load(good_checkpoint)


@pytest.mark.parametrize("keep", [0, 5, 100], ids=["empty", "inside-length", "inside-header"])
def test_weight_file_truncated_in_its_header(good_checkpoint, keep):
    weights = good_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"cannot read {weights}.*truncated or corrupt"):
        load(good_checkpoint)


def test_weight_file_that_is_not_safetensors(good_checkpoint):
    weights = good_checkpoint / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=rf"cannot read {weights}.*truncated or corrupt"):
        load(good_checkpoint)


def test_weight_file_missing_a_tensor_names_it(good_checkpoint):
    edit_weights(good_checkpoint, drop=("transformer.h.1.mlp.c_fc.weight",))
    with pytest.raises(KeyError, match=r"missing 1 tensor\(s\).*transformer\.h\.1\.mlp\.c_fc\.weight"):
        load(good_checkpoint)


def test_weight_file_of_another_family_lists_what_is_missing(good_checkpoint, hf_checkpoint):
    llama, _ = hf_checkpoint("llama-gqa")
    shutil.copy(llama / "model.safetensors", good_checkpoint / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing \d+ tensor\(s\).*wte\.weight.*architecture its config\.json names"):
        load(good_checkpoint)


def test_weight_of_the_wrong_shape_names_it_and_both_shapes(good_checkpoint):
    edit_weights(good_checkpoint, transformer__h__0__mlp__c_fc__weight=torch.zeros(D_MODEL, 100))
    with pytest.raises(
        ValueError,
        match=r"blocks\.0\.mlp\.W_in: the checkpoint gives shape \(48, 100\), the config "
        r"implies \(48, 192\); the config does not match the weights",
    ):
        load(good_checkpoint)


def test_unexpected_tensors_are_named_in_a_warning(good_checkpoint):
    edit_weights(good_checkpoint, transformer__h__1__extra__weight=torch.zeros(3))
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) in .* were not used: transformer\.h\.1\.extra\.weight"):
        load(good_checkpoint)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(n_embd=64), r"embed\.W_E: the checkpoint gives shape \(101, 48\), the config implies \(101, 64\)"),
        (dict(vocab_size=100), r"embed\.W_E: the checkpoint gives shape \(101, 48\), the config implies \(100, 48\)"),
        (
            dict(n_positions=128),
            r"pos_embed\.W_pos: the checkpoint gives shape \(64, 48\), the config implies \(128, 48\)",
        ),
        (dict(n_inner=64), r"blocks\.0\.mlp\.W_in: .*\(48, 192\).*\(48, 64\)"),
    ],
    ids=["width", "vocab", "context", "mlp"],
)
def test_config_inconsistent_with_the_weights(good_checkpoint, change, match):
    edit_config(good_checkpoint, **change)
    with pytest.raises(ValueError, match=match):
        load(good_checkpoint)


def test_config_with_more_layers_than_the_weights(good_checkpoint):
    edit_config(good_checkpoint, n_layer=3)
    with pytest.raises(KeyError, match=r"missing .*h\.2\.attn\.c_attn\.weight"):
        load(good_checkpoint)


def test_config_with_fewer_layers_than_the_weights_warns(good_checkpoint):
    edit_config(good_checkpoint, n_layer=1)
    with pytest.warns(UserWarning, match=r"12 tensor\(s\) in .* were not used: transformer\.h\.1\."):
        load(good_checkpoint)


def test_config_with_a_head_count_that_does_not_divide_the_width(good_checkpoint):
    """48 wide, 5 heads: a config error to name, not a reshape failure deep in conversion."""
    edit_config(good_checkpoint, n_head=5)
    # Names both numbers and the head count; not a reshape error from inside a converter.
    with pytest.raises(ValueError, match=r"(?s)^(?!.*rearrange)(?=.*\b48\b)(?=.*head\w*\W{1,3}5\b)"):
        load(good_checkpoint)


def test_config_with_an_unsupported_activation(good_checkpoint):
    edit_config(good_checkpoint, activation_function="mish")
    with pytest.raises(ValueError, match=r"unsupported activation 'mish'; supported: .*gelu_new.*relu"):
        load(good_checkpoint)


def test_config_that_is_not_json(good_checkpoint):
    (good_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load(good_checkpoint)


# Safety of loading -------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_in_a_bin_checkpoint_never_runs(good_checkpoint, tmp_path, writer):
    marker = tmp_path / "code-ran"
    tensors = load_file(good_checkpoint / "model.safetensors")
    (good_checkpoint / "model.safetensors").unlink()
    payload = {**tensors, "evil": _RunsCode(marker)}
    with open(good_checkpoint / "pytorch_model.bin", "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"cannot read .*pytorch_model\.bin"):
        load(good_checkpoint)
    assert not marker.exists(), "loading a .bin checkpoint ran pickled code"


def test_plain_bin_checkpoint_loads_as_the_safetensors_one(good_checkpoint, tokens):
    """The control for the test above: weights_only loading does read honest .bin files."""
    expected = load(good_checkpoint)(tokens)
    torch.save(load_file(good_checkpoint / "model.safetensors"), good_checkpoint / "pytorch_model.bin")
    (good_checkpoint / "model.safetensors").unlink()
    torch.testing.assert_close(load(good_checkpoint)(tokens), expected, atol=0, rtol=0)


def test_index_naming_a_shard_outside_the_directory_is_refused(good_checkpoint, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(good_checkpoint / "model.safetensors", outside)
    names = load_file(outside).keys()
    index = {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}
    (good_checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"outside the checkpoint directory.*refusing to read it"):
        load(good_checkpoint)
