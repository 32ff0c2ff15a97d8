"""Regenerate the example product photos, masks and manifest (deterministic).

    python examples/make_examples.py

The pictures are drawn with Pillow: simple "products" (a mug, a sneaker-like shape, a bottle,
a bag) on a coloured backdrop, plus masks whose transparent area (alpha 0) marks the
background to edit. Committed to the repository so the quick start needs no generation step.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = (512, 512)
PRODUCTS = ("mug", "bottle", "bag", "sneaker", "lamp")
BACKDROPS = [(196, 160, 120), (120, 150, 190), (90, 110, 90), (200, 200, 170), (150, 110, 150)]
INKS = [(200, 40, 40), (30, 90, 160), (240, 200, 60), (40, 40, 40), (230, 230, 230)]


def draw_product(
    kind: str, ink: tuple[int, int, int], backdrop: tuple[int, int, int]
) -> tuple[Image.Image, Image.Image]:
    """The photo, and a mask that is opaque on the product and transparent elsewhere."""
    photo = Image.new("RGB", SIZE, backdrop)
    d = ImageDraw.Draw(photo)
    for y in range(SIZE[1]):  # soft vertical gradient backdrop
        shade = int(40 * y / SIZE[1])
        d.line([(0, y), (SIZE[0], y)], fill=tuple(max(c - shade, 0) for c in backdrop))
    shape = Image.new("L", SIZE, 0)
    s = ImageDraw.Draw(shape)
    if kind == "mug":
        s.rounded_rectangle((170, 170, 330, 380), 18, fill=255)
        s.ellipse((300, 220, 390, 320), outline=255, width=22)
    elif kind == "bottle":
        s.rounded_rectangle((205, 200, 305, 420), 30, fill=255)
        s.rectangle((235, 120, 275, 205), fill=255)
    elif kind == "bag":
        s.rounded_rectangle((150, 220, 360, 410), 24, fill=255)
        s.arc((190, 130, 320, 280), 180, 360, fill=255, width=16)
    elif kind == "sneaker":
        s.polygon(
            [(120, 360), (150, 260), (260, 250), (330, 310), (400, 330), (400, 380), (120, 380)],
            fill=255,
        )
    else:
        s.polygon([(200, 160), (310, 160), (350, 260), (160, 260)], fill=255)
        s.rectangle((245, 260, 265, 380), fill=255)
        s.ellipse((200, 370, 310, 400), fill=255)
    shadow = shape.filter(ImageFilter.GaussianBlur(12))
    photo.paste((20, 20, 20), (12, 14), Image.eval(shadow, lambda v: v // 3))
    photo.paste(ink, (0, 0), shape)
    highlight = Image.eval(shape.filter(ImageFilter.GaussianBlur(25)), lambda v: v // 4)
    photo.paste((255, 255, 255), (-18, -18), highlight)
    mask = Image.new("RGBA", SIZE, (0, 0, 0, 0))  # alpha 0: edit here (the background)
    mask.putalpha(shape.point(lambda v: 255 if v > 0 else 0))
    return photo, mask


def main() -> None:
    rng = random.Random(7)
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    prompts = [
        "Replace the background with a clean white studio sweep and a soft shadow",
        "Put the product on a light oak table in a bright kitchen",
        "Replace the background with a pastel gradient, keep the product unchanged",
        "Place the product on a marble surface with morning light",
    ]
    rows = []
    for i in range(12):
        kind = PRODUCTS[i % len(PRODUCTS)]
        photo, mask = draw_product(kind, INKS[(i * 3) % len(INKS)], BACKDROPS[i % len(BACKDROPS)])
        sku = f"SKU-{1000 + i}"
        photo.save(images / f"{sku}.png", optimize=True)
        use_mask = i % 3 != 2
        if use_mask:
            mask.save(images / f"{sku}-mask.png", optimize=True)
        rows.append(
            {
                "id": sku,
                "image": f"images/{sku}.png",
                "mask": f"images/{sku}-mask.png" if use_mask else "",
                "prompt": prompts[i % len(prompts)],
                "model": "gpt-image-2.5-flare" if i % 4 == 3 else "gpt-image-2.5-sunburst",
                "size": "1024x1024",
                "quality": rng.choice(["low", "medium"]),
                "output_format": "jpeg" if i % 5 == 4 else "png",
                "n": 2 if i == 0 else 1,
                "category": kind,
                "output": "{category}/{id}_{index}.{ext}",
            }
        )
    with (HERE / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {HERE / 'manifest.csv'}")


if __name__ == "__main__":
    main()
