"""Run TransformerLens 3.9.0's own tests against transformer_hooks (issue 28).

    python tests/tl_suite/run.py             # the CI job: fails on a regression or an unexpected pass
    python tests/tl_suite/run.py --report    # also list every failure with its first error line

What runs: the tests of TransformerLens's names this library ports (``FILES``), from its PyPI
source package (fetched once with ``pip download`` into ``$TL_SUITE_CACHE``, default
``~/.cache/transformer_hooks/tl_suite``, and checked against its sha256), offline
(``HF_HUB_OFFLINE=1``), with ``import transformer_lens`` resolved to ``shim/transformer_lens``:
aliases of transformer_hooks's modules, not a TransformerLens install. A test module that imports
a TransformerLens internal at module level beside public names gets a placeholder for it from the
shim (``PRIVATE`` there; never in the library) that fails when used, so its public tests run.

Which tests count: ``selected.txt``, the tests of ``FILES`` that pass offline with TransformerLens
3.9.0 itself (the others need the hub or an optional dependency: no library could pass them
here). It is written by ``--record-selection PYTHON``, PYTHON being an interpreter with the real
``transformer-lens==3.9.0`` installed (a separate venv; never this library's environment).

Expected failures: ``expected_failures.txt``, one ``node id  # reason`` a line, where the reason
is one of ``REASONS``. They run as strict xfails: an expected failure that passes fails the run
(take it off the list), and a failure not on the list fails the run (a regression). The tests of
a module that still fails to import count as failures, each on the list (the run says how many).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VERSION = "3.9.0"
SDIST = f"transformer_lens-{VERSION}.tar.gz"
SHA256 = "671f01075af1107e804591424887432e27065b65f09825b5dc4dfc58deb338c3"
# TransformerLens's test files import these (not this library's dependencies): installed with pip
# into the cache, after everything else on the path, so they never shadow this library's packages.
TEST_DEPS = ["fancy-einsum", "pandas", "python-dateutil", "pytz", "tzdata", "six", "typeguard"]
SELECTED = HERE / "selected.txt"
EXPECTED = HERE / "expected_failures.txt"

# The reasons a test may be expected to fail here; each names why no fix in this library is due.
REASONS = {
    "private": "tests TransformerLens's private internals (its components, their attributes, its module layout)",
    "deprecation": "tests TransformerLens's deprecation warnings or legacy aliases",
    "hub": "downloads from the Hugging Face hub beyond what TransformerLens reads from a local cache",
    "refused": "uses a TransformerLens setting this library refuses by name (see the README's porting section)",
    "differs": "a documented difference (see the README's porting section)",
    "missing": "a TransformerLens name or behaviour not ported yet (open work of issue 28)",
}

# TransformerLens's tests of the names this library ports: HookedTransformer, HookedTransformerConfig,
# ActivationCache, hook_points, utils/utilities, FactoredMatrix, evals, loading_from_pretrained, patching.
FILES = [
    "tests/acceptance/test_activation_cache.py",
    "tests/acceptance/test_evals.py",
    "tests/acceptance/test_hook_tokens.py",
    "tests/acceptance/test_hooked_transformer.py",
    "tests/acceptance/test_tokenizer_special_tokens.py",
    "tests/acceptance/test_generate_batch.py",
    "tests/integration/test_attention_mask.py",
    "tests/integration/test_cache_hook_names.py",
    "tests/integration/test_cache_pos_slice.py",
    "tests/integration/test_cross_entropy_loss.py",
    "tests/integration/test_d_vocab.py",
    "tests/integration/test_grouped_query_attention.py",
    "tests/integration/test_hooks.py",
    "tests/integration/test_kv_cache.py",
    "tests/integration/test_left_padding.py",
    "tests/integration/test_loading_from_pretrained.py",
    "tests/integration/test_main_demo_pattern_hooks.py",
    "tests/integration/test_match_huggingface.py",
    "tests/integration/test_only_tokenizer.py",
    "tests/integration/test_prepend_bos.py",
    "tests/integration/test_start_at_layer.py",
    "tests/integration/test_stop_at_layer.py",
    "tests/integration/test_tokenization_methods.py",
    "tests/integration/test_utils_tokens.py",
    "tests/unit/factored_matrix",
    "tests/unit/test_activation_cache.py",
    "tests/unit/test_activation_cache_batch_dim.py",
    "tests/unit/test_evals_ioi.py",
    "tests/unit/test_generate_no_tokenizer.py",
    "tests/unit/test_hook_introspection.py",
    "tests/unit/test_hook_points.py",
    "tests/unit/test_hooked_root_module.py",
    "tests/unit/test_hooked_transformer_config.py",
    "tests/unit/test_loading_from_pretrained_utilities.py",
    "tests/unit/test_n_params_total.py",
    "tests/unit/test_patching.py",
    "tests/unit/test_split_qkv.py",
    "tests/unit/test_use_attn_result.py",
    "tests/unit/test_utils.py",
    "tests/unit/utilities/test_tokenize_utils.py",
    "tests/unit/components/test_transformer_block_olmo_post_norm.py",
]

# Appended to TransformerLens's tests/conftest.py: keep the selected tests, mark the expected failures.
CONFTEST_TAIL = """

# --- added by transformer_hooks's tests/tl_suite/run.py ---
def _tl_suite_lines(var):
    path = os.environ.get(var)
    if not path:
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        node, _, reason = line.partition("  # ")
        if node.strip() and not node.startswith("#"):
            out[node.strip()] = reason.strip()
    return out


def pytest_collection_modifyitems(config, items):
    selected = _tl_suite_lines("TL_SUITE_SELECTED")
    expected = _tl_suite_lines("TL_SUITE_EXPECTED")
    if selected:
        keep = [item for item in items if item.nodeid in selected]
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in selected])
        items[:] = keep
    for item in items:
        if item.nodeid in expected:
            item.add_marker(pytest.mark.xfail(reason=expected[item.nodeid], strict=True, run=True))
"""

INI = """[pytest]
addopts = -p no:cacheprovider
filterwarnings =
    ignore::DeprecationWarning
markers =
    slow: slow tests
    skip_ci: skipped in CI
    multigpu: needs several GPUs
"""


def cache_dir() -> Path:
    return Path(os.environ.get("TL_SUITE_CACHE", Path.home() / ".cache" / "transformer_hooks" / "tl_suite"))


def fetch() -> Path:
    """The unpacked source package (its tests/ and config only), fetched and checked once."""
    cache = cache_dir()
    root = cache / f"transformer_lens-{VERSION}"
    if (root / "READY").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / SDIST
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
            + [f"transformer-lens=={VERSION}", "-d", str(cache)],
            check=True,
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHA256:
        archive.unlink()
        raise SystemExit(f"{archive}: sha256 {digest}, expected {SHA256} (deleted; run again to fetch it anew)")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"transformer_lens-{VERSION}/tests/")]
        tar.extractall(cache, members=members, filter="data")
    conftest = root / "tests" / "conftest.py"
    text = conftest.read_text()
    # Its session fixture imports transformer_lens.utilities.hf_utils (TransformerLens's hub retry
    # policy, not a ported name): made a no-op, so a missing helper does not fail every test.
    retry = "    from transformer_lens.utilities.hf_utils import enable_hf_retry\n\n    enable_hf_retry()\n"
    if retry not in text:
        raise SystemExit(f"{conftest}: its hub-retry fixture changed; update run.py")
    text = text.replace(retry, "    pass\n")
    conftest.write_text(text + CONFTEST_TAIL)
    # typeguard is TransformerLens's dependency, not this library's: without it, its error type is
    # one already in the tuple (the tests assert that bad input is rejected, not by whom).
    errors = root / "tests" / "typecheck_errors.py"
    line = "from typeguard import TypeCheckError as TypeguardTypeCheckError\n"
    if line not in errors.read_text():
        raise SystemExit(f"{errors}: its typeguard import changed; update run.py")
    fallback = "try:\n    " + line + "except ImportError:\n    TypeguardTypeCheckError = JaxtypingTypeCheckError\n"
    errors.write_text(errors.read_text().replace(line, fallback))
    (root / "pytest.ini").write_text(INI)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(cache / "deps"), *TEST_DEPS],
        check=True,
    )
    (root / "READY").write_text(VERSION)
    return root


def run_pytest(root: Path, python: str, shim: bool, extra: list[str], selection: bool = True) -> Path:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TL_SUITE_SELECTED", None)
    env.pop("TL_SUITE_EXPECTED", None)
    if selection:
        env["TL_SUITE_SELECTED"] = str(SELECTED)
        env["TL_SUITE_EXPECTED"] = str(EXPECTED)
    paths = [str(HERE / "shim"), str(REPO)] if shim else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(root), str(root.parent / "deps")])
    xml = root / ("junit-shim.xml" if shim else "junit-tl.xml")
    cmd = [python, "-m", "pytest", "-q", "-c", str(root / "pytest.ini"), "--rootdir", str(root)]
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", "-p", "no:randomly", *extra, *FILES]
    subprocess.run(cmd, cwd=root, env=env)
    return xml


def outcomes(xml: Path) -> dict[str, str]:
    """node id -> passed / failed / xpassed (a strict xfail that passed) / xfailed / skipped,
    from pytest's junit xml."""
    out: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        # classname is "tests.unit.test_x" or "tests.unit.test_x.TestClass"
        for i in range(len(parts), 0, -1):
            path = "/".join(parts[:i]) + ".py"
            if (xml.parent / path).exists():
                node = "::".join([path, *parts[i:], case.get("name", "")])
                break
        else:
            node = f"{module}::{case.get('name')}"
        tags = {child.tag for child in case}
        skipped = case.find("skipped")
        failure = case.find("failure")
        if failure is not None and "XPASS" in (failure.get("message") or ""):
            out[node] = "xpassed"
        elif "failure" in tags or "error" in tags:
            out[node] = "failed"
        elif skipped is not None:
            out[node] = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            out[node] = "passed"
    return out


def read_list(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        node, _, reason = line.partition("  # ")
        if node.strip() and not node.startswith("#"):
            out[node.strip()] = reason.strip()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record-selection", metavar="PYTHON", help="write selected.txt from a run with real TL")
    parser.add_argument("--report", action="store_true", help="list the failures")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (e.g. -k, -x)")
    args = parser.parse_args()
    root = fetch()
    if args.record_selection:
        xml = run_pytest(root, args.record_selection, shim=False, extra=args.pytest_args, selection=False)
        passed = sorted(node for node, outcome in outcomes(xml).items() if outcome == "passed")
        SELECTED.write_text(
            f"# The tests of run.py's FILES that pass offline with transformer-lens=={VERSION} itself.\n"
            + "".join(f"{node}\n" for node in passed)
        )
        print(f"{len(passed)} tests pass with TransformerLens {VERSION}: written to {SELECTED}")
        return 0
    selected, expected = read_list(SELECTED), read_list(EXPECTED)
    bad = {node: reason for node, reason in expected.items() if reason.split(":")[0] not in REASONS}
    if bad:
        print(f"expected_failures.txt: reasons must start with one of {sorted(REASONS)}: {sorted(bad)[:5]}")
        return 1
    missing = sorted(set(expected) - set(selected))
    if missing:
        print(f"expected_failures.txt lists tests that are not selected: {missing[:5]}")
        return 1
    xml = run_pytest(root, sys.executable, shim=True, extra=args.pytest_args)
    result = outcomes(xml)
    ran = {node: outcome for node, outcome in result.items() if node in selected}
    passed = sum(outcome == "passed" for outcome in ran.values())
    unexpected = sorted(node for node, outcome in ran.items() if outcome == "failed")
    now_pass = sorted(node for node, outcome in ran.items() if outcome == "xpassed")
    # a module that fails to import runs none of its tests: fine when they are all expected to fail
    # (they count as failures, each on the list); a test of a public name must not hide there
    not_run = sorted(set(selected) - set(result) - set(expected))
    uncollected = sorted((set(selected) - set(result)) & set(expected))
    by_reason = Counter(reason.split(":")[0] for reason in expected.values())
    print(f"\nTransformerLens {VERSION}'s tests: {passed} of {len(selected)} pass here")
    print("expected failures: " + ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items())))
    if uncollected:
        modules = sorted({node.split("::")[0] for node in uncollected})
        print(f"  of which {len(uncollected)} in modules that fail to import (listed, not run): {', '.join(modules)}")
    if args.report or unexpected:
        for node in unexpected:
            print(f"FAILED (not expected) {node}")
    for node in now_pass:
        print(f"PASSES NOW (take it off expected_failures.txt) {node}")
    if not_run and not args.pytest_args:
        print(f"{len(not_run)} selected tests did not run (renamed or not collected): {not_run[:5]}")
        return 1
    return 1 if unexpected or now_pass else 0


if __name__ == "__main__":
    sys.exit(main())
