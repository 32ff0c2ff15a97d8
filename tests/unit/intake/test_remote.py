"""Remote inputs against fsspec's in-memory filesystem (memory://): limits, schemes, rewriting."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from pipeline.batch.submit import check_rows
from pipeline.errors import ManifestError, SchemeNotAllowed, TooLarge
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults
from pipeline.intake.preflight import PreflightOptions
from pipeline.intake.remote import LocalManifest, RemoteOptions, fetch, localize
from pipeline.spec import EditSpec
from tests.factories import make_image, make_mask


@pytest.fixture
def mem() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """A fresh memory:// "bucket" for one test."""
    fs = fsspec.filesystem("memory")
    bucket = f"bkt-{uuid.uuid4().hex[:8]}"
    yield fs, bucket
    fs.rm(f"/{bucket}", recursive=True)


def _options(tmp_path: Path, **kw: object) -> RemoteOptions:
    base = {"cache_dir": tmp_path / "cache", "schemes": ("file", "memory")}
    return RemoteOptions(**{**base, **kw})  # type: ignore[arg-type]


def _put_image(fs: fsspec.AbstractFileSystem, uri: str, tmp_path: Path, **kw: object) -> bytes:
    local = make_image(tmp_path / "src" / uuid.uuid4().hex / "i.png", **kw)  # type: ignore[arg-type]
    data = local.read_bytes()
    fs.pipe_file(uri.removeprefix("memory://"), data)
    return data


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def _checked(local: LocalManifest, tmp_path: Path) -> list[tuple[int, list[str]]]:
    preflight = local.preflight(
        PreflightOptions(
            allowed_roots=local.roots, catalog=load_catalog(), work_dir=tmp_path / "work"
        )
    )
    return [
        (r.row, [f"{e.field}: {e.reason}" for e in r.errors])
        for r in check_rows(local, Defaults(), preflight)
    ]


# --- limits ------------------------------------------------------------------------------------


def test_scheme_not_allowed_for_the_manifest(tmp_path: Path) -> None:
    with pytest.raises(SchemeNotAllowed, match="scheme 'gs' is not allowed"):
        localize("gs://bucket/m.csv", _options(tmp_path))
    with pytest.raises(SchemeNotAllowed, match="EDITBATCH_REMOTE_SCHEMES"):
        fetch("http://example.test/a.png", _options(tmp_path), 100)


def test_local_files_refused_when_file_is_not_allowed(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(_csv([["image", "prompt"], ["a.png", "x"]]))
    with pytest.raises(SchemeNotAllowed, match="scheme 'file'"):
        localize(manifest, _options(tmp_path, schemes=("memory",)))


def test_manifest_too_large(tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]) -> None:
    fs, bucket = mem
    fs.pipe_file(f"/{bucket}/m.csv", b"image,prompt\n" + b"a.png,x\n" * 100)
    with pytest.raises(TooLarge, match="over the 500-byte limit for remote manifests"):
        localize(f"memory://{bucket}/m.csv", _options(tmp_path, max_manifest_bytes=500))
    assert not list((tmp_path / "cache").glob("objects/*"))


def test_image_too_large_or_missing_rejects_only_its_row(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    small = _put_image(fs, f"memory://{bucket}/img/small.png", tmp_path)
    big = _put_image(fs, f"memory://{bucket}/img/big.png", tmp_path, size=(1024, 1024))
    assert len(small) < 5_000 < len(big)
    fs.pipe_file(
        f"/{bucket}/m.csv",
        _csv(
            [
                ["id", "image", "prompt"],
                ["A", "img/small.png", "edit a"],
                ["B", "img/big.png", "edit b"],
                ["C", "img/gone.png", "edit c"],
                ["D", "http://example.test/d.png", "edit d"],
            ]
        ),
    )
    local = localize(f"memory://{bucket}/m.csv", _options(tmp_path, max_image_bytes=5_000))
    assert local.fetched == 1  # the manifest aside: only small.png was downloaded
    checked = dict(_checked(local, tmp_path))
    assert checked[1] == []
    assert checked[2] == [
        f"image: memory://{bucket}/img/big.png: image is {len(big):,} bytes, over the "
        "5,000-byte limit for remote images; make it smaller or raise "
        "EDITBATCH_REMOTE_MAX_IMAGE_BYTES"
    ]
    assert checked[3] == [f"image: memory://{bucket}/img/gone.png: not found"]
    assert "scheme 'http' is not allowed" in checked[4][0]


def test_size_is_enforced_while_reading_too(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, bucket = mem
    _put_image(fs, f"memory://{bucket}/a.png", tmp_path, size=(512, 512))
    # The listing says 10 bytes (the object grew after it was listed): the stream is cut anyway.
    real_info = type(fs).info
    monkeypatch.setattr(type(fs), "info", lambda self, p, **kw: {**real_info(self, p), "size": 10})
    with pytest.raises(TooLarge, match="over "):
        fetch(f"memory://{bucket}/a.png", _options(tmp_path), 100, "image")
    assert not list((tmp_path / "cache").glob("objects/*/*"))
    assert not [p for p in (tmp_path / "cache" / "tmp").iterdir()]  # no partial file left


# --- references ---------------------------------------------------------------------------------


def test_remote_csv_keeps_columns_rows_and_numbers(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    _put_image(fs, f"memory://{bucket}/photos/shoe.png", tmp_path)
    _put_image(fs, f"memory://{bucket}/logos/logo.png", tmp_path, color=(10, 200, 10))
    mask = make_mask(tmp_path / "src" / "mask.png").read_bytes()
    fs.pipe_file(f"/{bucket}/masks/m.png", mask)
    rows = [
        ["id", "image", "mask", "prompt", "category", "output"],
        ["S1", "../photos/shoe.png | ../logos/logo.png", "", "put the logo on", "shoes", ""],
        ["", "", "", "", "", ""],  # a row of empty cells: skipped, but it keeps its number
        [
            "S2",
            f"memory://{bucket}/photos/shoe.png",
            "../masks/m.png",
            'say "hi",\nok',
            "bags",
            "{category}/{id}.{ext}",
        ],
    ]
    fs.pipe_file(f"/{bucket}/manifests/2026-03-14.csv", _csv(rows))
    local = localize(f"memory://{bucket}/manifests/2026-03-14.csv", _options(tmp_path))
    assert local.path.name == "2026-03-14.csv" and local.changed
    assert local.roots == ((tmp_path / "cache").resolve(),)
    assert local.fetched == 3  # shoe.png once, although named twice
    specs = [s for s in local.read(Defaults()) if isinstance(s, EditSpec)]
    assert [(s.row, s.key) for s in specs] == [(1, "S1"), (3, "S2")]
    first, second = specs
    assert len(first.images) == 2 and second.mask is not None
    assert first.images[0] == second.images[0]  # one cached copy
    for path in (*first.images, second.mask):
        assert Path(path).is_file() and (tmp_path / "cache" / "objects") in Path(path).parents
    assert Path(first.images[0]).name == "shoe.png"  # extensions kept: formats go by them
    assert second.prompt == 'say "hi",\nok'
    assert second.metadata == {"category": "bags"} and second.output == "{category}/{id}.{ext}"
    assert [errs for _, errs in _checked(local, tmp_path)] == [[], []]


def test_remote_manifest_cannot_name_local_files_or_leave_its_bucket(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    secret = make_image(tmp_path / "private" / "secret.png")
    fs.pipe_file(
        f"/{bucket}/m/x.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "abs", "image": str(secret), "prompt": "p"},
                {"id": "file", "image": f"file://{secret}", "prompt": "p"},
                {"id": "up", "image": "../../other-bucket/a.png", "prompt": "p"},
            ]
        ).encode(),
    )
    local = localize(f"memory://{bucket}/m/x.jsonl", _options(tmp_path))
    checked = _checked(local, tmp_path)
    assert [row for row, _ in checked] == [1, 2, 3]
    assert f"image: file://{secret}: a remote manifest cannot name local files" in checked[0][1]
    assert f"image: file://{secret}: a remote manifest cannot name local files" in checked[1][1]
    assert checked[2][1] == [
        f"image: memory://other-bucket/a.png: '../../other-bucket/a.png' climbs out of {bucket}"
    ]


def test_json_manifest_lists_are_resolved(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    _put_image(fs, f"memory://{bucket}/a.png", tmp_path)
    _put_image(fs, f"memory://{bucket}/b.png", tmp_path, color=(1, 2, 3))
    doc = {"rows": [{"id": "J", "image": ["a.png", "b.png"], "prompt": "p", "n": 2}]}
    fs.pipe_file(f"/{bucket}/m.json", json.dumps(doc).encode())
    local = localize(f"memory://{bucket}/m.json", _options(tmp_path))
    (spec,) = list(local.read(Defaults()))
    assert isinstance(spec, EditSpec) and spec.n == 2
    assert [Path(p).name for p in spec.images] == ["a.png", "b.png"]


def test_local_manifest_without_remote_files_is_used_as_it_is(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "a.png")
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_bytes(_csv([["image", "prompt"], ["a.png", "x"]]))
    local = localize(str(manifest), _options(tmp_path))
    assert local.path == manifest and not local.changed and not local.problems
    assert local.roots == (manifest.parent.resolve(),)


def test_local_manifest_with_remote_images_gets_a_local_copy(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    _put_image(fs, f"memory://{bucket}/logo.png", tmp_path)
    make_image(tmp_path / "in" / "a.png")
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_bytes(
        _csv([["id", "image", "prompt"], ["L", f"a.png|memory://{bucket}/logo.png", "x"]])
    )
    local = localize(str(manifest), _options(tmp_path))
    assert local.changed and local.roots[0] == manifest.parent.resolve()
    (spec,) = list(local.read(Defaults()))
    assert isinstance(spec, EditSpec)
    assert spec.images[0] == str((tmp_path / "in" / "a.png").resolve())
    assert Path(spec.images[1]).name == "logo.png"
    assert [errs for _, errs in _checked(local, tmp_path)] == [[]]


def test_unreadable_manifest_is_left_to_the_manifest_reader(
    tmp_path: Path, mem: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    fs, bucket = mem
    fs.pipe_file(f"/{bucket}/m.csv", b"image,prompt\n\xff\xfe,bad\n")
    local = localize(f"memory://{bucket}/m.csv", _options(tmp_path))
    with pytest.raises(ManifestError, match="not UTF-8"):
        list(local.read(Defaults()))
