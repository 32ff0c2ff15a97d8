from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ManifestError, RowError
from pipeline.intake.manifest import Defaults, read_manifest
from pipeline.spec import EditSpec
from tests.factories import make_image, write_manifest


def _read(path: Path, **defaults: object) -> list[EditSpec | RowError]:
    return list(read_manifest(path, Defaults(values=defaults)))


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_formats_give_same_specs(tmp_path: Path, suffix: str) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    rows = [
        {"id": "A1", "image": ["a.png", "b.png"], "prompt": "p", "n": 2, "sku_group": "x"},
        {"id": "A2", "image": "a.png", "prompt": "q", "quality": "HIGH", "output_format": "jpg"},
    ]
    specs = _read(write_manifest(tmp_path / f"m{suffix}", rows))
    assert all(isinstance(s, EditSpec) for s in specs)
    first, second = specs
    assert isinstance(first, EditSpec) and isinstance(second, EditSpec)
    assert first.images == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert first.n == 2
    assert first.metadata == {"sku_group": "x"}
    assert second.quality == "high"
    assert second.output_format == "jpeg"
    assert second.ext == "jpg"
    assert first.row == 1 and second.row == 2


def test_csv_with_bom_is_accepted(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbfid,image,prompt\nX,a.png,hello\n")
    (spec,) = _read(path)
    assert isinstance(spec, EditSpec)
    assert spec.key == "X"


def test_csv_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("id,image,prompt\nX,a.png,caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        _read(path)


def test_empty_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("")
    with pytest.raises(ManifestError, match="empty"):
        _read(path)
    only_header = tmp_path / "h.csv"
    only_header.write_text("id,image,prompt\n")
    with pytest.raises(ManifestError, match="no rows"):
        _read(only_header)


def test_missing_required_column_names_field(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"id": "X", "image": "a.png"}])
    (error,) = _read(path)
    assert isinstance(error, RowError)
    assert (error.row, error.field) == (1, "prompt")
    assert "missing required column" in error.reason


def test_defaults_fill_empty_cells_and_prompt_default(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"image": "a.png", "prompt": "p", "size": ""}])
    (spec,) = _read(path, size="1536x1024", quality="low")
    assert isinstance(spec, EditSpec)
    assert spec.size == "1536x1024" and spec.quality == "low"
    assert spec.key is None
    assert spec.output == "row{row}_{index}.{ext}"


def test_bad_number_and_duplicate_id(tmp_path: Path) -> None:
    rows = [
        {"id": "X", "image": "a.png", "prompt": "p", "n": "two"},
        {"id": "Y", "image": "a.png", "prompt": "p"},
        {"id": "Y", "image": "a.png", "prompt": "p"},
    ]
    items = _read(write_manifest(tmp_path / "m.csv", rows))
    errors = [i for i in items if isinstance(i, RowError)]
    assert [(e.row, e.field) for e in errors] == [(1, "n"), (3, "id")]
    assert "first at row 2" in errors[1].reason


def test_jsonl_bad_line_is_row_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "prompt": "p"}\nnot json\n[1]\n')
    items = _read(path)
    assert isinstance(items[0], EditSpec)
    assert [(e.row, e.field) for e in items[1:] if isinstance(e, RowError)] == [
        (2, "(line)"),
        (3, "(line)"),
    ]


def test_json_must_be_array(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"image": "a.png"}))
    with pytest.raises(ManifestError, match="array"):
        _read(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "m.xlsx"
    path.write_text("x")
    with pytest.raises(ManifestError, match=r"\.csv, \.json"):
        _read(path)


def test_spec_json_round_trip_and_fingerprint(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "prompt": "p", "n": 3}])
    (spec,) = _read(path)
    assert isinstance(spec, EditSpec)
    assert EditSpec.from_json(spec.to_json()) == spec
    digests = {spec.images[0]: "abc"}
    changed = EditSpec.from_json(spec.to_json().replace('"n":3', '"n":2'))
    assert spec.fingerprint(digests) != changed.fingerprint(digests)
    assert spec.fingerprint(digests) == EditSpec.from_json(spec.to_json()).fingerprint(digests)
