"""Output formats: GIF and SVG answers are recognised, measured where they can be, and an SVG
that is not well-formed, not an SVG, or declares entities is refused (never expanded)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline.output.formats import describe, unreadable
from pipeline.run.gateway import decode_images, svg_usage_from_response

SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="480" viewBox="0 0 64 48">'
    b'<rect width="10" height="10"/></svg>'
)


def gif(frames: int = 3, size: tuple[int, int] = (40, 30)) -> bytes:
    images = [Image.new("RGB", size, (i * 60, 20, 200)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=120, loop=0)
    return buf.getvalue()


def test_gif_is_described_by_its_header() -> None:
    assert describe(gif()) == describe(gif(frames=5))
    described = describe(gif())
    assert (described.format, described.width, described.height) == ("gif", 40, 30)
    assert unreadable(gif()) is None


@pytest.mark.parametrize(
    ("root", "size"),
    [
        ('width="640" height="480" viewBox="0 0 64 48"', (640, 480)),
        ('width="640px" height="480.4px"', (640, 480)),
        ('viewBox="0 0 1024 1536"', (1024, 1536)),
        ('viewBox="0,0,300.6,200"', (301, 200)),
        ('width="100%" height="100%" viewBox="0 0 800 600"', (800, 600)),
        ('width="10cm" height="5cm"', (None, None)),
        ("", (None, None)),
    ],
)
def test_svg_size_from_attributes_else_viewbox(
    root: str, size: tuple[int | None, int | None]
) -> None:
    data = f'<svg xmlns="http://www.w3.org/2000/svg" {root}><g/></svg>'.encode()
    described = describe(data)
    assert described.format == "svg"
    assert (described.width, described.height) == size
    assert unreadable(data) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg"><g></svg>', "not well-formed"),
        (b"<html><body/></html>", "root element is <html>"),
        (b'<svg xmlns="urn:other"/>', "root element is <svg>"),
        (
            b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<svg xmlns="http://www.w3.org/2000/svg">&b;</svg>',
            "declares entities",
        ),
        (
            b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<svg xmlns="http://www.w3.org/2000/svg">&x;</svg>',
            "declares entities",
        ),
    ],
)
def test_bad_svg_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    problem = unreadable(data)
    assert problem is not None and reason in problem
    with pytest.raises(ValueError, match=reason):
        describe(data)


def test_the_gateway_accepts_gif_and_svg_answers_and_refuses_broken_ones() -> None:
    """A paid answer that is a GIF or a well-formed SVG is an output; a broken SVG is a bad
    answer (retried), not a file written under the person's name."""
    good = [SimpleNamespace(b64_json=base64.b64encode(x).decode()) for x in (gif(), SVG)]
    assert decode_images(good) == (gif(), SVG)
    broken = SimpleNamespace(b64_json=base64.b64encode(b"<svg><g></svg>").decode())
    assert "image 1: not well-formed XML" in str(decode_images([broken]))
    text = SimpleNamespace(b64_json=base64.b64encode(b"GIF89a-but-cut").decode())
    assert "image 1: not a readable image" in str(decode_images([text]))


def test_svg_usage_is_read_apart_from_image_usage() -> None:
    usage, author = svg_usage_from_response(
        SimpleNamespace(
            input_tokens=900, output_tokens=2500, reasoning_tokens=700, total_tokens=3400,
            model="gpt-5.2",
        )
    )  # fmt: skip
    assert author == "gpt-5.2"
    assert usage is not None
    assert (usage.text_input, usage.text_output, usage.image_output) == (900, 2500, 0)
    assert svg_usage_from_response(None) == (None, None)


def test_collector_keeps_gif_and_svg_as_they_came_and_records_their_size() -> None:
    from pipeline.output.collector import finish_output
    from pipeline.spec import EditSpec

    def spec(fmt: str) -> EditSpec:
        return EditSpec(row=1, key="k", images=("/in/a.png",), prompt="p", model="m",
                        output_format=fmt)  # fmt: skip

    data, meta = finish_output(spec("gif"), gif())
    assert data == gif()
    assert meta == {"width": 40, "height": 30, "format": "gif", "drift": None}
    data, meta = finish_output(spec("svg"), SVG)
    assert data == SVG
    assert meta == {"width": 640, "height": 480, "format": "svg", "drift": None}
