"""ARCHITECTURE.md as data: parts, modules, allowed upward imports; and the README's copy.

``tests/test_structure.py`` checks every import against what this reads. The README's "Where
things are" section is ``readme_section()``; after editing ARCHITECTURE.md run

    python scripts/architecture.py --write

to rewrite it (``python scripts/architecture.py`` prints it).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
README = ROOT / "README.md"
README_HEADING = "## Where things are"


@dataclass(frozen=True)
class Part:
    name: str
    imports: tuple[str, ...]  # the parts it imports directly
    purpose: str


@dataclass(frozen=True)
class Row:
    path: str  # a file (``transformer_hooks/cache.py``) or a package (``transformer_hooks/sae/``)
    part: str
    purpose: str

    def covers(self, path: str) -> bool:
        return path.startswith(self.path) if self.path.endswith("/") else path == self.path


@dataclass(frozen=True)
class Edge:
    source: str  # a file or package path, as in Row
    target: str
    note: str

    def matches(self, source: str, target: str) -> bool:
        return Row(self.source, "", "").covers(source) and Row(self.target, "", "").covers(target)


def _tables(text: str) -> dict[str, list[list[str]]]:
    """The rows (below the header and rule) of the first table under each ``## `` heading."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif heading and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = tables.setdefault(heading, [])
            rows.append(cells)
    # drop each table's header and |---| rule
    return {h: [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)] for h, rows in tables.items()}


def _code(cell: str) -> str:
    return cell.strip("`")


@dataclass(frozen=True)
class Architecture:
    parts: tuple[Part, ...]
    rows: tuple[Row, ...]
    upward: tuple[Edge, ...]
    pending: tuple[Edge, ...]

    @cached_property
    def order(self) -> dict[str, int]:
        return {p.name: i for i, p in enumerate(self.parts)}

    @cached_property
    def reachable(self) -> dict[str, frozenset[str]]:
        """Each part's importable parts: itself and what its imports import, transitively."""
        direct = {p.name: set(p.imports) for p in self.parts}
        out = {}
        for name in direct:
            seen, todo = {name}, [name]
            while todo:
                for nxt in direct[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            out[name] = frozenset(seen)
        return out

    def row_of(self, path: str) -> Row | None:
        """The most specific row covering a file: its own, else its innermost package's."""
        matches = [r for r in self.rows if r.covers(path)]
        return max(matches, key=lambda r: len(r.path)) if matches else None

    def part_of(self, path: str) -> str | None:
        row = self.row_of(path)
        return row.part if row else None


def read(path: Path = ARCHITECTURE) -> Architecture:
    tables = _tables(path.read_text())
    parts = tuple(
        Part(name, tuple(p.strip() for p in imports.split(",") if p.strip()), purpose)
        for name, imports, purpose in tables["Parts"]
    )
    rows = tuple(Row(_code(m), part, purpose) for m, part, purpose in tables["Modules"])
    upward = tuple(Edge(_code(a), _code(b), note) for a, b, note in tables["Upward imports"])
    pending = tuple(Edge(_code(a), _code(b), note) for a, b, note in tables.get("Pending", []))
    return Architecture(parts, rows, upward, pending)


def readme_section(arch: Architecture | None = None) -> str:
    """The README's "Where things are": each part, lowest first, and its modules."""
    arch = arch or read()
    lines = [
        README_HEADING,
        "",
        "Generated from [ARCHITECTURE.md](ARCHITECTURE.md) (`python scripts/architecture.py --write`), the",
        "one map: parts lowest first; a module imports only its own part and those below.",
        "",
    ]
    for part in arch.parts:
        lines.append(f"- **{part.name}**: {part.purpose}.")
        for row in arch.rows:
            if row.part == part.name:
                lines.append(f"  - `{row.path}`: {row.purpose}.")
    return "\n".join(lines) + "\n"


def readme_copy(readme: str) -> str:
    """The README's current "Where things are" section, up to the next ``## `` heading."""
    start = readme.find(README_HEADING + "\n")
    if start < 0:
        return ""
    end = readme.find("\n## ", start + len(README_HEADING))
    return readme[start : end + 1 if end >= 0 else len(readme)]


def write_readme() -> None:
    readme = README.read_text()
    old = readme_copy(readme)
    if old:
        readme = readme.replace(old, readme_section() + "\n")
    else:  # a new section, before the first one after the introduction
        first = re.search(r"^## ", readme, re.M)
        at = first.start() if first else len(readme)
        readme = readme[:at] + readme_section() + "\n" + readme[at:]
    README.write_text(readme)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's section in place")
    if parser.parse_args().write:
        write_readme()
    else:
        print(readme_section(), end="")
