"""TransformerLens's ``evals`` on local data: quick loss checks of a model.

TransformerLens's ``make_*_data_loader(tokenizer)`` download their corpus from the hub; here
each takes the corpus as ``dataset`` (a list of strings, of ``{"text": ...}`` dicts, or a
``datasets.Dataset`` already on disk) and refuses to run without it. ``induction_loss`` and
``evaluate_on_dataset`` compute what TransformerLens's do. ``IOIDataset`` and ``ioi_eval`` are
TransformerLens's (the same prompts for the same seed); ``make_mmlu_data_loader`` and
``mmlu_eval`` take MMLU's questions as ``dataset`` ({subject: rows}) rather than downloading them.

On a model split over processes (``pipeline_ranks``) every rank calls an evaluation alike: each
starts by giving every rank rank 0's random state (``model.blocks.same_random_state``), so a
shuffled loader, random tokens or drawn IOI prompts are the same batches on every rank (without
it each rank would feed its own draw into one model), and rank 0 returns the result, the other
ranks None.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..progress import tqdm
from ..protocol import HookedModel
from ..utils import lm_cross_entropy_loss, tokenize_and_concatenate

SANITY_TEXT = (
    "Many important transition points in the history of science have been moments when science 'zoomed in.' "
    "At these points, we develop a visualization or tool that allows us to see the world in a new level of "
    "detail, and a new field of science develops to study the world through this lens."
)


def sanity_check(model: HookedModel) -> torch.Tensor | None:
    """The model's loss on one paragraph (TransformerLens: below 5 is probably fine, above 7 is broken);
    None off rank 0 of a model split over processes."""
    return model(SANITY_TEXT, return_type="loss")


class _TokenRows(Dataset):
    """Rows of a [rows, pos] token tensor as ``{"tokens": row}`` (what TransformerLens's loaders yield)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i]}


def make_data_loader(
    tokenizer: Any, dataset: Any, batch_size: int = 8, max_length: int = 1024, column_name: str = "text"
) -> DataLoader:
    """Batches ``{"tokens": [batch_size, max_length]}`` of ``dataset`` (the texts of its
    ``column_name`` column) tokenized by ``tokenizer`` and concatenated
    (``utils.tokenize_and_concatenate``), shuffled, the last incomplete batch dropped.
    """
    tokenized = tokenize_and_concatenate(dataset, tokenizer, max_length=max_length, column_name=column_name)
    rows = tokenized if not isinstance(tokenized, dict) else _TokenRows(tokenized["tokens"])
    return DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True)


def _named_loader(corpus: str):
    def make(tokenizer: Any, batch_size: int = 8, dataset: Any = None, max_length: int = 1024) -> DataLoader:
        if dataset is None:
            raise ValueError(
                f"make_{corpus}_data_loader needs the corpus as dataset=...: TransformerLens downloads it from "
                f"the hub, which this library never does. Pass a list of texts or a datasets.Dataset on disk."
            )
        return make_data_loader(tokenizer, dataset, batch_size, max_length)

    make.__name__ = f"make_{corpus}_data_loader"
    make.__doc__ = f"TransformerLens's ``make_{corpus}_data_loader`` on a local ``dataset`` (see ``make_data_loader``)."
    return make


make_wiki_data_loader = _named_loader("wiki")
make_owt_data_loader = _named_loader("owt")
make_pile_data_loader = _named_loader("pile")
make_code_data_loader = _named_loader("code")
DATASET_NAMES = ["wiki", "owt", "pile", "code"]
DATASET_LOADERS = [make_wiki_data_loader, make_owt_data_loader, make_pile_data_loader, make_code_data_loader]


@torch.no_grad()
def evaluate_on_dataset(model: HookedModel, data_loader: Any, truncate: int = 100, device: Any = None) -> float | None:
    """Mean of ``model``'s per-batch losses over the first ``truncate + 1`` batches of
    ``data_loader`` (as TransformerLens counts them), the tokens moved to ``device`` (None: the model's).
    None off rank 0 of a model split over processes.
    """
    device = model.device if device is None else device
    running_loss, total = 0.0, 0
    model.blocks.same_random_state()  # a shuffled loader gives every rank the same batches
    for batch in tqdm(data_loader, leave=False):
        loss = model(batch["tokens"].to(device), return_type="loss")
        if loss is not None:  # None: another rank of a split model gets the loss
            running_loss += loss.mean().item()
        total += 1
        if total > truncate:
            break
    if total == 0:
        raise ValueError("the data loader yielded no batch (too little text for one batch of max_length tokens?)")
    return running_loss / total if model.blocks.gets_output else None


@torch.no_grad()
def induction_loss(
    model: HookedModel,
    tokenizer: Any = None,
    batch_size: int = 4,
    subseq_len: int = 384,
    prepend_bos: bool | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Mean next-token loss of ``model`` on the second half of random token sequences repeated
    twice (low if the model has induction heads).

    ``batch_size`` sequences of ``2 * subseq_len`` tokens, drawn from [100, 20000) as in
    TransformerLens (capped at the vocabulary) with ``generator`` (split over processes: seed
    it alike on every rank), on ``device`` (None: the model's); with BOS (``prepend_bos``,
    None: the model's rule), the first token is replaced by the BOS of ``tokenizer`` (None: the
    model's). None off rank 0 of a model split over processes.
    """
    device = model.device if device is None else device
    model.blocks.same_random_state()  # every rank of a split model draws the same tokens
    high = min(20000, model.cfg.d_vocab)
    low = 100 if high > 200 else 0
    first_half = torch.randint(low, high, (batch_size, subseq_len), generator=generator).to(device)
    repeated = first_half.repeat(1, 2)
    prepend_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    if prepend_bos:
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        bos = tokenizer.bos_token_id if tokenizer is not None else model.cfg.bos_token_id
        if bos is None:
            raise ValueError("prepend_bos needs a BOS token id: pass tokenizer= or prepend_bos=False")
        repeated[:, 0] = bos
    logits = model(repeated, return_type="logits")
    if logits is None:  # another rank of a split model gets the logits
        return None
    per_token = lm_cross_entropy_loss(logits, repeated, per_token=True)
    return per_token[:, subseq_len + 1 :].mean()


def evaluate(model: HookedModel, truncate: int = 100, batch_size: int = 8, tokenizer: Any = None, datasets: Any = None):
    """``evaluate_on_dataset`` of ``model`` on each local corpus in ``datasets`` ({name: texts}),
    tokenized by ``tokenizer`` (None: the model's) in batches of ``batch_size``, over
    ``truncate + 1`` batches; prints and returns ``{f"{name}_loss": loss}``. TransformerLens
    downloads four corpora instead. None (and nothing printed) off rank 0 of a model split over processes.
    """
    if not datasets:
        raise ValueError("evaluate needs datasets={name: texts}: the corpora are not downloaded here")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    losses = {}
    for name, data in datasets.items():
        loss = evaluate_on_dataset(model, make_data_loader(tokenizer, data, batch_size), truncate=truncate)
        if loss is not None:
            print(f"{name}: {loss}")
        losses[f"{name}_loss"] = loss
    return losses if model.blocks.gets_output else None


class IOIDataset(Dataset):
    """TransformerLens's Indirect Object Identification prompts (Wang et al. 2022): each sample
    is a template with its nouns filled in and two distinct names, ``[A]`` the indirect object
    (``"IO"``) and ``[B]`` the subject (``"S"``), e.g. "John and Mary went to the store to buy
    milk. Mary handed the milk to" with IO " John".

    ``samples``: ``{"text", "IO", "S"}`` dicts (IO and S with a leading space); an item is
    ``{"prompt", "IO", "S"}`` token tensors (``prompt`` with BOS first if ``prepend_bos``).
    ``symmetric``: each draw also gives the sample with the names swapped. ``seed``: the
    samples TransformerLens gives for that seed (it seeds Python's global ``random``; here a
    private ``random.Random(seed)`` draws the same ones and the global state is left alone);
    None draws from the global ``random`` state. ``tokenizer``: a HF tokenizer (its
    ``encode`` and ``bos_token_id``); ``templates``, ``names``, ``nouns``: what is drawn from
    (default: TransformerLens's, ``get_default_*``); ``num_samples``: how many samples.
    """

    def __init__(
        self,
        tokenizer: Any,
        templates: list[str] | None = None,
        names: list[str] | None = None,
        nouns: dict[str, list[str]] | None = None,
        num_samples: int = 1000,
        symmetric: bool = False,
        prepend_bos: bool = True,
        seed: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        self.rng: Any = random if seed is None else random.Random(seed)
        self.templates = templates if templates is not None else self.get_default_templates()
        self.names = names if names is not None else self.get_default_names()
        self.nouns = nouns if nouns is not None else self.get_default_nouns()
        if len(set(self.names)) < 2:
            raise ValueError(f"IOIDataset needs at least two distinct names, got {self.names!r}")
        self.samples: list[dict[str, str]] = []
        for _ in range(num_samples // 2 if symmetric else num_samples):
            self.samples.extend(self.get_sample(symmetric=symmetric))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = self.samples[idx]
        prompt = self.tokenizer.encode(sample["text"])
        if self.prepend_bos:
            prompt = [self.tokenizer.bos_token_id] + prompt
        return {
            "prompt": torch.LongTensor(prompt),
            "IO": torch.LongTensor(self.tokenizer.encode(sample["IO"])),
            "S": torch.LongTensor(self.tokenizer.encode(sample["S"])),
        }

    def get_sample(self, symmetric: bool = False) -> list[dict[str, str]]:
        """One template filled in (two with ``symmetric``), drawn as TransformerLens draws it."""
        template: str = self.rng.choice(self.templates)
        for noun_type, noun_list in self.nouns.items():
            template = template.replace(f"[{noun_type}]", self.rng.choice(noun_list))
        a, b = self.rng.sample(self.names, 2)
        samples = [{"text": template.replace("[A]", a).replace("[B]", b), "IO": " " + a, "S": " " + b}]
        if symmetric:
            samples.append({"text": template.replace("[A]", b).replace("[B]", a), "IO": " " + b, "S": " " + a})
        return samples

    @staticmethod
    def get_default_names() -> list[str]:
        """TransformerLens's default names."""
        return ["John", "Mary"]

    @staticmethod
    def get_default_templates() -> list[str]:
        """TransformerLens's default templates (``[A]``: IO, ``[B]``: S, nouns in brackets)."""
        return [
            "[A] and [B] went to the [LOCATION] to buy [OBJECT]. [B] handed the [OBJECT] to [A]",
            "Then, [B] and [A] went to the [LOCATION]. [B] gave the [OBJECT] to [A]",
        ]

    @staticmethod
    def get_default_nouns() -> dict[str, list[str]]:
        """TransformerLens's default nouns, by the bracketed name they fill."""
        return {"LOCATION": ["store", "market"], "OBJECT": ["milk", "eggs", "bread"]}


@torch.no_grad()
def ioi_eval(
    model: HookedModel,
    dataset: Any = None,
    batch_size: int = 8,
    num_samples: int = 1000,
    tokenizer: Any = None,
    symmetric: bool = False,
) -> dict[str, float] | None:
    """TransformerLens's ``ioi_eval``: over ``dataset`` (default: an ``IOIDataset`` of
    ``num_samples``), the mean logit difference between the indirect object's and the
    subject's first differing token at the position before the answer, and the fraction of
    prompts where it is positive: ``{"Logit Difference": ..., "Accuracy": ...}``. Prompts are
    batched right-padded, so each row's logits up to its last token are its own. ``model``: the
    model evaluated; ``batch_size``: prompts per forward; ``tokenizer``: default the model's;
    ``symmetric``: as ``IOIDataset``'s (for the default dataset). None off rank 0 of a model
    split over processes."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    model.blocks.same_random_state()  # the same drawn prompts, shuffled alike, on every rank
    if dataset is None:
        dataset = IOIDataset(tokenizer, num_samples=num_samples, symmetric=symmetric)

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        prompts = [sample["prompt"] for sample in samples]
        return {
            "prompt": torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True),
            "IO": [sample["IO"] for sample in samples],
            "S": [sample["S"] for sample in samples],
            "prompt_length": [p.shape[0] for p in prompts],
        }

    total_correct, total_logit_diff = 0, 0.0
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)):
        logits = model(batch["prompt"].to(model.device), return_type="logits")
        if logits is None:  # another rank of a split model gets the logits
            continue
        for i in range(logits.shape[0]):
            io, s = batch["IO"][i], batch["S"][i]
            prefix_length = batch["prompt_length"][i] - io.shape[0]
            n = min(io.shape[0], s.shape[0])
            differ = torch.where(io[:n] != s[:n])[0]
            if len(differ) == 0:
                raise ValueError(f"sample {i} of a batch: IO and S tokenize alike ({io.tolist()}), no answer to score")
            start = int(differ[0])
            row = logits[i, prefix_length + start - 1]
            logit_diff = row[io[start]] - row[s[start]]
            total_correct += int(logit_diff > 0)
            total_logit_diff += logit_diff.item()
    if not model.blocks.gets_output:
        return None
    return {"Logit Difference": total_logit_diff / len(dataset), "Accuracy": total_correct / len(dataset)}


# All 57 subjects of the MMLU benchmark (Hendrycks et al. 2021), as TransformerLens lists them.
MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
]  # fmt: skip
MMLU_ANSWER_LETTERS = ["A", "B", "C", "D"]


def make_mmlu_data_loader(
    subjects: str | list[str] | None = None,
    split: str = "test",
    num_samples: int | None = None,
    dataset: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """TransformerLens's ``make_mmlu_data_loader`` on local data: ``dataset`` maps each subject
    to its rows of the split (``{"question", "choices", "answer"}``, as in ``cais/mmlu``, e.g.
    ``datasets.load_from_disk``), which TransformerLens downloads instead. Returns the rows with
    their ``"subject"``, at most ``num_samples`` per subject. ``subjects``: one name, a list,
    or None for every subject in ``dataset``; each must be one of ``MMLU_SUBJECTS``.
    ``split`` is accepted for TransformerLens's signature (pass that split's rows)."""
    wanted = [subjects] if isinstance(subjects, str) else list(subjects) if subjects is not None else None
    invalid = set(wanted or ()) - set(MMLU_SUBJECTS)
    if invalid:
        raise ValueError(f"Invalid subject(s): {sorted(invalid)}. Valid subjects: {', '.join(sorted(MMLU_SUBJECTS))}")
    if dataset is None:
        raise ValueError(
            "make_mmlu_data_loader needs MMLU's rows as dataset={subject: rows}: TransformerLens downloads "
            "cais/mmlu from the hub, which this library never does"
        )
    wanted = wanted if wanted is not None else [s for s in dataset if s in MMLU_SUBJECTS]
    absent = [s for s in wanted if s not in dataset]
    if absent:
        raise ValueError(f"dataset has no rows for the subject(s) {absent}; it has {sorted(dataset)}")
    rows = []
    for subject in wanted:
        data = dataset[subject]
        for i in range(len(data) if num_samples is None else min(num_samples, len(data))):
            row = data[i]
            rows.append(
                {"question": row["question"], "choices": row["choices"], "answer": row["answer"], "subject": subject}
            )
    return rows


@torch.no_grad()
def mmlu_eval(
    model: HookedModel,
    tokenizer: Any = None,
    subjects: str | list[str] | None = None,
    split: str = "test",
    num_samples: int | None = None,
    dataset: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any] | None:
    """TransformerLens's zero-shot ``mmlu_eval`` on local data (``dataset`` as for
    ``make_mmlu_data_loader``): each question is shown with its four choices and
    ``"Answer:"``, and the answer is the letter (" A" ... " D") with the highest
    log-probability next. Returns ``{"accuracy", "num_correct", "num_total",
    "subject_scores"}``. ``model``: the model evaluated; ``tokenizer``: default the model's;
    ``subjects``: a subject or a list (default: every subject in ``dataset``); ``split``: the
    split named to ``make_mmlu_data_loader``; ``num_samples``: at most this many questions per
    subject (None: all). None off rank 0 of a model split over processes."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    rows = make_mmlu_data_loader(subjects=subjects, split=split, num_samples=num_samples, dataset=dataset)
    if not rows:
        raise ValueError("No MMLU data loaded. Check your subjects parameter.")
    letters = []
    for letter in MMLU_ANSWER_LETTERS:
        ids = tokenizer.encode(" " + letter, add_special_tokens=False)
        letters.append(ids[0] if len(ids) == 1 else tokenizer.encode(letter, add_special_tokens=False)[0])
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for row in tqdm(rows):
        prompt = f"Question: {row['question']}\nChoices:\n"
        prompt += "".join(f"{chr(65 + i)}. {choice}\n" for i, choice in enumerate(row["choices"]))
        prompt += "Answer:"
        tokens = tokenizer.encode(prompt, return_tensors="pt").to(model.device)
        logits = model(tokens, return_type="logits")
        if logits is None:  # another rank of a split model gets the logits
            continue
        log_probs = logits[0, -1].log_softmax(-1)
        scores = [log_probs[letters[i]].item() for i in range(len(row["choices"]))]
        subject = row["subject"]
        correct[subject] = correct.get(subject, 0) + int(scores.index(max(scores)) == row["answer"])
        total[subject] = total.get(subject, 0) + 1
    if not model.blocks.gets_output:
        return None
    num_correct, num_total = sum(correct.values()), sum(total.values())
    return {
        "accuracy": num_correct / num_total,
        "num_correct": num_correct,
        "num_total": num_total,
        "subject_scores": {subject: correct[subject] / total[subject] for subject in total},
    }
