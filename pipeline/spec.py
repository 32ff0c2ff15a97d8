"""EditSpec: one validated manifest row, the unit of work (plain, frozen, JSON-serialisable)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

MASK_MODES = ("guide", "strict")
# Every field of the SDK's `ImageEditParams` the pipeline sends (files included; the nested `svg`
# object by its dotted fields). tests/unit/intake/test_sdk_drift.py holds the SDK against it.
API_PARAMS = (
    "image",
    "mask",
    "markup",
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "input_fidelity",
    "background",
    "output_format",
    "output_compression",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
    "svg.model",
    "svg.reasoning",
    "svg.reasoning.effort",
)
# Values of the SDK's Literal types, as the pipeline knows them (the drift test checks them too).
OUTPUT_FORMATS = ("png", "webp", "jpeg", "gif", "svg")
RASTER_FORMATS = ("png", "webp", "jpeg", "gif")  # what Pillow reads
COMPLEXITIES = ("low", "medium", "high")
SVG_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
DEFAULT_OUTPUT_TEMPLATE = "{id}_{index}.{ext}"
DEFAULT_OUTPUT_TEMPLATE_NO_ID = "row{row}_{index}.{ext}"


@dataclass(frozen=True)
class EditSpec:
    """Everything needed to make one edit call and to name its outputs.

    Paths are absolute (resolved against the manifest's folder). Optional API parameters left
    None (input_fidelity, background, output_compression, complexity, frame_count,
    frame_duration_ms, svg_model, svg_effort) stay out of the request, so the API's default
    applies. `svg_model` / `svg_effort` are the SDK's nested `svg.model` /
    `svg.reasoning.effort`. New fields have defaults, so specs stored before them still load.
    """

    row: int
    key: str | None
    images: tuple[str, ...]
    prompt: str
    model: str
    mask: str | None = None
    markup: str | None = None
    size: str = "auto"
    quality: str = "auto"
    n: int = 1
    output_format: str = "png"
    input_fidelity: str | None = None
    background: str | None = None
    output_compression: int | None = None
    output: str = DEFAULT_OUTPUT_TEMPLATE
    mask_mode: str = "guide"
    mask_feather: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg_model: str | None = None
    svg_effort: str | None = None
    # Where the call goes (pipeline/providers.py; None: the default provider). Not an API
    # parameter, and not in the fingerprint: an edit bought through one provider is the same
    # edit through another, and is reused rather than bought twice.
    provider: str | None = None

    @property
    def ext(self) -> str:
        return "jpg" if self.output_format == "jpeg" else self.output_format

    def api_params(self) -> dict[str, Any]:
        """Keyword arguments for `client.images.edit`, apart from the files."""
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "n": self.n,
            "size": self.size,
            "quality": self.quality,
            "output_format": self.output_format,
        }
        for name in (
            "input_fidelity",
            "background",
            "output_compression",
            "complexity",
            "frame_count",
            "frame_duration_ms",
        ):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        svg = self.svg_object()
        if svg is not None:
            params["svg"] = svg
        return params

    def svg_object(self) -> dict[str, Any] | None:
        """The SDK's `svg` parameter ({"model", "reasoning": {"effort"}}), or None to omit it."""
        if self.svg_model is None and self.svg_effort is None:
            return None
        svg: dict[str, Any] = {}
        if self.svg_model is not None:
            svg["model"] = self.svg_model
        if self.svg_effort is not None:
            svg["reasoning"] = {"effort": self.svg_effort}
        return svg

    def to_json(self) -> str:
        # Not dataclasses.asdict: it deep-copies, which shows at 100,000 rows.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EditSpec:
        data = json.loads(text)
        data["images"] = tuple(data["images"])
        return cls(**data)

    def fingerprint(self, file_digests: dict[str, str]) -> str:
        """A hash of what the API sees: file bytes (by digest), prompt, model and parameters.

        Two jobs with the same fingerprint would buy the same edit twice.
        """
        payload = {
            "images": [file_digests[p] for p in self.images],
            "mask": file_digests[self.mask] if self.mask else None,
            "markup": file_digests[self.markup] if self.markup else None,
            "params": self.api_params(),
            "mask_mode": self.mask_mode,
            "mask_feather": self.mask_feather if self.mask_mode == "strict" else 0,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()
