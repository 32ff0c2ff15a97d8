"""Turn an edit request's fields (params.py: multipart or JSON) into a checked EditRequest, or
raise the ApiError the real API would. The same rules serve sync edits and Batch API lines.

Order of checks: field names -> model (unknown, gone, key, verification) -> prompt -> n ->
quality -> per-model refusals -> input_fidelity -> output options (background, format,
compression, GIF/SVG access and options) -> other scalars -> images -> mask/markup -> size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import IO

from pipeline.sandbox import images
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import ApiError, bad_request
from pipeline.sandbox.models import (
    DEFAULT_MODEL,
    MAX_ASPECT,
    MAX_LONG_EDGE,
    MAX_SHORT_EDGE,
    SIZE_MULTIPLE,
    Access,
    Model,
    ModelRules,
    resolve,
)
from pipeline.sandbox.params import JsonParams, Params, Source, SvgOptions

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_N = 10
INPUT_MIMETYPES = ("image/jpeg", "image/png", "image/webp")
OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "svg")
COMPLEXITIES = ("low", "medium", "high")
SVG_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

FRAME_COUNT_MIN, FRAME_COUNT_MAX, FRAME_COUNT_DEFAULT = 2, 16, 9
FRAME_DURATION_DEFAULT_MS = 200
FRAME_DURATION_STEP_MS = 10
FRAME_DURATION_MAX_MS = 655_350  # the SDK: "caps the encoded delay at 655,350 ms per frame"
# Not published ("the selected model's GIF size limits"): the sandbox's own choice.
GIF_MAX_EDGE = 1536

_SIZE = re.compile(r"^(\d+)x(\d+)$")
# GPT-image-only parameters that dall-e-2 refuses.
_GPT_ONLY = (
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "complexity",
    "partial_images",
    "frame_count",
    "frame_duration_ms",
)


@dataclass(frozen=True)
class Policy:
    """What the config and the key allow one request: models, and GIF/SVG preview access."""

    access: Access
    gif_models: frozenset[str]
    svg_models: frozenset[str]

    @classmethod
    def of(cls, config: SandboxConfig, key: str | None) -> Policy:
        return cls(
            Access.of(config, key), frozenset(config.gif_models), frozenset(config.svg_models)
        )


@dataclass(frozen=True)
class Upload:
    file: IO[bytes]
    info: images.ImageInfo


@dataclass(frozen=True)
class EditRequest:
    """A request that passed validation; `quality` and `size` are resolved (no `auto`).

    `frame_count` is 1 except for GIF output; `frame_duration_ms` is set only for GIF output and
    already rounded to 10 ms.
    """

    model: str
    prompt: str
    images: list[Upload]
    mask: Upload | None
    n: int
    quality: str
    size: tuple[int, int]
    input_fidelity: str | None
    background: str
    output_format: str
    output_compression: int | None
    complexity: str | None = None
    frame_count: int = 1
    frame_duration_ms: int | None = None
    svg: SvgOptions | None = None
    per_image_pricing: bool = False

    @property
    def size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


@dataclass(frozen=True)
class _Output:
    background: str
    format: str
    compression: int | None
    frame_count: int
    frame_duration_ms: int | None
    svg: SvgOptions | None


def _quote_list(values: tuple[str, ...] | list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _invalid_value(param: str, value: str, allowed: tuple[str, ...]) -> ApiError:
    return bad_request(
        f"Invalid value: '{value}'. Supported values are: {_quote_list(allowed)}.", param=param
    )


def _unsupported(param: str, why: str) -> ApiError:
    return bad_request(
        f"Unsupported parameter: '{param}' is not supported {why}.",
        param=param,
        code="unsupported_parameter",
    )


def _choice(params: Params, name: str, allowed: tuple[str, ...]) -> str | None:
    value = params.text(name)
    if value is not None and value not in allowed:
        raise _invalid_value(name, value, allowed)
    return value


def _model(params: Params, access: Access) -> Model:
    name = params.text("model") or DEFAULT_MODEL
    model = resolve(name, access)
    if model.rules is None:
        raise bad_request(f"The model `{name}` does not support image edits.", param="model")
    if isinstance(params, JsonParams) and not model.gpt_image:
        raise bad_request(
            f"JSON edits support GPT image models only; `{name}` edits need a multipart body.",
            param="model",
        )
    return model


def _prompt(params: Params, max_chars: int) -> str:
    prompt = params.text("prompt")
    if prompt is None:
        raise bad_request(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if not prompt:
        raise bad_request(
            "Invalid 'prompt': empty string. Expected a string with minimum length 1.",
            param="prompt",
            code="empty_string",
        )
    if len(prompt) > max_chars:
        raise bad_request(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{max_chars}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    return prompt


def _size_of(fp: IO[bytes]) -> int:
    fp.seek(0, 2)
    size = fp.tell()
    fp.seek(0)
    return size


def _upload(source: Source, allowed: tuple[str, ...], max_bytes: int, limit_text: str) -> Upload:
    param = source.param
    file = source.opener()
    mimetype = images.sniff(file)
    if mimetype not in allowed:
        raise bad_request(
            f"Invalid file '{param}': unsupported mimetype ('{mimetype}'). Supported file formats "
            f"are {_quote_list(list(allowed))}.",
            param=param,
            code="unsupported_file_mimetype",
        )
    size = _size_of(file)
    if size >= max_bytes:
        raise bad_request(
            f"Invalid file '{param}': the file must be less than {limit_text}, but it has "
            f"{size} bytes.",
            param=param,
        )
    try:
        return Upload(file, images.inspect(file, mimetype))
    except images.UnreadableImage as exc:
        raise bad_request(
            f"Invalid file '{param}': the image could not be decoded ({exc}).",
            param=param,
            code="invalid_image",
        ) from exc


def _images(params: Params, model: str, rules: ModelRules) -> list[Upload]:
    name = params.images_param
    sources = params.images()
    if sources is None:
        raise bad_request(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if len(sources) > rules.max_images:
        raise bad_request(
            f"Invalid '{name}': array too long. Expected an array with maximum length "
            f"{rules.max_images}, but got an array with length {len(sources)} instead.",
            param=name,
            code="array_above_max_length",
        )
    if not rules.gpt_params:  # dall-e-2: one square PNG under 4 MB
        upload = _upload(sources[0], ("image/png",), MAX_MASK_BYTES, "4MB")
        if upload.info.width != upload.info.height:
            raise bad_request(
                f"Invalid input image - {model} edits need a square image, got "
                f"{upload.info.width}x{upload.info.height}.",
                param=sources[0].param,
            )
        return [upload]
    return [_upload(source, INPUT_MIMETYPES, MAX_IMAGE_BYTES, "50MB") for source in sources]


def _guide(params: Params, name: str, first: Upload) -> Upload | None:
    """The mask or markup file: a PNG with alpha, the same dimensions as the first image."""
    source = params.guide(name)
    if source is None:
        return None
    upload = _upload(source, ("image/png",), MAX_MASK_BYTES, "4MB")
    if not upload.info.has_alpha:
        raise bad_request(
            f"Invalid {name} image format - {name} image missing alpha channel.", param=name
        )
    got = (upload.info.width, upload.info.height)
    want = (first.info.width, first.info.height)
    if got != want:
        raise bad_request(
            f"Invalid {name} image format - {name} size {got[0]}x{got[1]} does not match image "
            f"size {want[0]}x{want[1]}.",
            param=name,
        )
    return upload


def nearest_standard_size(width: int, height: int) -> tuple[int, int]:
    """`size=auto`: the standard size whose aspect ratio is nearest the first image's."""
    aspect = math.log(width / height)
    sizes = [(1024, 1024), (1536, 1024), (1024, 1536)]
    best = min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - aspect))
    return best[0], best[1]


def _size(params: Params, rules: ModelRules, first: Upload) -> tuple[int, int]:
    value = params.text("size")
    if value is None and not rules.auto_size:
        value = rules.fixed_sizes[-1]
    if value is None or (value == "auto" and rules.auto_size):
        return nearest_standard_size(first.info.width, first.info.height)
    if not rules.custom_sizes:
        if value not in rules.fixed_sizes:
            allowed = (*rules.fixed_sizes, "auto") if rules.auto_size else rules.fixed_sizes
            raise _invalid_value("size", value, allowed)
        width, height = (int(p) for p in value.split("x"))
        return width, height
    match = _SIZE.match(value)
    if not match:
        raise bad_request(
            f"Invalid size '{value}'. Use 'auto' or WIDTHxHEIGHT, e.g. '1536x864'.", param="size"
        )
    width, height = int(match[1]), int(match[2])
    problem = None
    if width == 0 or height == 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        problem = f"width and height must both be positive multiples of {SIZE_MULTIPLE}"
    elif max(width, height) > MAX_ASPECT * min(width, height):
        problem = f"the aspect ratio must be between 1:{MAX_ASPECT} and {MAX_ASPECT}:1"
    elif max(width, height) > MAX_LONG_EDGE or min(width, height) > MAX_SHORT_EDGE:
        problem = f"the maximum supported resolution is {MAX_LONG_EDGE}x{MAX_SHORT_EDGE}"
    if problem:
        raise bad_request(f"Invalid size '{value}': {problem}.", param="size")
    return width, height


def _fidelity(params: Params, model: str, rules: ModelRules) -> str | None:
    value = params.text("input_fidelity")
    if value is None:
        return None
    if rules.fidelity is None:
        raise bad_request(
            f"'input_fidelity' is not supported with model '{model}'; omit it.",
            param="input_fidelity",
            code="unsupported_parameter",
        )
    if value not in rules.fidelity:
        raise _invalid_value("input_fidelity", value, rules.fidelity)
    return value


def _complexity(params: Params, model: str, rules: ModelRules) -> str | None:
    value = _choice(params, "complexity", COMPLEXITIES)
    if value is not None and not rules.complexity:
        raise bad_request(
            f"Invalid 'complexity': it is not supported with model '{model}' (GPT Image 2 and "
            "later models only); omit it.",
            param="complexity",
        )
    return value


def frame_duration(requested: int) -> int:
    """Rounded half up to 10 ms, at least 10 ms, capped at 655,350 ms."""
    step = FRAME_DURATION_STEP_MS
    rounded = (requested + step // 2) // step * step
    return max(step, min(FRAME_DURATION_MAX_MS, rounded))


def _gif(params: Params, output_format: str) -> tuple[int, int | None]:
    """frame_count and frame_duration_ms (1 and None unless the output is a GIF)."""
    if output_format != "gif":
        for name in ("frame_count", "frame_duration_ms"):
            if params.present(name):
                raise _unsupported(name, "here: it is only supported with output_format 'gif'")
        return 1, None
    for name in ("mask", "partial_images"):
        if params.present(name):
            raise _unsupported(name, "with output_format 'gif'")
    count = params.integer("frame_count", FRAME_COUNT_MIN, FRAME_COUNT_MAX)
    duration = params.integer("frame_duration_ms", 1, None)
    return (
        FRAME_COUNT_DEFAULT if count is None else count,
        frame_duration(FRAME_DURATION_DEFAULT_MS if duration is None else duration),
    )


def _svg(params: Params, output_format: str, n: int) -> SvgOptions | None:
    svg = params.svg()
    if output_format != "svg":
        if svg is not None:
            raise _unsupported("svg", "here: it is only supported with output_format 'svg'")
        return None
    if n != 1:
        raise bad_request(f"Invalid 'n': SVG output requires n=1, got {n}.", param="n")
    if params.present("partial_images"):
        raise _unsupported("partial_images", "with output_format 'svg'")
    if svg is None:
        return None
    if svg.model is not None and not svg.model:
        raise bad_request("Invalid 'svg.model': empty string.", param="svg.model")
    if svg.effort is not None and svg.effort not in SVG_EFFORTS:
        raise _invalid_value("svg.reasoning.effort", svg.effort, SVG_EFFORTS)
    return svg


def _output(params: Params, model: str, n: int, policy: Policy) -> _Output:
    background = _choice(params, "background", ("transparent", "opaque", "auto")) or "auto"
    output_format = _choice(params, "output_format", OUTPUT_FORMATS) or "png"
    if output_format == "gif" and model not in policy.gif_models:
        raise bad_request(
            f"output_format 'gif' needs access to the GIF preview for model '{model}'.",
            param="output_format",
        )
    if output_format == "svg" and model not in policy.svg_models:
        raise bad_request(
            f"output_format 'svg' needs project access to SVG output for model '{model}'.",
            param="output_format",
        )
    if background == "transparent" and output_format not in ("png", "webp"):
        raise bad_request(
            "Transparent background requires output_format 'png' or 'webp'.", param="background"
        )
    compression = params.integer("output_compression", 0, 100)
    if compression is not None and output_format not in ("jpeg", "webp"):
        raise bad_request(
            "'output_compression' is only supported with output_format 'jpeg' or 'webp'.",
            param="output_compression",
        )
    frame_count, duration = _gif(params, output_format)
    svg = _svg(params, output_format, n)
    return _Output(background, output_format, compression, frame_count, duration, svg)


def _other_scalars(params: Params, rules: ModelRules) -> None:
    _choice(params, "moderation", ("low", "auto"))
    params.integer("partial_images", 0, 3)
    params.text("safety_identifier")
    params.text("user")
    if rules.gpt_params:
        if params.present("response_format"):
            raise _unsupported(
                "response_format",
                "here: GPT image models always return base64-encoded images",
            )
    else:
        # dall-e-2 took url or b64_json; the sandbox answers base64 either way (docs/sandbox.md).
        _choice(params, "response_format", ("url", "b64_json"))
    if params.boolean("stream"):
        raise bad_request(
            "Streaming is not supported by the sandbox; omit 'stream' or set it to false.",
            param="stream",
            code="unsupported_value",
        )


def _markup(
    params: Params, model: str, rules: ModelRules, mask: Upload | None, first: Upload
) -> None:
    if not params.present("markup"):
        return
    if not rules.markup:
        raise bad_request(
            f"'markup' is not supported with model '{model}'.",
            param="markup",
            code="unsupported_parameter",
        )
    if mask is not None:
        raise bad_request("'markup' cannot be combined with 'mask'.", param="markup")
    markup = _guide(params, "markup", first)
    if markup is not None and not images.has_transparent_pixel(markup.file):
        raise bad_request("Invalid markup image - it has no transparent pixels.", param="markup")


def validate(params: Params, policy: Policy) -> EditRequest:
    """Check every field like the real endpoint; blocking file reads, so call it in a thread."""
    params.check_names()
    model = _model(params, policy.access)
    name, rules = model.name, model.rules
    assert rules is not None  # _model refuses models that cannot edit
    prompt = _prompt(params, rules.max_prompt_chars)
    n = params.integer("n", 1, MAX_N) or 1
    requested_quality = _choice(params, "quality", rules.qualities) or "auto"
    if not rules.gpt_params:
        for field in (*_GPT_ONLY, "svg"):
            if params.present(field) or (field == "svg" and params.svg() is not None):
                raise _unsupported(field, f"with model '{name}'")
    fidelity = _fidelity(params, name, rules)
    output = _output(params, name, n, policy)
    complexity = _complexity(params, name, rules)
    _other_scalars(params, rules)

    uploads = _images(params, name, rules)
    mask = _guide(params, "mask", uploads[0])
    _markup(params, name, rules, mask, uploads[0])
    size = _size(params, rules, uploads[0])
    if output.format == "gif" and max(size) > GIF_MAX_EDGE:
        raise bad_request(
            f"Invalid size '{size[0]}x{size[1]}': GIF output supports at most "
            f"{GIF_MAX_EDGE} pixels on either side.",
            param="size",
        )
    if requested_quality == "auto":
        quality = "medium" if rules.gpt_params else "standard"
    else:
        quality = requested_quality
    return EditRequest(
        model=name,
        prompt=prompt,
        images=uploads,
        mask=mask,
        n=n,
        quality=quality,
        size=size,
        input_fidelity=fidelity,
        background=output.background,
        output_format=output.format,
        output_compression=output.compression,
        complexity=complexity,
        frame_count=output.frame_count,
        frame_duration_ms=output.frame_duration_ms,
        svg=output.svg,
        per_image_pricing=not rules.gpt_params,
    )
