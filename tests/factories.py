"""Small builders for test inputs: images, masks and manifests made on the fly."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def make_image(
    path: Path,
    size: tuple[int, int] = (256, 256),
    color: tuple[int, int, int] = (180, 120, 60),
    fmt: str | None = None,
) -> Path:
    """A photo-like image: a backdrop with a contrasting block in the middle."""
    img = Image.new("RGB", size, color)
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(30, 60, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_mask(
    path: Path, size: tuple[int, int] = (256, 256), keep: tuple[int, int, int, int] | None = None
) -> Path:
    """RGBA mask: alpha 0 (edit) everywhere except `keep` (alpha 255, preserved)."""
    w, h = size
    keep = keep or (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    mask = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(mask).rectangle(keep, fill=(0, 0, 0, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


def write_manifest(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as CSV, JSON or JSONL depending on the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        fields: list[str] = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()}
                )
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(list(rows)), encoding="utf-8")
    return path


def product_rows(folder: Path, count: int, **overrides: Any) -> list[dict[str, Any]]:
    """`count` rows over freshly made images (distinct colours), masked on even rows."""
    rows = []
    for i in range(count):
        img = make_image(folder / f"img{i}.png", color=(40 + (i * 37) % 200, 90, (i * 53) % 255))
        row: dict[str, Any] = {
            "id": f"SKU{i:04d}",
            "image": img.name,
            "prompt": f"white studio background, variant {i}",
            "model": "gpt-image-2.5-sunburst",
            "size": "1024x1024",
            "quality": "low",
        }
        if i % 2 == 0:
            row["mask"] = make_mask(folder / f"mask{i}.png").name
        row.update(overrides)
        rows.append(row)
    return rows
