"""The command line on tiny random checkpoints with a tiny tokenizer: the printed numbers
are the Python API's, the PNGs are valid images, parity fails when the weights differ,
and bad input gives a one-line error (exit code 2) instead of a traceback."""

import re
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from checkpoints import VOCAB, save_checkpoint
from tokenizers_util import add_tokenizer

from transformer_hooks import HookedTransformer
from transformer_hooks.cli import main

PROMPT = "The capital of France is"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> HF checkpoint directory with a tokenizer (own directory: the shared
    checkpoints stay tokenizer-free)."""
    root = tmp_path_factory.mktemp("cli_checkpoints")
    made = {}

    def get(name):
        if name not in made:
            path, _ = save_checkpoint(name, root)
            made[name] = str(add_tokenizer(path, VOCAB))
        return made[name]

    return get


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # something is drawn


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_dla_prints_what_the_python_api_computes(checkpoint, capsys, tmp_path, name):
    path = checkpoint(name)
    code, out, err = run_cli(
        capsys,
        "dla",
        "--prompt",
        PROMPT,
        "--answer",
        " Paris",
        "--contrast",
        " London",
        "--model",
        path,
        "--out",
        str(tmp_path),
        "--top",
        "5",
    )
    assert code == 0, err
    assert_png(tmp_path / "dla.png")

    model = HookedTransformer.from_pretrained(path)  # the CLI's default processing
    a, b = model.to_single_token(" Paris"), model.to_single_token(" London")
    with torch.no_grad():
        logits, cache = model.run_with_cache(PROMPT)
        direction = model.W_U[:, a] - model.W_U[:, b]
        heads = cache.stack_head_results(-1, pos_slice=-1, apply_ln=True)[:, 0] @ direction
        layers, labels = cache.decompose_resid(-1, pos_slice=-1, apply_ln=True, return_labels=True)
        layers = layers[:, 0] @ direction
    logit_diff = float(logits[0, -1, a] - logits[0, -1, b])
    printed = float(re.search(r"^logit difference = (-?\d+\.\d+)$", out, re.M).group(1))
    assert abs(printed - logit_diff) < 1e-4

    n_heads = model.cfg.n_heads
    rows = re.findall(r"^\s*(\d+)\s+L(\d+)H(\d+)\s+([+-]\d+\.\d+)$", out, re.M)
    assert len(rows) == 5
    for _rank, layer, head, value in rows:
        assert abs(float(value) - float(heads[int(layer) * n_heads + int(head)])) < 1e-4
    top = heads.abs().argmax()
    assert (int(rows[0][1]), int(rows[0][2])) == (top // n_heads, top % n_heads)  # ranked by |contribution|

    rows = re.findall(r"^\s*\d+\s+(\d+)\s+([+-]\d+\.\d+)\s+([+-]\d+\.\d+)\s+([+-]\d+\.\d+)$", out, re.M)
    assert len(rows) == model.cfg.n_layers
    for layer, attn, mlp, _total in rows:
        assert abs(float(attn) - float(layers[labels.index(f"{layer}_attn_out")])) < 1e-4
        assert abs(float(mlp) - float(layers[labels.index(f"{layer}_mlp_out")])) < 1e-4
    parts_sum = float(re.search(r"\(sum (-?\d+\.\d+)\)", out).group(1))
    assert abs(parts_sum - logit_diff) < 1e-4  # the parts add up to the logit difference


def test_logit_lens_prints_the_model_prediction_last(checkpoint, capsys, tmp_path):
    path = checkpoint("llama-gqa")
    code, out, err = run_cli(
        capsys, "logit-lens", "--prompt", PROMPT, "--pos", "-2", "--model", path, "--out", str(tmp_path)
    )
    assert code == 0, err
    assert_png(tmp_path / "logit_lens.png")

    model = HookedTransformer.from_pretrained(path)
    with torch.no_grad():
        probs = model(PROMPT)[0, -2].softmax(-1)
    n = model.cfg.n_layers
    last = re.search(rf"^\s*{n - 1}\s+(.*)$", out, re.M).group(1)  # the last layer's row
    first_token, first_prob = re.match(r"('(?:[^'\\]|\\.)*'|\"[^\"]*\") (\d\.\d\d)", last).groups()
    top = int(probs.argmax())
    assert first_token == repr(model.to_string([top]))
    assert abs(float(first_prob) - float(probs[top])) <= 0.005
    assert "position 4" in out  # --pos -2 of BOS + 5 tokens


def test_parity_passes_and_fails_with_a_per_layer_report(checkpoint, capsys, monkeypatch):
    path = checkpoint("llama-gqa")
    code, out, _ = run_cli(capsys, "parity", "--model", path)
    assert code == 0
    assert all(f"resid_pre {L}" in out for L in range(2)) and "logits" in out and "FAIL" not in out

    load = HookedTransformer.from_pretrained_no_processing

    def perturbed(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.blocks[1].mlp.W_out.add_(1e-2)  # after layer 1's input: only the output differs
        return model

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", perturbed)
    code, out, _ = run_cli(capsys, "parity", "--model", path, "--tol", "1e-4")
    assert code == 1
    status = dict(re.findall(r"^(resid_pre \d|final norm|logits)\s.*\s(ok|FAIL)$", out, re.M))
    assert status == {"resid_pre 0": "ok", "resid_pre 1": "ok", "final norm": "FAIL", "logits": "FAIL"}
    assert "first: final norm" in out


def test_entry_point_runs_dla_end_to_end(checkpoint, tmp_path):
    """``python -m transformer_hooks``, as the README runs it, in a fresh process."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="transformer-hooks")
    assert script.load() is main
    path = checkpoint("pythia")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer_hooks",
            "dla",
            "--prompt",
            PROMPT,
            "--answer",
            " Rome",
            "--contrast",
            " Madrid",
            "--model",
            path,
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "logit difference =" in proc.stdout and re.search(r"^Top 8 heads", proc.stdout, re.M)  # 2 layers x 4
    assert_png(tmp_path / "out" / "dla.png")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["dla", "--prompt", "", "--answer", " Paris", "--contrast", " London"], "empty prompt"),
        (["logit-lens", "--prompt", ""], "empty prompt"),
        (
            ["dla", "--prompt", PROMPT, "--answer", " Paris London", "--contrast", " Rome"],
            r"' Paris London' is not a single token: it tokenizes as \[' Paris', ' London'\]",
        ),
        (["dla", "--prompt", PROMPT, "--answer", " Paris", "--contrast", " Paris"], "the same token"),
        (
            ["dla", "--prompt", PROMPT, "--answer", " Paris", "--contrast", " London", "--pos", "9"],
            r"--pos 9 is out of range for a prompt of 6 tokens \(valid: -6..5\)",
        ),
        (["logit-lens", "--prompt", PROMPT, "--model", "no-such-model-xyz"], "no-such-model-xyz"),
    ],
)
def test_bad_input_is_one_clear_line(checkpoint, capsys, argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", checkpoint("llama-gqa")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err
