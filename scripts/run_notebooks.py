"""Execute the notebooks in place, so each is committed with its outputs (plots and tables
visible on GitHub): ``python scripts/run_notebooks.py [notebooks/x.ipynb ...]`` (default: all).

Runs with ``CI=1``, so no progress bar ends up in a saved output, and with the repository
first on ``PYTHONPATH`` (the notebooks import this checkout). Two at a time.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT = 900


def run(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "CI": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=env)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return path.name


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in pool.map(run, paths):
            print(f"executed {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
