"""Every notebook in notebooks/ runs top to bottom on the embedded model without an error,
checks the results its text states (its "# Checked:" cells assert them), and is committed
with its outputs (plots and tables visible on GitHub; `python scripts/run_notebooks.py`
writes them), in which no progress bar or terminal escape code appears.

The notebooks are picked up by glob, so a new one is tested without touching this file.
Each runs in its own python3 kernel (nbclient); two run at a time, since most of a
notebook's time is loading the model, which is largely single-threaded.
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds for one cell
PARALLEL = 2
EXPECTED = {
    "activation_patching",
    "direct_logit_attribution",
    "logit_lens",
    "steering",
    "das",
    "sae_splicing",
    "ioi_circuit",
}


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # One thread per kernel while PARALLEL kernels share the cores: oversubscribed torch
    # threads spin against each other.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // PARALLEL))}
    # Our own event loop, closed afterwards: the one nbclient would make for this worker
    # thread is left open, and its sockets surface later as ResourceWarnings in other tests.
    loop = asyncio.new_event_loop()
    try:  # raises CellExecutionError naming the failing cell and its traceback
        loop.run_until_complete(client.async_execute(env=env))
    finally:
        loop.close()


@pytest.fixture(scope="module")
def runs(request) -> dict[Path, Future]:
    """Start every selected notebook at once (PARALLEL at a time); each test waits for its own."""
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_notebook_runs"
    ]
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    futures = {path: pool.submit(execute, path) for path in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_the_seed_notebooks_are_there():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, f"missing notebooks: {EXPECTED - {p.stem for p in NOTEBOOKS}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_checks_what_its_text_claims(path):
    """Each notebook states results in its text ("layer 23 is the country layer", "the parts add up
    to the model's logit difference"); a "# Checked:" cell after the computation asserts each one,
    so the run below fails when the text stops being true."""
    nb = nbformat.read(path, as_version=4)
    checks = [
        c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Checked:") and "assert" in c.source
    ]
    assert checks, f"{path.name}: add a cell starting '# Checked:' that asserts the results its text states"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    fix = f"run `python scripts/run_notebooks.py notebooks/{path.name}` and commit the result"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: not executed top to bottom in one run; {fix}"
    )
    outputs = [o for c in code for o in c.outputs]
    assert outputs, f"{path.name}: committed without outputs; {fix}"
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output; {fix}"
    if any("plt." in c.source or "plot_" in c.source for c in code):
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: its plots are not saved; {fix}"
    for o in outputs:
        text = o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
        assert "\x1b[" not in text and "\r" not in text, f"{path.name}: escape codes in an output: {text[:200]!r}"
        assert not re.search(r"\d+%\|", text), f"{path.name}: a progress bar in an output: {text[:200]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(runs, path):
    runs[path].result()
