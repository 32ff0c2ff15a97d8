"""Read a manifest (CSV, JSON array or JSONL) into EditSpec values or RowErrors, streaming.

Several source images in one row: in CSV, separate the paths with `|`
(`shoe.png|logo.png`); in JSON/JSONL, give a list (`"image": ["shoe.png", "logo.png"]`).
Paths are relative to the manifest's folder. Columns that are not edit fields are kept as
metadata and can be used in the output name template.

This is the one reader of manifests: `pipeline.intake.remote` reads the file references with
`iter_raw_rows` + `references`, fetches what is remote, and hands the local copies back to
`read_manifest` as `resolve` (the manifest file itself is never rewritten).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError, RowError
from pipeline.spec import (
    DEFAULT_OUTPUT_TEMPLATE,
    DEFAULT_OUTPUT_TEMPLATE_NO_ID,
    MASK_MODES,
    EditSpec,
)

EDIT_FIELDS = (
    "id",
    "image",
    "mask",
    "markup",
    "prompt",
    "model",
    "size",
    "quality",
    "input_fidelity",
    "background",
    "output_format",
    "output_compression",
    "n",
    "output",
    "mask_mode",
    "mask_feather",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg_model",
    "svg_effort",
    "provider",
)
# Defaults (CLI options) of these fields apply only to the rows of that output format: a
# batch-wide --frame-count must not turn every PNG row into an error.
FORMAT_DEFAULTS = {
    "frame_count": "gif",
    "frame_duration_ms": "gif",
    "svg_model": "svg",
    "svg_effort": "svg",
}
REQUIRED_FIELDS = ("image", "prompt")
REF_FIELDS = ("image", "mask", "markup")
IMAGE_SEPARATOR = "|"


DEFAULT_MODEL = "gpt-image-2.5-sunburst"


@dataclass(frozen=True)
class Defaults:
    """Batch-wide values for fields a row leaves empty (from CLI options), and models to
    replace (`--model-map OLD=NEW`: a row naming OLD, or taking it as the default, gets NEW).
    `provider`: where rows that name none go (`--provider`, EDITBATCH_PROVIDER; None: the
    default provider of the process that runs the job)."""

    model: str = DEFAULT_MODEL
    values: Mapping[str, Any] = field(default_factory=dict)
    model_map: Mapping[str, str] = field(default_factory=dict)
    provider: str | None = None


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    raise ManifestError(
        f"{path}: cannot tell the manifest format from the extension '{suffix}'; "
        "use .csv, .json (an array of objects) or .jsonl (one object per line)"
    )


def iter_raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (row number, raw mapping) per data row; rows that are not objects become RowErrors."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    kind = detect_format(path)
    if kind == "csv":
        yield from _csv_rows(path)
    elif kind == "jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _json_rows(path)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    fh = path.open("r", encoding="utf-8-sig", newline="")
    try:
        try:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
        except UnicodeDecodeError as exc:
            raise ManifestError(
                f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8"
            ) from exc
        if not header:
            raise ManifestError(f"{path}: empty manifest (no header row)")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ManifestError(f"{path}: header repeats column(s) {', '.join(dupes)}")
        reader.fieldnames = names
        row = 0
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError as exc:
                raise ManifestError(
                    f"{path}: not UTF-8 text after data row {row} (byte {exc.start}); "
                    "save the CSV as UTF-8"
                ) from exc
            except csv.Error as exc:
                raise ManifestError(f"{path}: CSV error after data row {row}: {exc}") from exc
            row += 1
            if None in raw:
                yield row, RowError(row, "(columns)", "more cells than header columns")
                continue
            values = {k: v for k, v in raw.items() if k is not None}
            if all((v or "").strip() == "" for v in values.values()):
                continue  # blank line
            yield row, values
    finally:
        fh.close()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open("r", encoding="utf-8-sig") as fh:
        row = 0
        for lineno, line in enumerate(_decoded_lines(fh, path), start=1):
            if not line.strip():
                continue
            row += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield row, RowError(row, "(line)", f"line {lineno} is not valid JSON: {exc.msg}")
                continue
            if not isinstance(value, dict):
                yield row, RowError(row, "(line)", f"line {lineno} is not a JSON object")
                continue
            yield row, value


def _decoded_lines(fh: io.TextIOBase, path: Path) -> Iterator[str]:
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if not isinstance(data, list):
        raise ManifestError(f"{path}: a JSON manifest must be an array of objects")
    for row, value in enumerate(data, start=1):
        if not isinstance(value, dict):
            yield row, RowError(row, "(row)", "not a JSON object")
        else:
            yield row, value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def references(raw: Mapping[str, Any]) -> Iterator[str]:
    """The file references one raw row names (images, mask, markup), as `parse_row` reads them."""
    yield from _image_list(raw.get("image")) or ()
    for name in ("mask", "markup"):
        ref = _text(raw.get(name))
        if ref:
            yield ref


def parse_row(
    row: int,
    raw: Mapping[str, Any],
    base_dir: Path,
    defaults: Defaults,
    resolve: Mapping[str, str] | None = None,
) -> EditSpec | list[RowError]:
    """Turn one raw row into an EditSpec, or every field-level error it has.

    `resolve` maps a file reference as written to the local file to use instead (a fetched
    copy); other references are taken relative to `base_dir`.
    """
    errors: list[RowError] = []
    merged: dict[str, Any] = dict(defaults.values)
    for name, value in raw.items():
        if name in EDIT_FIELDS and name != "image":
            if _text(value) is not None:
                merged[name] = value
        elif name == "image":
            merged[name] = value
    key = _text(merged.get("id"))

    def err(field_name: str, reason: str) -> None:
        errors.append(RowError(row, field_name, reason, key))

    if isinstance(raw.get("svg"), dict):
        # The API's nested object; a manifest has flat columns (a CSV cannot nest).
        err("svg", "give the svg object as the columns svg_model and svg_effort")

    for name in REQUIRED_FIELDS:
        if name not in raw and name not in defaults.values:
            err(name, f"missing required column '{name}'")

    images = _image_list(merged.get("image"))
    if images is None:
        err("image", "expected a path, a '|'-separated list of paths, or a JSON list of paths")
        images = []
    if not images and not any(e.field == "image" for e in errors):
        err("image", "no source image given")

    prompt = merged.get("prompt")
    prompt_text = prompt if isinstance(prompt, str) else None
    if prompt_text is None or not prompt_text.strip():
        if not any(e.field == "prompt" for e in errors):
            err("prompt", "empty prompt")
        prompt_text = ""

    def as_int(name: str) -> int | None:
        value = _text(merged.get(name))
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            err(name, f"expected a whole number, got {value!r}")
            return None

    n = as_int("n")
    feather = as_int("mask_feather")
    if feather is not None and not 0 <= feather <= 254:
        err("mask_feather", f"expected 0..254 pixels, got {feather}")
    compression = as_int("output_compression")
    output_format = (_text(merged.get("output_format")) or "png").lower()
    if output_format == "jpg":
        output_format = "jpeg"
    for name, fmt in FORMAT_DEFAULTS.items():
        if output_format != fmt and name in defaults.values and _text(raw.get(name)) is None:
            merged.pop(name, None)
    frame_count = as_int("frame_count")
    frame_duration = as_int("frame_duration_ms")
    mask_mode = (_text(merged.get("mask_mode")) or "guide").lower()
    if mask_mode not in MASK_MODES:
        err("mask_mode", f"expected one of {', '.join(MASK_MODES)}, got {mask_mode!r}")

    template = _text(merged.get("output")) or (
        DEFAULT_OUTPUT_TEMPLATE if key else DEFAULT_OUTPUT_TEMPLATE_NO_ID
    )
    metadata = {
        str(k): (_text(v) or "")
        for k, v in raw.items()
        if k not in EDIT_FIELDS and k is not None and str(k).strip()
    }
    if errors:
        return errors

    def local(p: str) -> str:
        if resolve is not None:
            p = resolve.get(p, p)
        # normpath, not resolve(): keep the name the person wrote (for {stem}); preflight
        # follows symlinks itself when it checks the allowed roots.
        return os.path.normpath(os.path.join(base_dir, p)) if "://" not in p else p

    mask = _text(merged.get("mask"))
    markup = _text(merged.get("markup"))
    model = _text(merged.get("model")) or defaults.model
    return EditSpec(
        row=row,
        key=key,
        images=tuple(local(p) for p in images),
        prompt=prompt_text,
        model=defaults.model_map.get(model, model),
        mask=local(mask) if mask else None,
        markup=local(markup) if markup else None,
        size=(_text(merged.get("size")) or "auto").lower(),
        quality=(_text(merged.get("quality")) or "auto").lower(),
        n=1 if n is None else n,
        output_format=output_format,
        input_fidelity=(_text(merged.get("input_fidelity")) or "").lower() or None,
        background=(_text(merged.get("background")) or "").lower() or None,
        output_compression=compression,
        output=template,
        mask_mode=mask_mode,
        mask_feather=feather or 0,
        metadata=metadata,
        complexity=(_text(merged.get("complexity")) or "").lower() or None,
        frame_count=frame_count,
        frame_duration_ms=frame_duration,
        svg_model=_text(merged.get("svg_model")),
        svg_effort=(_text(merged.get("svg_effort")) or "").lower() or None,
        provider=_text(merged.get("provider")) or defaults.provider,
    )


def _image_list(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return None
        return [v.strip() for v in value if v.strip()]
    if isinstance(value, str):
        return [p.strip() for p in value.split(IMAGE_SEPARATOR) if p.strip()]
    return None


def read_manifest(
    path: Path, defaults: Defaults, resolve: Mapping[str, str] | None = None
) -> Iterator[EditSpec | RowError]:
    """Stream the manifest: one EditSpec per good row, one RowError per problem.

    Also reports repeated `id` values (the second and later rows). `resolve`: see `parse_row`.
    """
    base_dir = path.resolve().parent
    seen_keys: dict[str, int] = {}
    any_rows = False
    for row, raw in iter_raw_rows(path):
        any_rows = True
        if isinstance(raw, RowError):
            yield raw
            continue
        parsed = parse_row(row, raw, base_dir, defaults, resolve)
        if isinstance(parsed, list):
            yield from parsed
            continue
        if parsed.key is not None:
            first = seen_keys.get(parsed.key)
            if first is not None:
                yield RowError(
                    row, "id", f"duplicate id {parsed.key!r} (first at row {first})", parsed.key
                )
                continue
            seen_keys[parsed.key] = row
        yield parsed
    if not any_rows:
        raise ManifestError(f"{path}: the manifest has no rows")
