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
