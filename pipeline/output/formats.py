"""What an output file is: its format and, where it can be read, its width and height.

Raster outputs (PNG, WebP, JPEG, GIF) are read by Pillow from their header. SVG outputs, which
Pillow cannot read, are parsed as XML: well-formed, with an `<svg>` root, and no entity
declarations (a hostile answer must not expand entities or reach files: the defusedxml rule).
Their size comes from the root's `width` / `height` attributes (plain or `px` numbers), else
from its `viewBox`; an SVG sized only in other units (`100%`, `10cm`) has no known size.
"""

from __future__ import annotations

import io
import re
import xml.parsers.expat
from dataclasses import dataclass

from PIL import Image

from pipeline.errors import EditbatchError

__all__ = ["Described", "describe", "is_svg", "svg_size", "unreadable"]

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(px)?\s*$")
_SEPARATOR = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class Described:
    format: str  # png | webp | jpeg | gif | svg
    width: int | None
    height: int | None


class _Refused(EditbatchError):
    """An SVG with a construct we do not parse (entity declarations)."""


def is_svg(data: bytes) -> bool:
    """Whether `data` looks like XML text (an SVG answer) rather than a binary image."""
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<")


def _svg_root(data: bytes) -> dict[str, str]:
    """The root element's attributes; ValueError saying why when `data` is not a usable SVG."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    root: list[tuple[str, dict[str, str]]] = []

    def start(name: str, attributes: dict[str, str]) -> None:
        if not root:
            root.append((name, attributes))

    def refuse(*_: object) -> None:
        raise _Refused("it declares entities")

    parser.StartElementHandler = start
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise ValueError(f"not a usable SVG: {exc}") from None
    except xml.parsers.expat.ExpatError as exc:
        raise ValueError(f"not well-formed XML ({xml.parsers.expat.errors.messages[exc.code]}, "
                         f"line {exc.lineno})") from None  # fmt: skip
    if not root:
        raise ValueError("not an SVG: no root element")
    name, attributes = root[0]
    namespace, _, local = name.rpartition(" ")
    if local != "svg" or namespace not in ("", SVG_NAMESPACE):
        raise ValueError(f"not an SVG: the root element is <{local}>")
    return attributes


def _length(value: str | None) -> int | None:
    match = _LENGTH.match(value or "")
    return None if match is None else round(float(match.group(1)))


def svg_size(attributes: dict[str, str]) -> tuple[int | None, int | None]:
    """(width, height) of an SVG root: its width/height attributes, else its viewBox."""
    width, height = _length(attributes.get("width")), _length(attributes.get("height"))
    if width is not None and height is not None:
        return width, height
    parts = _SEPARATOR.split(attributes.get("viewBox", "").strip())
    if len(parts) == 4:
        try:
            box_w, box_h = float(parts[2]), float(parts[3])
        except ValueError:
            return width, height
        if box_w > 0 and box_h > 0:
            return (width or round(box_w)), (height or round(box_h))
    return width, height


def describe(data: bytes) -> Described:
    """Format and size of an output; ValueError when it is neither a readable image nor an SVG."""
    if is_svg(data):
        width, height = svg_size(_svg_root(data))
        return Described("svg", width, height)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            return Described("jpeg" if fmt == "mpo" else fmt, img.size[0], img.size[1])
    except Exception as exc:  # Pillow raises many types for bad data
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc


def unreadable(data: bytes) -> str | None:
    """None when `data` is a readable image or a well-formed SVG, else why not."""
    if is_svg(data):
        try:
            _svg_root(data)
        except ValueError as exc:
            return str(exc)
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # Pillow raises many types for bad data
        return f"not a readable image ({type(exc).__name__})"
    return None
