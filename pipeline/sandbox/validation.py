"""Turn a multipart form into a checked EditRequest, or raise the ApiError the real API would."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import IO

from starlette.datastructures import FormData, UploadFile

from pipeline.sandbox import images
from pipeline.sandbox.errors import ApiError, bad_request
from pipeline.sandbox.models import (
    DEFAULT_MODEL,
    FIXED_SIZES,
    MAX_ASPECT,
    MAX_LONG_EDGE,
    MAX_SHORT_EDGE,
    SIZE_MULTIPLE,
    Access,
    ModelRules,
    resolve,
)

MAX_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_PROMPT_CHARS = 32_000
MAX_N = 10
INPUT_MIMETYPES = ("image/jpeg", "image/png", "image/webp")

_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_INTEGER = re.compile(r"^[+-]?\d+$")

SCALAR_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "input_fidelity",
        "background",
        "output_format",
        "output_compression",
        "moderation",
        "safety_identifier",
        "user",
        "partial_images",
        "stream",
        "response_format",
        "complexity",
        "frame_count",
        "frame_duration_ms",
    }
)
FILE_FIELDS = frozenset({"mask", "markup"})


@dataclass(frozen=True)
class Upload:
    file: IO[bytes]
    info: images.ImageInfo


@dataclass(frozen=True)
class EditRequest:
    """A request that passed validation; `quality` and `size` are resolved (no `auto`)."""

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

    @property
    def size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


def _quote_list(values: tuple[str, ...] | list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _invalid_value(param: str, value: str, allowed: tuple[str, ...]) -> ApiError:
    return bad_request(
        f"Invalid value: '{value}'. Supported values are: {_quote_list(allowed)}.", param=param
    )


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(
            f"Invalid type for '{name}': expected a string, but got a file instead.",
            param=name,
            code="invalid_type",
        )
    return value


def _integer(form: FormData, name: str, low: int, high: int) -> int | None:
    text = _text(form, name)
    if text is None:
        return None
    if not _INTEGER.match(text.strip()):
        raise bad_request(
            f"Invalid type for '{name}': expected an integer, but got a string instead.",
            param=name,
            code="invalid_type",
        )
    value = int(text)
    if value < low:
        raise bad_request(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise bad_request(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _choice(form: FormData, name: str, allowed: tuple[str, ...]) -> str | None:
    value = _text(form, name)
    if value is not None and value not in allowed:
        raise _invalid_value(name, value, allowed)
    return value


def _boolean(form: FormData, name: str) -> bool:
    value = _text(form, name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise bad_request(
        f"Invalid type for '{name}': expected a boolean, but got a string instead.",
        param=name,
        code="invalid_type",
    )


def check_parameter_names(form: FormData) -> None:
    for name in form:
        if name in SCALAR_FIELDS or name in FILE_FIELDS or _IMAGE_FIELD.match(name):
            continue
        if name.startswith("svg["):
            raise bad_request(
                "'svg' is only supported with output_format 'svg', which needs project access "
                "the sandbox does not grant.",
                param="svg",
                code="unsupported_parameter",
            )
        raise bad_request(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def check_model(form: FormData, access: Access) -> tuple[str, ModelRules]:
    name = _text(form, "model") or DEFAULT_MODEL
    model = resolve(name, access)
    if model.rules is None:
        raise bad_request(f"The model `{name}` does not support image edits.", param="model")
    return name, model.rules


def _prompt(form: FormData) -> str:
    prompt = _text(form, "prompt")
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
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_request(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    return prompt


def _file(value: str | UploadFile, param: str) -> UploadFile:
    if isinstance(value, str):
        raise bad_request(
            f"Invalid type for '{param}': expected a file, but got a string instead.",
            param=param,
            code="invalid_type",
        )
    return value


def _size_of(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


def _upload(
    upload: UploadFile, param: str, allowed: tuple[str, ...], max_bytes: int, limit_text: str
) -> Upload:
    mimetype = images.sniff(upload.file)
    if mimetype not in allowed:
        raise bad_request(
            f"Invalid file '{param}': unsupported mimetype ('{mimetype}'). Supported file formats "
            f"are {_quote_list(list(allowed))}.",
            param=param,
            code="unsupported_file_mimetype",
        )
    size = _size_of(upload)
    if size >= max_bytes:
        raise bad_request(
            f"Invalid file '{param}': the file must be less than {limit_text}, but it has "
            f"{size} bytes.",
            param=param,
        )
    return Upload(upload.file, images.inspect(upload.file, mimetype))


def _checked_upload(
    upload: UploadFile, param: str, allowed: tuple[str, ...], max_bytes: int, limit_text: str
) -> Upload:
    try:
        return _upload(upload, param, allowed, max_bytes, limit_text)
    except images.UnreadableImage as exc:
        raise bad_request(
            f"Invalid file '{param}': the image could not be decoded ({exc}).",
            param=param,
            code="invalid_image",
        ) from exc


def _images(form: FormData) -> list[Upload]:
    values = [v for k, v in form.multi_items() if _IMAGE_FIELD.match(k)]
    if not values:
        raise bad_request(
            "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    if len(values) > MAX_IMAGES:
        raise bad_request(
            f"Invalid 'image': array too long. Expected an array with maximum length {MAX_IMAGES}, "
            f"but got an array with length {len(values)} instead.",
            param="image",
            code="array_above_max_length",
        )
    uploads = []
    for index, value in enumerate(values):
        param = "image" if len(values) == 1 else f"image[{index}]"
        upload = _file(value, param)
        uploads.append(_checked_upload(upload, param, INPUT_MIMETYPES, MAX_IMAGE_BYTES, "50MB"))
    return uploads


def _guide(form: FormData, name: str, first: Upload) -> Upload | None:
    """The mask or markup file: a PNG with alpha, the same dimensions as the first image."""
    value = form.get(name)
    if value is None:
        return None
    upload = _checked_upload(_file(value, name), name, ("image/png",), MAX_MASK_BYTES, "4MB")
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
    sizes = [tuple(int(p) for p in s.split("x")) for s in FIXED_SIZES]
    best = min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - aspect))
    return best[0], best[1]


def _size(form: FormData, rules: ModelRules, first: Upload) -> tuple[int, int]:
    value = _text(form, "size")
    if value is None or value == "auto":
        return nearest_standard_size(first.info.width, first.info.height)
    if not rules.custom_sizes:
        if value not in FIXED_SIZES:
            raise _invalid_value("size", value, (*FIXED_SIZES, "auto"))
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


def _fidelity(form: FormData, model: str, rules: ModelRules) -> str | None:
    value = _text(form, "input_fidelity")
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


def _output(form: FormData) -> tuple[str, str, int | None]:
    """background, output_format, output_compression."""
    background = _choice(form, "background", ("transparent", "opaque", "auto")) or "auto"
    output_format = _text(form, "output_format") or "png"
    if output_format in ("gif", "svg"):
        raise bad_request(
            f"output_format '{output_format}' needs project access the sandbox does not grant.",
            param="output_format",
        )
    if output_format not in ("png", "webp", "jpeg"):
        raise _invalid_value("output_format", output_format, ("png", "jpeg", "webp"))
    if background == "transparent" and output_format == "jpeg":
        raise bad_request(
            "Transparent background requires output_format 'png' or 'webp'.", param="background"
        )
    compression = _integer(form, "output_compression", 0, 100)
    if compression is not None and output_format == "png":
        raise bad_request(
            "'output_compression' is only supported with output_format 'jpeg' or 'webp'.",
            param="output_compression",
        )
    return background, output_format, compression


def _unsupported(form: FormData) -> None:
    for name, why in (
        ("response_format", "GPT image models always return base64-encoded images"),
        ("frame_count", "it is only supported with output_format 'gif'"),
        ("frame_duration_ms", "it is only supported with output_format 'gif'"),
    ):
        if name in form:
            raise bad_request(
                f"Unsupported parameter: '{name}' is not supported here: {why}.",
                param=name,
                code="unsupported_parameter",
            )
    if _boolean(form, "stream"):
        raise bad_request(
            "Streaming is not supported by the sandbox; omit 'stream' or set it to false.",
            param="stream",
            code="unsupported_value",
        )


def validate(form: FormData, access: Access) -> EditRequest:
    """Check every field like the real endpoint; blocking file reads, so call it in a thread."""
    check_parameter_names(form)
    model, rules = check_model(form, access)
    prompt = _prompt(form)
    n = _integer(form, "n", 1, MAX_N) or 1
    requested_quality = _choice(form, "quality", rules.qualities) or "auto"
    fidelity = _fidelity(form, model, rules)
    background, output_format, compression = _output(form)
    _choice(form, "moderation", ("low", "auto"))
    _choice(form, "complexity", ("low", "medium", "high"))
    _integer(form, "partial_images", 0, 3)
    _text(form, "safety_identifier")
    _text(form, "user")
    _unsupported(form)

    uploads = _images(form)
    mask = _guide(form, "mask", uploads[0])
    if "markup" in form:
        if not rules.markup:
            raise bad_request(
                f"'markup' is not supported with model '{model}'.",
                param="markup",
                code="unsupported_parameter",
            )
        if mask is not None:
            raise bad_request("'markup' cannot be combined with 'mask'.", param="markup")
        markup = _guide(form, "markup", uploads[0])
        if markup is not None and not images.has_transparent_pixel(markup.file):
            raise bad_request(
                "Invalid markup image - it has no transparent pixels.", param="markup"
            )
    size = _size(form, rules, uploads[0])
    return EditRequest(
        model=model,
        prompt=prompt,
        images=uploads,
        mask=mask,
        n=n,
        quality="medium" if requested_quality == "auto" else requested_quality,
        size=size,
        input_fidelity=fidelity,
        background=background,
        output_format=output_format,
        output_compression=compression,
    )
