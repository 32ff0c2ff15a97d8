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


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_new_parameter_columns_become_spec_fields(tmp_path: Path, suffix: str) -> None:
    """complexity, frame_count, frame_duration_ms, svg_model and svg_effort are edit fields,
    not metadata, in every manifest format."""
    rows = [
        {"image": "a.png", "prompt": "p", "output_format": "GIF", "complexity": "High",
         "frame_count": "5", "frame_duration_ms": 150},
        {"image": "a.png", "prompt": "p", "output_format": "svg", "svg_model": "gpt-5.2",
         "svg_effort": "MINIMAL"},
    ]  # fmt: skip
    gif, svg = _read(write_manifest(tmp_path / f"m{suffix}", rows))
    assert isinstance(gif, EditSpec) and isinstance(svg, EditSpec)
    assert (gif.output_format, gif.complexity, gif.frame_count, gif.frame_duration_ms) == (
        "gif", "high", 5, 150,
    )  # fmt: skip
    assert (gif.ext, svg.ext) == ("gif", "svg")
    assert (svg.svg_model, svg.svg_effort, svg.frame_count) == ("gpt-5.2", "minimal", None)
    assert gif.metadata == {} and svg.metadata == {}


def test_format_defaults_apply_only_to_rows_of_that_format(tmp_path: Path) -> None:
    """A batch-wide --frame-count or --svg-model fills GIF / SVG rows and leaves others alone;
    a value a row gives itself is kept (and preflight judges it)."""
    rows = [
        {"image": "a.png", "prompt": "p", "output_format": "png"},
        {"image": "a.png", "prompt": "p", "output_format": "gif"},
        {"image": "a.png", "prompt": "p", "output_format": "svg"},
        {"image": "a.png", "prompt": "p", "output_format": "png", "frame_count": "3"},
    ]
    png, gif, svg, odd = _read(
        write_manifest(tmp_path / "m.csv", rows),
        frame_count=12,
        frame_duration_ms=80,
        svg_model="gpt-5.2",
        svg_effort="low",
        complexity="low",
    )
    assert isinstance(png, EditSpec) and isinstance(gif, EditSpec)
    assert isinstance(svg, EditSpec) and isinstance(odd, EditSpec)
    assert (png.frame_count, png.svg_model, png.complexity) == (None, None, "low")
    assert (gif.frame_count, gif.frame_duration_ms, gif.svg_effort) == (12, 80, None)
    assert (svg.svg_model, svg.svg_effort, svg.frame_count) == ("gpt-5.2", "low", None)
    assert odd.frame_count == 3


def test_nested_svg_object_and_bad_frame_count_are_row_errors(tmp_path: Path) -> None:
    rows = [
        {"image": "a.png", "prompt": "p", "output_format": "svg", "svg": {"model": "gpt-5.2"}},
        {"image": "a.png", "prompt": "p", "output_format": "gif", "frame_count": "nine"},
    ]
    first, second = _read(write_manifest(tmp_path / "m.jsonl", rows))
    assert isinstance(first, RowError) and isinstance(second, RowError)
    assert (first.row, first.field) == (1, "svg") and "svg_model and svg_effort" in first.reason
    assert (second.row, second.field) == (2, "frame_count") and "'nine'" in second.reason


def test_a_provider_column_chooses_the_rows_provider_over_the_batchs(tmp_path: Path) -> None:
    """A manifest column `provider` sends its row there; an empty cell takes the batch's
    provider; the column is no metadata, and the fingerprint does not depend on it (an edit
    bought through one provider is reused for another)."""
    make_image(tmp_path / "a.png")
    rows = [
        {"id": "A", "image": "a.png", "prompt": "p", "provider": "azure-east"},
        {"id": "B", "image": "a.png", "prompt": "p", "provider": ""},
    ]
    path = write_manifest(tmp_path / "m.csv", rows)
    first, second = read_manifest(path, Defaults(provider="openai"))
    assert isinstance(first, EditSpec) and isinstance(second, EditSpec)
    assert (first.provider, second.provider) == ("azure-east", "openai")
    assert first.metadata == {} and "provider" not in first.api_params()
    digests = {str(tmp_path / "a.png"): "d"}
    assert first.fingerprint(digests) == second.fingerprint(digests)
    assert EditSpec.from_json(first.to_json()) == first
