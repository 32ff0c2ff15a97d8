"""Output file names from a template such as `{id}_{index}.{ext}` (pure, and safe).

Fields: id, row, index (1-based image number), ext, model, batch, stem (first image's file
name without extension), and every metadata column of the row. A name may contain `/` to make
sub-folders, but never escapes the output root: no absolute paths, no `..`, no empty parts.
"""

from __future__ import annotations

import re
import string
from pathlib import PurePosixPath

from pipeline.errors import OutputNameError
from pipeline.spec import EditSpec

_UNSAFE = re.compile(r"[\x00-\x1f\\:*?\"<>|]")


def template_fields(spec: EditSpec, index: int, batch_id: int | None = None) -> dict[str, str]:
    fields = {k: v for k, v in spec.metadata.items()}
    fields.update(
        {
            "id": spec.key or f"row{spec.row}",
            "row": str(spec.row),
            "index": str(index),
            "ext": spec.ext,
            "model": spec.model,
            "batch": "" if batch_id is None else str(batch_id),
            "stem": PurePosixPath(spec.images[0].replace("\\", "/")).stem if spec.images else "",
        }
    )
    return fields


def render_name(spec: EditSpec, index: int, batch_id: int | None = None) -> str:
    """The relative output name of image `index` (1-based) of `spec`, or OutputNameError."""
    fields = template_fields(spec, index, batch_id)
    for _, name, _, _ in string.Formatter().parse(spec.output):
        if name is not None and name != "" and name not in fields:
            known = ", ".join(sorted(fields))
            raise OutputNameError(f"template field {{{name}}} is not a column (known: {known})")
        if name == "":
            raise OutputNameError("empty {} in template; name the field, e.g. {id}")
    try:
        rendered = spec.output.format_map(fields)
    except (ValueError, IndexError, AttributeError, KeyError) as exc:
        raise OutputNameError(f"bad template {spec.output!r}: {exc}") from exc
    rendered = _UNSAFE.sub("_", rendered.strip())
    if spec.n > 1 and "{index}" not in spec.output:
        stem, dot, suffix = rendered.rpartition(".")
        rendered = f"{stem}_{index}.{suffix}" if dot else f"{rendered}_{index}"
    path = PurePosixPath(rendered)
    if not rendered or path.is_absolute() or rendered.startswith("/"):
        raise OutputNameError(f"output name {rendered!r} must be a relative path")
    if any(part in ("", ".", "..") for part in rendered.split("/")):
        raise OutputNameError(f"output name {rendered!r} must not contain '..', '.' or empty parts")
    return rendered
