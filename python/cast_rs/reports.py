"""Plain-text tables for reports (readable in a terminal, a log and a notebook)."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4f}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return str(v)


def format_table(headers: Sequence[str], rows: List[Sequence[Any]], title: str = "") -> str:
    """Left-aligned text columns, numbers right-aligned, a rule under the header."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


class Table(list):
    """A list of rows that prints as a table."""

    headers: Tuple[str, ...] = ()
    title: str = ""

    def _rows(self) -> List[Sequence[Any]]:  # pragma: no cover - overridden
        return []

    def __str__(self) -> str:
        if not self:
            return f"{self.title}: none"
        return format_table(self.headers, self._rows(), title=self.title)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython / Jupyter
        p.text(str(self))
