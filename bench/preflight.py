"""Benchmark: manifest reading + preflight over many rows that share fewer images.

    python bench/preflight.py [--rows 10000 --images 1000 --size 512 --mask-every 5]

Makes `--images` distinct product-like pictures (half PNG, half JPEG) and a few masks in a
temporary folder, writes a CSV manifest of `--rows` rows over them, then times:
  parse  read_manifest alone (rows -> EditSpec)
  cold   read_manifest + Preflight.check with a fresh Preflight (each file read and checked once)
  warm   the same again on the same Preflight (every file answered from the stat cache)
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import RowError
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults, read_manifest
from pipeline.intake.preflight import Preflight, PreflightOptions

MASKS = 20  # distinct masks; a quarter of them grayscale (converted by preflight)


def make_product(path: Path, size: int, rng: random.Random, fmt: str) -> None:
    """A studio-ish product shot: light backdrop, soft shadow, a coloured object with a label."""
    backdrop = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), backdrop)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    cx, cy = rng.randint(size // 3, 2 * size // 3), rng.randint(size // 3, 2 * size // 3)
    w, h = rng.randint(size // 6, size // 3), rng.randint(size // 6, size // 3)
    draw.ellipse((cx - w, cy + h - 12, cx + w, cy + h + 12), fill=(180, 180, 180))
    img = img.filter(ImageFilter.GaussianBlur(4))
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randint(20, 220) for _ in range(3))
    box = (cx - w // 2, cy - h, cx + w // 2, cy + h)
    if rng.random() < 0.5:
        draw.rounded_rectangle(box, radius=rng.randint(4, 40), fill=colour)  # type: ignore[arg-type]
    else:
        draw.ellipse(box, fill=colour)  # type: ignore[arg-type]
    draw.rectangle((cx - w // 3, cy - h // 4, cx + w // 3, cy + h // 4), fill=(250, 250, 245))
    draw.text((cx - w // 4, cy - 5), f"SKU {rng.randint(1000, 9999)}", fill=(30, 30, 30))
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=88)
    else:
        img.save(path, "PNG")


def make_mask(path: Path, size: int, rng: random.Random, gray: bool) -> None:
    box = sorted(rng.sample(range(size), 2))
    if gray:  # black = edit; preflight turns it into alpha
        img = Image.new("L", (size, size), 255)
        ImageDraw.Draw(img).rectangle((0, 0, size, box[0]), fill=0)
    else:
        img = Image.new("RGBA", (size, size), (0, 0, 0, 255))
        ImageDraw.Draw(img).rectangle((0, 0, size, box[0]), fill=(0, 0, 0, 0))
    img.save(path, "PNG")


def build(folder: Path, rows: int, images: int, size: int, mask_every: int) -> Path:
    rng = random.Random(20261121)
    names = []
    for i in range(images):
        fmt = "JPEG" if i % 2 else "PNG"
        name = f"img/p{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        make_product(folder / name, size, rng, fmt)
        names.append(name)
    masks = []
    for i in range(MASKS):
        name = f"masks/m{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        make_mask(folder / name, size, rng, gray=i % 4 == 0)
        masks.append(name)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "mask", "prompt", "model", "size", "quality"])
        for r in range(rows):
            image = names[r % images]
            if r % 7 == 3:  # some rows add a reference image (a logo from the catalogue)
                image += "|" + names[(r * 31) % images]
            mask = masks[(r // mask_every) % MASKS] if mask_every and r % mask_every == 0 else ""
            writer.writerow(
                [
                    f"SKU-{r:06d}",
                    image,
                    mask,
                    "Replace the background with a seamless white studio sweep",
                    "gpt-image-1.5" if r % 3 else "gpt-image-2",
                    "1024x1024" if r % 2 else "auto",
                    ("low", "medium", "high")[r % 3],
                ]
            )
    return manifest


def run(manifest: Path, checker: Preflight | None) -> tuple[float, float, int, int]:
    """Seconds in all, seconds inside Preflight.check, rows seen, rows rejected."""
    start = time.perf_counter()
    checking = 0.0
    seen = rejected = 0
    for item in read_manifest(manifest, Defaults()):
        seen += 1
        if isinstance(item, RowError):
            rejected += 1
            continue
        if checker is not None:
            t = time.perf_counter()
            result = checker.check(item)
            checking += time.perf_counter() - t
            if result.errors:
                rejected += 1
                if rejected <= 3:
                    print("  rejected:", *result.errors, file=sys.stderr)
    return time.perf_counter() - start, checking, seen, rejected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=1_000)
    parser.add_argument("--size", type=int, default=512, help="side of the square images")
    parser.add_argument("--mask-every", type=int, default=5, help="every Nth row has a mask")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="editbatch-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        manifest = build(folder, args.rows, args.images, args.size, args.mask_every)
        print(
            f"made {args.images} images ({args.size}x{args.size}), {MASKS} masks and "
            f"{args.rows} rows in {time.perf_counter() - t0:.1f} s"
        )
        options = PreflightOptions(
            allowed_roots=(folder,), catalog=load_catalog(), work_dir=folder / "work"
        )
        checker = Preflight(options)
        parse_s, _, rows, _ = run(manifest, None)
        cold_s, cold_check, _, rejected = run(manifest, checker)
        stats = checker.stats
        reads, hits, written = stats.files_read, stats.stat_hits, stats.files_written
        warm_s, warm_check, _, _ = run(manifest, checker)
        print(f"{'':13}{'manifest+preflight':>20}{'preflight alone':>20}")
        print(f"{'parse only':13}{rows / parse_s:>14,.0f} rows/s")
        print(
            f"{'cold cache':13}{rows / cold_s:>14,.0f} rows/s{rows / cold_check:>14,.0f} rows/s"
            f"   ({reads} files read, {hits} stat-cache hits, {written} copies written)"
        )
        print(
            f"{'warm cache':13}{rows / warm_s:>14,.0f} rows/s{rows / warm_check:>14,.0f} rows/s"
            f"   ({stats.files_read - reads} files read)"
        )
        print(f"rejected rows: {rejected}")


if __name__ == "__main__":
    main()
