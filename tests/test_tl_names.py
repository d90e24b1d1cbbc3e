"""TransformerLens's names that ported code imports: each exists here and means what it means
there (checked against a second computation, not against numbers from a run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from transformer_hooks import (
    ActivationCache,
    HookedTransformer,
    HookedTransformerConfig,
    evals,
    loading_from_pretrained,
    utils,
)
from transformer_hooks.hook_points import HookedRootModule, HookPoint
from weights_conversion.transformer_lens import to_transformer_lens_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_vocab=50, n_ctx=16, seed=0)
VARIANTS = {
    "attn-only": dict(attn_only=True, act_fn=None, d_mlp=None),
    "gelu": dict(act_fn="gelu", d_mlp=64),
    "rotary-gqa-gated-rms": dict(
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        d_mlp=64,
    ),
    "parallel": dict(act_fn="gelu_new", d_mlp=64, parallel_attn_mlp=True),
}


def test_top_level_and_hook_points_names():
    import transformer_hooks
    import transformer_hooks.hook_points as hook_points

    assert transformer_hooks.HookPoint is hook_points.HookPoint
    assert transformer_hooks.HookedRootModule is hook_points.HookedRootModule
    assert transformer_hooks.ActivationCache is ActivationCache


def test_config_maps_onto_model_config():
    cfg = HookedTransformerConfig(**SMALL, **VARIANTS["rotary-gqa-gated-rms"], rotary_base=500.0)
    mc = cfg.to_model_config()
    assert (mc.n_layers, mc.d_model, mc.n_heads, mc.d_head, mc.n_kv_heads) == (2, 32, 4, 8, 2)
    assert mc.positional_embedding == "rotary" and mc.rope_theta == 500.0 and mc.rotary_dim == 8
    assert mc.gated_mlp and mc.normalization_type == "RMS" and mc.positional_embedding_type == "rotary"
    standard = HookedTransformerConfig(**SMALL, use_attn_scale=False).to_model_config()
    assert standard.positional_embedding == "learned" and standard.scores_scale == 1.0
    assert standard.act_fn == "relu" and standard.d_mlp == 4 * 32  # TransformerLens's defaults
    assert HookedTransformerConfig(**SMALL).n_params == 2 * (32 * 8 * 4 * 4 + 32 * 128 * 2)
    local = HookedTransformerConfig(**SMALL, use_local_attn=True, attn_types=["global", "local"], window_size=4)
    assert local.to_model_config().attn_windows == (None, 4)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(normalization_type=None), r"normalization_type=None is not supported"),
        (dict(positional_embedding_type="shortformer"), r"positional_embedding_type='shortformer'"),
        (dict(act_fn="solu_ln"), r"act_fn='solu_ln'.*not implemented"),
        (dict(final_rms=True), r"final_rms=True is not supported"),
        (dict(d_vocab=-1), r"d_vocab=-1: give the vocabulary size"),
        (dict(init_mode="xavier_uniform"), r"init_mode='xavier_uniform' is not implemented"),
        (dict(attention_dir="bidirectional"), r"attention_dir='bidirectional' is not supported"),
    ],
)
def test_unsupported_config_settings_are_refused_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        HookedTransformer(HookedTransformerConfig(**{**SMALL, **changes}))


def test_model_from_a_config_dict_and_tl_init():
    model = HookedTransformer({**SMALL, "d_mlp": 64, "act_fn": "gelu"})
    again = HookedTransformer(HookedTransformerConfig(**SMALL, d_mlp=64, act_fn="gelu"))
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # seed=0: the same weights
    std = 0.8 / math.sqrt(32)
    W = torch.cat([model.W_Q.flatten(), model.W_in.flatten(), model.W_E.flatten()])
    assert abs(W.std().item() - std) < 0.1 * std
    assert model.b_U.abs().sum() == 0 and model.b_O.abs().sum() == 0


def test_attn_only_blocks_have_no_mlp_and_decompose():
    model = HookedTransformer(HookedTransformerConfig(**SMALL, **VARIANTS["attn-only"]))
    assert not any("mlp" in name or "ln2" in name for name, _ in model.named_parameters())
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    assert not any("mlp" in k or "resid_mid" in k or "ln2" in k for k in cache)
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_pre", 0] + cache["attn_out", 0], atol=1e-6, rtol=0)
    parts, labels = cache.decompose_resid(layer=-1, return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "1_attn_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("weights_file", ["model_final.pth", "model.safetensors"])
def test_transformer_lens_checkpoint_round_trip(tmp_path, variant, weights_file):
    """A TransformerLens state dict (TL's names and shapes, GQA's ``_W_K``) + config.json, as
    its toy models ship, loads to the model it was written from: bit for bit unprocessed, and
    with the same log-probs processed."""
    cfg = HookedTransformerConfig(**SMALL, **VARIANTS[variant])
    model = HookedTransformer(cfg)
    state = to_transformer_lens_state_dict(model)
    assert state["blocks.0.attn.W_Q"].shape == (4, 32, 8) and state["blocks.0.attn.W_O"].shape == (4, 8, 32)
    if variant == "rotary-gqa-gated-rms":
        assert state["blocks.0.attn._W_K"].shape == (2, 32, 8)
    # TL's buffers are in its state dicts too; they are not weights.
    state["blocks.0.attn.IGNORE"] = torch.tensor(-1e5)
    state["blocks.0.attn.mask"] = torch.ones(16, 16).tril().bool()
    if weights_file.endswith(".pth"):
        torch.save(state, tmp_path / weights_file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / weights_file)
    saved = {k: v for k, v in cfg.to_dict().items() if k != "dtype"}
    (tmp_path / "config.json").write_text(json.dumps({**saved, "lr": 1e-3}))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    raw = HookedTransformer.from_pretrained_no_processing(str(tmp_path))
    assert torch.equal(raw(tokens), model(tokens))
    processed = HookedTransformer.from_pretrained(str(tmp_path))
    torch.testing.assert_close(processed(tokens).log_softmax(-1), model(tokens).log_softmax(-1), atol=1e-4, rtol=0)
    assert loading_from_pretrained.get_pretrained_model_config(str(tmp_path)) == raw.cfg.replace(model_name="custom")


def test_get_checkpoint_labels():
    labels, kind = loading_from_pretrained.get_checkpoint_labels("pythia-70m")
    assert kind == "step" and labels[:3] == [0, 1, 2] and labels[-1] == 143000
    with pytest.raises(ValueError, match="is not checkpointed"):
        loading_from_pretrained.get_checkpoint_labels("gpt2")


def test_get_checkpoint_labels_of_a_local_toy_model(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (10, 200, 3000):
        (tmp_path / "checkpoints" / f"model_{step}.pth").write_bytes(b"")
    assert loading_from_pretrained.get_checkpoint_labels(str(tmp_path)) == ([10, 200, 3000], "step")


def test_lm_cross_entropy_loss_is_the_models_loss():
    model = HookedTransformer(HookedTransformerConfig(**SMALL, act_fn="gelu"))
    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    logits = model(tokens)
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, tokens), model(tokens, return_type="loss"))
    per_token = utils.lm_cross_entropy_loss(logits, tokens, per_token=True)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    masked = utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask)
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    torch.testing.assert_close(masked, per_token[keep].mean())
    assert utils.lm_accuracy(logits, tokens).item() == (logits.argmax(-1)[:, :-1] == tokens[:, 1:]).float().mean()


class _Tok:
    """The few attributes of a tokenizer that the mask helpers read."""

    def __init__(self, pad, bos, side="left"):
        self.pad_token_id, self.bos_token_id, self.padding_side = pad, bos, side


def test_one_next_token_loss_with_one_masking_rule():
    """The model's loss (``return_type="loss"``, ``loss_fn``) is ``utils.lm_cross_entropy_loss``:
    with a padding mask, a prediction counts when it and its token are real, and the per-token
    loss is 0 elsewhere (as in TransformerLens); the mean is over the predictions that count."""
    model = HookedTransformer(HookedTransformerConfig(**SMALL, act_fn="gelu"))
    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    logits = model(tokens, attention_mask=mask)
    keep = utils.next_token_mask(mask)
    assert keep.tolist()[0] == [False, False, False, True, True, True, True]
    assert keep.tolist()[1] == [True] * 5 + [False, False]
    per_token = utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask, per_token=True)
    assert (per_token[~keep] == 0).all() and (per_token[keep] > 0).all()
    from_model = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(from_model, per_token, atol=0, rtol=0)
    torch.testing.assert_close(model.loss_fn(logits, tokens, mask, per_token=True), per_token, atol=0, rtol=0)
    mean = model(tokens, attention_mask=mask, return_type="loss")
    torch.testing.assert_close(mean, utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(mean, per_token[keep].mean())
    with pytest.raises(ValueError, match="at least two tokens"):
        utils.lm_cross_entropy_loss(logits[:, :1], tokens[:, :1])


def test_get_attention_mask_follows_transformer_lens_rule():
    tokens = torch.tensor([[0, 0, 5, 0, 6], [7, 8, 9, 0, 0]])
    left = utils.get_attention_mask(_Tok(0, 1), tokens, prepend_bos=False)
    assert left.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]  # only the leading run of pads
    right = utils.get_attention_mask(_Tok(0, 1, "right"), tokens, prepend_bos=False)
    assert right.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]  # only the trailing run
    # BOS equal to the pad token: the last leading "pad" is the BOS, attended.
    bos_is_pad = utils.get_attention_mask(_Tok(0, 0), torch.tensor([[0, 0, 0, 5, 6]]), prepend_bos=True)
    assert bos_is_pad.tolist() == [[0, 0, 1, 1, 1]]


def test_get_tokens_with_bos_removed():
    tok = _Tok(0, 1)
    tokens = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 2]])
    assert utils.get_tokens_with_bos_removed(tok, tokens).tolist() == [[0, 0, 5, 6], [7, 8, 9, 2]]
    assert utils.get_tokens_with_bos_removed(_Tok(0, 1, "right"), tokens).tolist() == tokens[:, 1:].tolist()


def test_small_tensor_helpers():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(utils.get_corner(x, 2), x[:2, :2, :2])
    assert utils.remove_batch_dim(x[:1]).shape == (3, 4) and utils.remove_batch_dim(x).shape == (2, 3, 4)
    assert torch.equal(utils.transpose(x), x.transpose(-1, -2))
    assert utils.is_lower_triangular(torch.ones(3, 3).tril()) and not utils.is_lower_triangular(torch.ones(3, 3))
    assert torch.equal(utils.get_cumsum_along_dim(x, -1, reverse=True), x.flip(-1).cumsum(-1).flip(-1))
    assert utils.get_offset_position_ids(0, torch.tensor([[0, 1, 1]])).tolist() == [[0, 0, 1]]
    assert utils.repeat_along_head_dimension(x, 5).shape == (2, 3, 5, 4)
    assert utils.filter_dict_by_prefix({"a.b": 1, "a.c": 2, "b.a": 3}, "a") == {"b": 1, "c": 2}
    torch.testing.assert_close(utils.gelu_new(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert utils.get_device().type in ("cpu", "cuda", "mps")
    model = HookedTransformer(HookedTransformerConfig(**SMALL, act_fn="relu"))
    assert utils.get_nested_attr(model, "blocks.1.attn") is model.blocks[1].attn


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat dog ran to park".split()
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_tokenize_and_concatenate_and_data_loaders():
    tok = _word_tokenizer()
    texts = ["the cat sat on a mat", "the dog ran to a park", "a cat ran"]
    out = utils.tokenize_and_concatenate(texts, tok, max_length=5)["tokens"]
    stream = tok(texts[0])["input_ids"] + [1] + tok(texts[1])["input_ids"] + [1] + tok(texts[2])["input_ids"]
    assert out.shape == (len(stream) // 4, 5) and (out[:, 0] == 0).all()
    assert out[:, 1:].flatten().tolist() == stream[: out.shape[0] * 4]
    dicts = utils.tokenize_and_concatenate([{"text": t} for t in texts], tok, max_length=5)["tokens"]
    assert torch.equal(dicts, out)

    loader = evals.make_pile_data_loader(tok, batch_size=2, dataset=texts, max_length=5)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (2, 5)
    with pytest.raises(ValueError, match=r"make_wiki_data_loader needs the corpus as dataset="):
        evals.make_wiki_data_loader(tok)

    model = HookedTransformer(HookedTransformerConfig(**{**SMALL, "d_vocab": 14}, act_fn="gelu"), tokenizer=tok)
    loss = evals.evaluate_on_dataset(model, loader, truncate=100)
    expected = [model(b["tokens"], return_type="loss").item() for b in loader]
    assert len(expected) == len(loader)  # shuffled order; the mean is the same
    assert abs(loss - sum(expected) / len(expected)) < 1e-5


def test_induction_loss_is_the_second_half_loss():
    model = HookedTransformer(HookedTransformerConfig(**SMALL, act_fn="gelu"))
    g = torch.Generator().manual_seed(0)
    loss = evals.induction_loss(model, batch_size=2, subseq_len=6, prepend_bos=False, generator=g)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 50, (2, 6), generator=g)
    tokens = first.repeat(1, 2)
    per_token = utils.lm_cross_entropy_loss(model(tokens), tokens, per_token=True)
    torch.testing.assert_close(loss, per_token[:, 7:].mean())


def test_user_defined_hooked_root_module_with_hooks_and_bwd():
    class Toy(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.hook_lin = HookPoint()
            self.setup()

        def forward(self, x):
            return self.hook_lin(self.lin(x)).relu().sum()

    toy = Toy()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out, cache = toy.run_with_cache(x)
    torch.testing.assert_close(cache["hook_lin"], toy.lin(x))
    grads = {}
    with toy.hooks(bwd_hooks=[("hook_lin", lambda g, hook: grads.setdefault(hook.name, g))]):
        toy(x).backward()
    torch.testing.assert_close(grads["hook_lin"], (toy.lin(x) > 0).float())
    assert toy.mod_dict["hook_lin"] is toy.hook_lin and list(toy.hook_dict) == ["hook_lin"]
