"""stages.storage.fs: the local and the Hadoop filesystem answer alike on the same files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.storage.fs import HadoopFileSystem, LocalFileSystem, filesystem, local_path
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A Parquet folder as Spark writes one (two parts, _SUCCESS, .crc) and a text file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("fs")
    table = root / "table"
    table.mkdir()
    schema = pa.schema(
        [("path", pa.string()), ("pca", pa.list_(pa.float64())), ("error", pa.string())]
    )
    parts = [
        {"path": ["a", "b"], "pca": [[1.0, 2.0, 3.0], None], "error": [None, "cannot decode"]},
        {"path": ["c"], "pca": [[4.0, 5.0, 6.0]], "error": [None]},
    ]
    for i, part in enumerate(parts):
        pq.write_table(pa.table(part, schema=schema), table / f"part-{i:05d}.parquet")
    (table / "_SUCCESS").write_bytes(b"")
    (table / ".part-00000.parquet.crc").write_bytes(b"crc")
    (root / "note é.txt").write_text("héllo\n", encoding="utf-8")
    return root


# The Hadoop case is marked jvm by hand: conftest sees only fixtures named in signatures.
@pytest.fixture(params=["local", pytest.param("hadoop", marks=pytest.mark.jvm)])
def fs(request):
    if request.param == "local":
        return LocalFileSystem()
    return HadoopFileSystem(request.getfixturevalue("spark"))


def test_filesystem_picks_by_session():
    assert isinstance(filesystem(), LocalFileSystem)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/a/b c/1.jpg", "/a/b c/1.jpg"),
        ("rel/x", "rel/x"),
        ("C:/x", "C:/x"),
        ("file:/a/b", "/a/b"),
        ("file:///a/b", "/a/b"),
        ("file://localhost/a/b", "/a/b"),
        ("s3://bucket/k", None),
        ("hdfs://nn/x", None),
    ],
)
def test_local_path(uri, expected):
    assert local_path(uri) == expected


def test_read_and_exists(fs, tree):
    text = tree / "note é.txt"
    assert fs.exists(str(tree / "table")) and fs.exists(str(text))
    assert not fs.exists(str(tree / "missing"))
    assert fs.read_text(str(text)) == "héllo\n"
    assert fs.read_bytes(f"file:{text}") == "héllo\n".encode()
    with pytest.raises(OSError, match=r"missing"):
        fs.read_bytes(str(tree / "missing"))


def test_list_files_leaves_out_markers(fs, tree):
    files = fs.list_files(str(tree / "table"), ".parquet")
    names = sorted(os.path.basename(local_path(u) or u) for u, _ in files)
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    sizes = {os.path.basename(local_path(u) or u): n for u, n in files}
    assert sizes["part-00001.parquet"] == (tree / "table" / "part-00001.parquet").stat().st_size


def test_read_parquet_columns_rows_and_list_head(fs, tree):
    uri = str(tree / "table")
    t = fs.read_parquet(uri, ["path", "pca"])
    assert t.column_names == ["path", "pca"]
    assert sorted(t.column("path").to_pylist()) == ["a", "b", "c"]
    head = fs.read_parquet(uri, ["path", "pca"], list_head=("pca", 2))
    got = dict(zip(head.column("path").to_pylist(), head.column("pca").to_pylist()))
    assert got == {"a": [1.0, 2.0], "b": None, "c": [4.0, 5.0]}
    bad = fs.read_parquet(uri, ["path", "error"], where_valid="error")
    assert bad.to_pylist() == [{"path": "b", "error": "cannot decode"}]


def test_write_bytes_replaces_and_leaves_no_temp(fs, tree, tmp_path):
    target = tmp_path / "sub" / "page.html"
    fs.write_bytes(str(target), b"old")
    fs.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "page.html"]
    assert not [n for n in leftovers if not n.endswith(".crc")]  # Hadoop keeps a checksum


def test_local_refuses_remote_uris(tmp_path):
    fs = LocalFileSystem()
    assert not fs.exists("s3://bucket/x")
    with pytest.raises(OSError, match=r"s3://bucket/x is not a local path"):
        fs.read_bytes("s3://bucket/x")
    with pytest.raises(OSError, match=r"is not a regular file"):
        fs.read_bytes(str(tmp_path))


def test_local_filesystem_never_imports_pyspark(tree):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from stages.storage.fs import filesystem\n"
        f"t = filesystem().read_parquet({str(tree / 'table')!r}, ['path'], where_valid='error')\n"
        "print(t.num_rows, 'pyspark' in sys.modules, 'py4j' in sys.modules)\n"
    )
    root = ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1", "False", "False"]
