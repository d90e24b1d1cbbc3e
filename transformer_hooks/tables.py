"""Plain-text tables, as the command line prints them: one header row, a rule, and
columns padded to their widest cell (numbers right-aligned, text left-aligned)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The table's lines: ``headers``, a rule of dashes, then one line per row of ``rows``
    (strings); columns padded to align, numeric columns to the right.
    """
    columns = list(zip(headers, *rows, strict=True))
    widths = [max(map(len, col)) for col in columns]
    numeric = [bool(rows) and all(_numeric(c) for c in col[1:]) for col in columns]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def short_repr(token: str, width: int = 12) -> str:
    """``repr(token)``, cut to ``width`` characters with an ellipsis."""
    text = repr(token)
    return text if len(text) <= width else text[: width - 2] + "…'"


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False
