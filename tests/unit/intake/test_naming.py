from __future__ import annotations

import pytest

from pipeline.errors import OutputNameError
from pipeline.intake.naming import render_name
from pipeline.spec import EditSpec


def spec(template: str, **kw: object) -> EditSpec:
    base: dict[str, object] = dict(
        row=7,
        key="SKU-1",
        images=("/x/shoe.png",),
        prompt="p",
        model="gpt-image-1.5",
        output=template,
        metadata={"brand": "acme"},
    )
    base.update(kw)
    return EditSpec(**base)  # type: ignore[arg-type]


def test_fields() -> None:
    assert render_name(spec("{brand}/{id}_{index}.{ext}"), 1) == "acme/SKU-1_1.png"
    assert render_name(spec("{stem}-{row}.{ext}", output_format="jpeg"), 1) == "shoe-7.jpg"


def test_index_added_when_several_images_share_a_name() -> None:
    s = spec("{id}.{ext}", n=2)
    assert [render_name(s, i) for i in (1, 2)] == ["SKU-1_1.png", "SKU-1_2.png"]


@pytest.mark.parametrize(
    "template",
    ["../{id}.png", "/etc/{id}.png", "a/../../{id}.png", "{nope}.png", "{}.png", "./{id}"],
)
def test_unsafe_or_unknown_is_refused(template: str) -> None:
    with pytest.raises(OutputNameError):
        render_name(spec(template), 1)


def test_metadata_cannot_smuggle_traversal() -> None:
    with pytest.raises(OutputNameError):
        render_name(spec("{brand}/{id}.png", metadata={"brand": ".."}), 1)
