"""What TransformerLens 3.9.0's own tests (tests/tl_suite) found missing, each checked here on its
own: the IOI and MMLU evals, ``fill_missing_keys``, the hook introspection spellings
(``user_hook``, ``HookPoint``'s repr)."""

import logging
import random

import pytest
import torch
from tokenizers_util import tiny_tokenizer

from transformer_hooks import HookedTransformer, HookedTransformerConfig, HookPoint
from transformer_hooks.evals import IOIDataset, ioi_eval, make_mmlu_data_loader, mmlu_eval
from transformer_hooks.loading_from_pretrained import fill_missing_keys


def tiny_model(**overrides) -> HookedTransformer:
    tokenizer = tiny_tokenizer(40, adds_bos=False)
    cfg = dict(n_layers=1, d_model=16, n_ctx=64, d_head=4, d_vocab=40, act_fn="relu", seed=0) | overrides
    return HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tokenizer)


def transformerlens_ioi_texts(seed: int, n: int, symmetric: bool) -> list[str]:
    """TransformerLens 3.9.0's IOIDataset draw (evals.py), on Python's global random."""
    random.seed(seed)
    templates, names = IOIDataset.get_default_templates(), IOIDataset.get_default_names()
    texts = []
    for _ in range(n // 2 if symmetric else n):
        template = random.choice(templates)
        for noun_type, noun_list in IOIDataset.get_default_nouns().items():
            template = template.replace(f"[{noun_type}]", random.choice(noun_list))
        a, b = random.sample(names, 2)
        texts.append(template.replace("[A]", a).replace("[B]", b))
        if symmetric:
            texts.append(template.replace("[A]", b).replace("[B]", a))
    return texts


@pytest.mark.parametrize("symmetric", [False, True])
def test_ioi_dataset_gives_transformerlens_samples_for_a_seed_and_keeps_the_global_random_state(symmetric):
    tokenizer = tiny_tokenizer(40, adds_bos=False)
    random.seed(123)
    state = random.getstate()
    dataset = IOIDataset(tokenizer, num_samples=30, seed=7, symmetric=symmetric)
    assert random.getstate() == state  # TransformerLens reseeds the global state; here it is left alone
    assert [s["text"] for s in dataset.samples] == transformerlens_ioi_texts(7, 30, symmetric)
    assert len(dataset) == 30
    for sample in dataset.samples:  # the prompt ends with the indirect object, the subject is the other name
        assert sample["text"].endswith(sample["IO"].strip())
        assert {sample["IO"], sample["S"]} == {" John", " Mary"}
    if symmetric:  # each pair is one template with the names swapped
        for first, second in zip(dataset.samples[::2], dataset.samples[1::2], strict=True):
            assert (first["IO"], first["S"]) == (second["S"], second["IO"])
    item = dataset[0]
    assert item["prompt"].tolist() == [tokenizer.bos_token_id] + tokenizer.encode(dataset.samples[0]["text"])
    assert item["IO"].tolist() == tokenizer.encode(dataset.samples[0]["IO"])


def test_ioi_eval_of_padded_batches_equals_each_prompt_scored_alone():
    model = tiny_model()
    dataset = IOIDataset(model.tokenizer, num_samples=12, seed=0, names=["John", "Mary", "France", "Paris"])
    assert len({len(dataset[i]["prompt"]) for i in range(len(dataset))}) > 1  # the batches are padded

    diffs = []
    for i in range(len(dataset)):
        item = dataset[i]
        logits = model(item["prompt"][None])[0]
        before_answer = logits[len(item["prompt"]) - len(item["IO"]) - 1]  # the names are one token each
        diffs.append((before_answer[item["IO"][0]] - before_answer[item["S"][0]]).item())

    result = ioi_eval(model, dataset=dataset, batch_size=5)
    assert result["Logit Difference"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert result["Accuracy"] == sum(d > 0 for d in diffs) / len(diffs)


MMLU_ROWS = {
    "geography": None,  # not an MMLU subject: refused
    "global_facts": [
        {"question": "The capital of France is", "choices": ["Paris", "London", "Rome", "Madrid"], "answer": 0},
        {"question": "The capital of Italy is", "choices": ["Paris", "London", "Rome", "Madrid"], "answer": 2},
        {"question": "The capital of Spain is", "choices": ["Paris", "London", "Rome", "Madrid"], "answer": 3},
    ],
    "prehistory": [{"question": "In 1492 Columbus sailed the", "choices": ["ocean", "blue", "a", "the"], "answer": 0}],
}


def test_mmlu_loader_names_bad_subjects_and_needs_local_rows():
    with pytest.raises(ValueError, match="Invalid subject"):
        make_mmlu_data_loader(subjects="geography", dataset=MMLU_ROWS)
    with pytest.raises(ValueError, match="dataset="):
        make_mmlu_data_loader(subjects="global_facts")
    with pytest.raises(ValueError, match="no rows for the subject"):
        make_mmlu_data_loader(subjects=["virology"], dataset=MMLU_ROWS)
    rows = make_mmlu_data_loader(num_samples=2, dataset=MMLU_ROWS)  # every MMLU subject it has
    assert [(r["subject"], r["answer"]) for r in rows] == [("global_facts", 0), ("global_facts", 2), ("prehistory", 0)]


def test_mmlu_eval_picks_the_likeliest_answer_letter():
    model = tiny_model()
    tok = model.tokenizer
    tok.add_tokens(list("ABCD"))  # ids 32..35, inside the model's 40
    letters = []  # TransformerLens's rule: " A" if it is one token, else "A"
    for letter in "ABCD":
        ids = tok.encode(" " + letter, add_special_tokens=False)
        letters.append(ids[0] if len(ids) == 1 else tok.encode(letter, add_special_tokens=False)[0])
    assert len(set(letters)) == 4 and max(letters) < 40
    rows = make_mmlu_data_loader(dataset=MMLU_ROWS)
    predicted = []
    for row in rows:
        prompt = f"Question: {row['question']}\nChoices:\n"
        prompt += "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(row["choices"])) + "Answer:"
        last = model(torch.tensor([tok.encode(prompt)]))[0, -1]
        predicted.append(int(last[letters].argmax()))
    correct = [p == row["answer"] for p, row in zip(predicted, rows, strict=True)]

    result = mmlu_eval(model, dataset=MMLU_ROWS)
    assert result["num_total"] == 4 and result["num_correct"] == sum(correct)
    assert result["accuracy"] == sum(correct) / 4
    assert result["subject_scores"] == {"global_facts": sum(correct[:3]) / 3, "prehistory": float(correct[3])}


def test_fill_missing_keys_fills_from_the_model_and_refuses_missing_matrices(caplog):
    model = tiny_model()
    full = model.state_dict()
    partial = {k: v.clone() for k, v in full.items() if k not in ("pos_embed.W_pos", "blocks.0.ln1.w")}
    with caplog.at_level(logging.WARNING):
        filled = fill_missing_keys(model, partial)
    assert filled.keys() == full.keys()
    assert torch.equal(filled["pos_embed.W_pos"], full["pos_embed.W_pos"])
    assert "pos_embed.W_pos" in caplog.text and "normalization key" in caplog.text and "blocks.0.ln1.w" in caplog.text
    for matrix in ("blocks.0.attn.W_K", "blocks.0.mlp.W_out"):
        with pytest.raises(ValueError, match=matrix.replace(".", r"\.")):
            fill_missing_keys(model, {k: v for k, v in full.items() if k != matrix})


def test_hook_point_repr_and_user_hook_as_transformerlens():
    assert repr(HookPoint()) == "HookPoint()"
    model = tiny_model()

    def hook(act, hook):
        return act

    point = model.blocks[0].hook_resid_post
    point.add_hook(hook)
    point.add_hook(hook, dir="bwd")
    assert repr(point) == "HookPoint(name='blocks.0.hook_resid_post', 1 fwd, 1 bwd)"
    assert [h.user_hook for h in model.list_hooks()["blocks.0.hook_resid_post"]] == [hook, hook]


def gqa_model(seed: int = 0) -> HookedTransformer:
    return tiny_model(n_heads=4, n_key_value_heads=2, seed=seed)


def test_ungroup_grouped_query_attention_repeats_each_kv_head_per_query_head():
    model = gqa_model()
    tokens = torch.arange(1, 9)[None]
    names = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.hook_k_input", "blocks.0.attn.hook_z"]
    grouped_logits, grouped = model.run_with_cache(tokens, names_filter=names)
    assert grouped["blocks.0.attn.hook_k"].shape[2] == 2

    model.cfg.ungroup_grouped_query_attention = True  # TransformerLens's idiom, as set_ungroup_...(True)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names[:2]:  # query head h reads kv head h // 2
        torch.testing.assert_close(cache[name], grouped[name].repeat_interleave(2, dim=2))
    assert cache["blocks.0.hook_k_input"].shape[2] == 4
    torch.testing.assert_close(logits, grouped_logits, atol=1e-5, rtol=0)

    def zero_head_1(k, hook):  # ungrouped, one query head's keys can be edited alone
        k[:, :, 1] = 0
        return k

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_k", zero_head_1)]):
        _, edited = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z, z_edited = cache["blocks.0.attn.hook_z"], edited["blocks.0.attn.hook_z"]
    assert torch.equal(z_edited[:, :, [0, 2, 3]], z[:, :, [0, 2, 3]])
    assert not torch.allclose(z_edited[:, :, 1], z[:, :, 1])

    generated = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    model.set_ungroup_grouped_query_attention(False)
    assert torch.equal(generated, model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False))


def test_a_transformerlens_gqa_state_dict_loads_strictly():
    from weights_conversion.transformer_lens import to_transformer_lens_state_dict

    source, target = gqa_model(seed=0), gqa_model(seed=1)
    state = to_transformer_lens_state_dict(source)
    assert "blocks.0.attn._W_K" in state and "blocks.0.attn.W_K" not in state
    state["blocks.0.attn.mask"] = torch.ones(64, 64, dtype=torch.bool).tril()  # TransformerLens's buffers
    state["blocks.0.attn.IGNORE"] = torch.tensor(-torch.inf)
    target.load_state_dict(state, strict=True)
    tokens = torch.arange(1, 9)[None]
    assert torch.equal(target(tokens), source(tokens))


def test_unembed_hook_in_and_hook_out_are_the_unembedding_input_and_the_logits():
    model = tiny_model()
    tokens = torch.arange(1, 9)[None]
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["unembed.hook_out"], logits)
    torch.testing.assert_close(model.unembed.W_U.T @ cache["unembed.hook_in"][0, 3] + model.unembed.b_U, logits[0, 3])

    def zero(x, hook):
        return torch.zeros_like(x)

    bias_only = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", zero)])
    assert torch.equal(bias_only, model.unembed.b_U.expand_as(logits))
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_out", zero)]), torch.zeros_like(logits))


def test_errors_transformerlens_asserts_or_lets_torch_raise_are_those_types_too():
    from transformer_hooks import FactoredMatrix

    model = tiny_model()
    model.tokenizer = None
    with pytest.raises(AssertionError, match="no tokenizer"):
        model.generate("hello", max_new_tokens=2, verbose=False)
    with pytest.raises(AssertionError, match="eos_token_id"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, stop_at_eos=True, verbose=False)
    with pytest.raises(RuntimeError, match="mismatch") as error:  # torch's broadcast error in TransformerLens
        FactoredMatrix(torch.ones(9, 5, 3), torch.ones(2, 4, 3, 7))
    assert isinstance(error.value, ValueError | AssertionError)
    with pytest.raises(RuntimeError):
        torch.randn(4, 6, 3) @ FactoredMatrix(torch.randn(2, 3, 4), torch.randn(2, 4, 6))


class Wrapped:
    """A tensor wrapper with the protocol FactoredMatrix multiplies by (not a torch.Tensor)."""

    def __init__(self, tensor):
        self.tensor = tensor

    ndim = property(lambda self: self.tensor.ndim)
    shape = property(lambda self: self.tensor.shape)

    def broadcast_to(self, shape):
        return Wrapped(self.tensor.broadcast_to(shape))

    def __matmul__(self, other):
        return NotImplemented if not isinstance(other, torch.Tensor | Wrapped) else Wrapped(self.tensor @ _raw(other))

    def __rmatmul__(self, other):
        return Wrapped(_raw(other) @ self.tensor)


def _raw(x):
    return x.tensor if isinstance(x, Wrapped) else x


def test_factored_matrix_multiplies_by_a_tensor_like_object_through_its_own_matmul():
    from transformer_hooks import FactoredMatrix

    a, b, right, left = torch.randn(2, 3), torch.randn(3, 4), torch.randn(4, 5), torch.randn(5, 2)
    product = FactoredMatrix(a, b) @ Wrapped(right)
    assert isinstance(product, FactoredMatrix) and isinstance(product.AB, Wrapped)
    torch.testing.assert_close(product.AB.tensor, a @ b @ right)
    product = Wrapped(left) @ FactoredMatrix(a, b)
    assert isinstance(product, FactoredMatrix) and isinstance(product.AB, Wrapped)
    torch.testing.assert_close(product.AB.tensor, left @ a @ b)

    matrix = FactoredMatrix(torch.randn(4, 3), torch.randn(3, 4))
    with pytest.warns(DeprecationWarning, match="use .V"):
        assert torch.equal(matrix.Vh, matrix.V)


def test_batch_methods_leave_entries_without_the_batch_axis_alone():
    from transformer_hooks import ActivationCache

    cache = ActivationCache(
        {
            "blocks.0.hook_resid_pre": torch.randn(3, 5, 4),
            "blocks.0.hook_mlp_out": torch.randn(3, 5, 4),
            "shared": torch.randn(1, 5),
        },
        model=None,
    )
    sliced = cache.apply_slice_to_batch_dim((1, 3))
    assert torch.equal(sliced["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_pre"][1:3])
    assert torch.equal(sliced["shared"], cache["shared"])
    with pytest.raises(AssertionError, match="batch size 3"):
        cache.remove_batch_dim()

    one = ActivationCache(
        {"blocks.0.hook_resid_pre": torch.randn(1, 5, 4), "by_position": torch.randn(5, 5)}, model=None
    )
    by_position = one["by_position"]
    one.remove_batch_dim()
    assert one["blocks.0.hook_resid_pre"].shape == (5, 4) and one["by_position"] is by_position


def test_workflows_follow_or_refuse_ungrouped_keys():
    from transformer_hooks.analysis.circuits import attribute_edges
    from transformer_hooks.patching import get_act_patch_attn_head_k_all_pos

    model = gqa_model()
    clean, corrupted = torch.arange(1, 9)[None], torch.arange(11, 19)[None]
    _, clean_cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[:, -1, 3].sum()

    model.set_ungroup_grouped_query_attention(True)
    _, ungrouped_cache = model.run_with_cache(clean)
    sweep = get_act_patch_attn_head_k_all_pos(model, corrupted, ungrouped_cache, metric)
    assert sweep.shape == (1, 4)  # one column per query head's keys
    by_hand = []
    for head in range(4):

        def patch(k, hook, head=head):
            k[:, :, head] = ungrouped_cache["blocks.0.attn.hook_k"][:, :, head]
            return k

        by_hand.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.attn.hook_k", patch)])))
    torch.testing.assert_close(sweep[0], torch.stack(by_hand).detach(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="set_ungroup_grouped_query_attention"):
        attribute_edges(model, clean, corrupted, metric, method="EAP")
    assert clean_cache["blocks.0.attn.hook_k"].shape[2] == 2


def test_d_vocab_out_sizes_the_logits_and_everything_that_reads_them():
    from transformer_hooks import ModelConfig
    from transformer_hooks.scale.plan import plan_memory

    model = tiny_model(d_vocab_out=30)  # reads 40 token ids, predicts 30 classes
    assert model.cfg.d_vocab == 40 and model.cfg.d_vocab_out == 30
    assert model.unembed.W_U.shape == (16, 30) and model.embed.W_E.shape == (40, 16)
    tokens = torch.tensor([[35, 3, 7, 29, 11, 2]])  # an input id beyond the outputs is fine
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (1, 6, 30) and cache["unembed.hook_out"].shape == (1, 6, 30)
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    torch.testing.assert_close(model(tokens, return_type="loss"), manual)
    out = model.generate(tokens, max_new_tokens=4, do_sample=True, freq_penalty=2.0, stop_at_eos=False, verbose=False)
    assert out.shape == (1, 10) and int(out[0, 6:].max()) < 30
    assert plan_memory(model.cfg, torch.float32, batch=1, seq=6, cache="none").logits == 6 * 30 * 4
    assert ModelConfig.from_dict(model.cfg.to_dict()) == model.cfg
    with pytest.raises(ValueError, match="tie_word_embeddings needs d_vocab_out"):
        model.cfg.replace(tie_word_embeddings=True)
