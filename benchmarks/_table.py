"""Tables and figures of the benchmark scripts: one cell format, one table, one figure saver.

A table is a list of :class:`Col` (a header beside the value it shows) applied to a list of
records (the dicts a benchmark keeps in its results JSON)::

    show_tables([records_table([Col("images", "images"), Col("img/s", "img_s")], rows)])

prints a Markdown pipe table (it reads well in a terminal and pastes into the README as is):
floats with two decimals and thousands separators, a missing value (``None``, NaN, absent
key) as ``-``, ready-made strings as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

__all__ = [
    "Col",
    "fmt",
    "lookup",
    "pct",
    "show_tables",
    "pyplot",
    "records_table",
    "save_figure",
    "sci",
    "table",
]


def fmt(x: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None and NaN as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        return f"{x:,.{digits}f}"
    return str(x)


def pct(x: Optional[float]) -> str:
    """A share as a whole percentage (``0.5`` -> ``50%``); None as ``-``."""
    return "-" if x is None else f"{x:.0%}"


def sci(x: Optional[float], digits: int = 0) -> str:
    """A relative error in scientific notation (``3e-15``); None as ``-``."""
    return "-" if x is None else f"{x:.{digits}e}"


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """``record["a"]["b"]`` for ``path`` ``"a.b"``; None where any level is missing or None."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


@dataclass(frozen=True)
class Col:
    """One column: its header and what it shows of a record.

    ``value`` is a key of the record (dotted for nested dicts: ``"memory.jvm_peak_mib"``)
    or a function of the record; ``digits`` overrides the table's decimals for floats.
    """

    header: str
    value: Union[str, Callable[[Mapping[str, Any]], Any]]
    digits: Optional[int] = None

    def cell(self, record: Mapping[str, Any], digits: int) -> str:
        """The formatted cell of ``record``."""
        v = lookup(record, self.value) if isinstance(self.value, str) else self.value(record)
        return fmt(v, digits if self.digits is None else self.digits)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A Markdown pipe table of ``rows`` (cells through :func:`fmt`), numbers right-aligned."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def records_table(
    cols: Sequence[Col],
    records: Iterable[Mapping[str, Any]],
    digits: int = 2,
    title: Optional[str] = None,
) -> str:
    """:func:`table` of one row per record, one column per :class:`Col`; ``title`` above it."""
    rows = [[c.cell(r, digits) for c in cols] for r in records]
    out = table([c.header for c in cols], rows, digits)
    return f"{title}\n{out}" if title else out


def show_tables(tables: Iterable[str]) -> None:
    """Print each table followed by a blank line."""
    for t in tables:
        print(t + "\n")


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close ``fig`` (an open figure keeps its memory until closed)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
