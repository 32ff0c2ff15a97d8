from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.errors import StorageError
from pipeline.output.report import safe_cell
from pipeline.output.storage import Storage


def test_write_is_atomic_and_confined(tmp_path: Path) -> None:
    store = Storage(str(tmp_path / "out"))
    uri = store.write("a/b.png", b"data")
    assert Path(uri).read_bytes() == b"data"
    assert not [p for p in (tmp_path / "out" / "a").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(StorageError, match="outside"):
        store.write("../escape.png", b"x")


def test_symlink_inside_root_cannot_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(StorageError, match="outside"):
        Storage(str(root)).write("link/x.png", b"x")
    assert not list(outside.iterdir())


def test_unwritable_root_is_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write"):
        Storage(str(blocker)).write("x.png", b"x")


@pytest.mark.parametrize("cell", ["=1+1", "+SUM(A1)", "-2", "@cmd", "\tx"])
def test_formula_cells_neutralised(cell: str) -> None:
    assert safe_cell(cell).startswith("'")


def test_plain_cells_unchanged() -> None:
    assert safe_cell("SKU-1") == "SKU-1"
    assert safe_cell(None) == ""
