"""The sweep command's result files name their axes and label every index (JSON and CSV)."""

import csv
import json

import torch

from transformer_hooks.cli.sweep import axis_names, write_labelled


def test_axis_names_are_the_sweeps_own():
    assert axis_names("resid_pre", False, 2) == ["layer", "pos"]
    assert axis_names("attn_head_out_all_pos", False, 2) == ["layer", "head"]
    assert axis_names("attn_head_out_by_pos", True, 3) == ["layer", "pos", "head"]
    assert axis_names("no_such_site", False, 2) == ["dim0", "dim1"]


def test_json_and_csv_are_labelled(tmp_path):
    results = [torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, 1.0]])]
    pairs = [{"clean": "a b", "corrupt": "a c", "answer": " x", "contrast": " y"}]
    labels = [{"layer": ["L0", "L1"], "pos": ["0:'<bos>'", "1:'a'", "2:' b'"]}]
    meta = {"metric": "logits[:, -1, answer] - logits[:, -1, contrast]", "complete": True}
    out = json.loads(write_labelled(tmp_path / "r.json", results, pairs, labels, ["layer", "pos"], meta).read_text())
    assert out["axes"] == ["layer", "pos"] and out["results"] == [results[0].tolist()]
    assert out["pairs"][0]["labels"]["pos"][2] == "2:' b'" and out["pairs"][0]["clean"] == "a b"
    rows = list(
        csv.DictReader(write_labelled(tmp_path / "r.csv", results, pairs, labels, ["layer", "pos"], meta).open())
    )
    assert len(rows) == 6
    assert rows[2] == {
        "pair": "0",
        "layer": "0",
        "pos": "2",
        "layer_label": "L0",
        "pos_label": "2:' b'",
        "value": "2.0",
    }
    assert not list(tmp_path.glob("*.partial"))
