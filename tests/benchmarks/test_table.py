"""benchmarks/_table.py: the cells, tables and figures every benchmark script prints."""

from __future__ import annotations

import math

from benchmarks._table import Col, fmt, lookup, pct, records_table, save_figure, sci, table


def test_cells_format_floats_and_show_missing_values_as_a_dash():
    assert fmt(1234.5678) == "1,234.57"
    assert fmt(1234.5678, 0) == "1,235"
    assert fmt(7) == "7" and fmt("a / b") == "a / b"
    assert fmt(None) == fmt(math.nan) == "-"
    assert pct(0.825) == "82%" and pct(None) == "-"
    assert sci(3.2e-15) == "3e-15" and sci(None) == "-"


def test_lookup_follows_dotted_keys_and_stops_at_a_missing_level():
    rec = {"memory": {"jvm_peak_mib": 512.0}, "ml_memory": None}
    assert lookup(rec, "memory.jvm_peak_mib") == 512.0
    assert lookup(rec, "ml_memory.jvm_peak_mib") is None
    assert lookup(rec, "absent.x") is None


def test_records_table_is_the_table_of_its_columns():
    records = [
        {"name": "a", "s": 1.0, "mem": {"mib": 100.4}, "share": 0.5},
        {"name": "bb", "s": 12345.678, "mem": None, "share": 0.25},
    ]
    cols = [
        Col("data", "name"),
        Col("seconds", "s"),
        Col("MiB", "mem.mib", digits=0),
        Col("others", lambda r: pct(r["share"])),
    ]
    got = records_table(cols, records, title="two runs")
    assert got.splitlines() == [
        "two runs",
        "| data | seconds   | MiB | others |",
        "| ---- | --------- | --- | ------ |",
        "|    a |      1.00 | 100 |    50% |",
        "|   bb | 12,345.68 |   - |    25% |",
    ]
    # the same table written row by row
    rows = [["a", 1.0, "100", "50%"], ["bb", 12345.678, None, "25%"]]
    assert got.split("\n", 1)[1] == table(["data", "seconds", "MiB", "others"], rows)


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    from benchmarks._table import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    path = tmp_path / "fig.png"
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
