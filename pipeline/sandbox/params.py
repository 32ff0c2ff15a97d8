"""The fields of one edit request, whatever carried them: a multipart form (`client.images.edit`)
or a JSON body (a Batch API line, or a JSON edit with `images: [{"file_id"} | {"image_url"}]`).

Validation (validation.py) asks a `Params` for typed values and image files; each transport says
how a value of the wrong type is refused. Multipart values are strings (`n=2`, `stream=false`);
JSON values must have their JSON type (`"n": "2"` is `invalid_type`), and null means omitted.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from starlette.datastructures import FormData, UploadFile

from pipeline.sandbox.errors import ApiError, bad_request

MAX_IMAGE_URL_CHARS = 20 * 1024 * 1024  # a data URL counts against this (contract: 20 MiB)

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
GUIDE_FIELDS = ("mask", "markup")
SVG_FIELDS = {"svg[model]": "model", "svg[reasoning][effort]": "effort"}

_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_DATA_URL = re.compile(
    r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.S
)

# Resolves a Files API id to the file on disk, or None if there is no such (live) file.
FileLookup = Callable[[str], Path | None]


@dataclass(frozen=True)
class Source:
    """One image input: the `param` its errors name, and the file (opened lazily)."""

    param: str
    opener: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class SvgOptions:
    model: str | None
    effort: str | None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def invalid_type(name: str, expected: str, got: str) -> ApiError:
    return bad_request(
        f"Invalid type for '{name}': expected {expected}, but got {got} instead.",
        param=name,
        code="invalid_type",
    )


def unknown_parameter(name: str) -> ApiError:
    return bad_request(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


class Params(ABC):
    """Typed access to an edit request's fields; a context manager that closes opened files."""

    images_param = "image"

    def __init__(self) -> None:
        self._opened: list[IO[bytes]] = []

    def __enter__(self) -> Params:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for file in self._opened:
            file.close()
        self._opened.clear()

    @abstractmethod
    def overridden(self, values: Mapping[str, str]) -> Params:
        """These fields with some scalar fields set to `values`; files the copy opens are closed
        with these (e.g. an Azure deployment's model in place of the request's `model`)."""

    def _share_files(self, copy: Params) -> Params:
        copy._opened = self._opened
        return copy

    @abstractmethod
    def check_names(self) -> None:
        """Raise unknown_parameter for the first field the endpoint does not take."""

    @abstractmethod
    def present(self, name: str) -> bool: ...

    @abstractmethod
    def text(self, name: str) -> str | None: ...

    @abstractmethod
    def _int_value(self, name: str) -> int | None: ...

    @abstractmethod
    def boolean(self, name: str) -> bool: ...

    @abstractmethod
    def images(self) -> list[Source] | None:
        """The image inputs in order, or None if the request has none."""

    @abstractmethod
    def guide(self, name: str) -> Source | None:
        """The mask or markup input, if any."""

    @abstractmethod
    def svg(self) -> SvgOptions | None: ...

    def integer(self, name: str, low: int, high: int | None) -> int | None:
        value = self._int_value(name)
        if value is None:
            return None
        if value < low:
            raise bad_request(
                f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, "
                f"but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
        if high is not None and value > high:
            raise bad_request(
                f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, "
                f"but got {value} instead.",
                param=name,
                code="integer_above_max_value",
            )
        return value

    def _keep(self, file: IO[bytes]) -> IO[bytes]:
        self._opened.append(file)
        return file


class FormParams(Params):
    """A multipart form as `client.images.edit(...)` sends it: one image as `image`, several as
    repeated `image[]` (also accepted: repeated `image` and `image[N]`), `svg[model]`."""

    def __init__(self, form: FormData) -> None:
        super().__init__()
        self.form = form

    def overridden(self, values: Mapping[str, str]) -> Params:
        items: list[tuple[str, str | UploadFile]] = [
            (name, value) for name, value in self.form.multi_items() if name not in values
        ]
        items.extend(values.items())
        return self._share_files(FormParams(FormData(items)))

    def check_names(self) -> None:
        for name in self.form:
            known = name in SCALAR_FIELDS or name in GUIDE_FIELDS or name in SVG_FIELDS
            if not known and not _IMAGE_FIELD.match(name):
                raise unknown_parameter(name)

    def present(self, name: str) -> bool:
        return name in self.form

    def text(self, name: str) -> str | None:
        value = self.form.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise invalid_type(name, "a string", "a file")
        return value

    def _int_value(self, name: str) -> int | None:
        text = self.text(name)
        if text is None:
            return None
        if not _INTEGER.match(text.strip()):
            raise invalid_type(name, "an integer", "a string")
        return int(text)

    def boolean(self, name: str) -> bool:
        value = self.text(name)
        if value is None:
            return False
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise invalid_type(name, "a boolean", "a string")

    def _source(self, value: str | UploadFile, param: str) -> Source:
        def opener() -> IO[bytes]:
            if isinstance(value, str):
                raise invalid_type(param, "a file", "a string")
            return value.file

        return Source(param, opener)

    def images(self) -> list[Source] | None:
        values = [v for k, v in self.form.multi_items() if _IMAGE_FIELD.match(k)]
        if not values:
            return None
        if len(values) == 1:
            return [self._source(values[0], "image")]
        return [self._source(v, f"image[{i}]") for i, v in enumerate(values)]

    def guide(self, name: str) -> Source | None:
        value = self.form.get(name)
        return None if value is None else self._source(value, name)

    def svg(self) -> SvgOptions | None:
        if not any(name in self.form for name in SVG_FIELDS):
            return None
        return SvgOptions(self.text("svg[model]"), self.text("svg[reasoning][effort]"))


class JsonParams(Params):
    """A JSON edit body: `images: [{"file_id": ...} | {"image_url": ...}]`, `mask: {...}`."""

    images_param = "images"

    def __init__(self, body: dict[str, Any], files: FileLookup) -> None:
        super().__init__()
        self.body = {k: v for k, v in body.items() if v is not None}
        self.files = files

    def overridden(self, values: Mapping[str, str]) -> Params:
        return self._share_files(JsonParams({**self.body, **values}, self.files))

    def check_names(self) -> None:
        for name in self.body:
            if name not in SCALAR_FIELDS and name not in ("images", *GUIDE_FIELDS, "svg"):
                raise unknown_parameter(name)

    def present(self, name: str) -> bool:
        return name in self.body

    def text(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is None or isinstance(value, str):
            return value
        raise invalid_type(name, "a string", _json_type(value))

    def _int_value(self, name: str) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_type(name, "an integer", _json_type(value))
        return value

    def boolean(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            raise invalid_type(name, "a boolean", _json_type(value))
        return value

    def images(self) -> list[Source] | None:
        refs = self.body.get("images")
        if refs is None:
            return None
        if not isinstance(refs, list):
            raise invalid_type("images", "an array", _json_type(refs))
        if not refs:
            raise bad_request(
                "Invalid 'images': empty array. Expected an array with minimum length 1, but "
                "got an empty array instead.",
                param="images",
                code="empty_array",
            )
        return [self._ref(ref, f"images[{i}]") for i, ref in enumerate(refs)]

    def guide(self, name: str) -> Source | None:
        ref = self.body.get(name)
        return None if ref is None else self._ref(ref, name)

    def _ref(self, ref: Any, param: str) -> Source:
        """An ImageRefParam: exactly one of `file_id` or `image_url`, nothing else."""
        if not isinstance(ref, dict):
            raise invalid_type(param, "an object", _json_type(ref))
        for key in ref:
            if key not in ("file_id", "image_url"):
                raise unknown_parameter(f"{param}.{key}")
        if ("file_id" in ref) == ("image_url" in ref):
            raise bad_request(
                f"Invalid '{param}': provide exactly one of 'file_id' or 'image_url'.",
                param=param,
            )
        if "file_id" in ref:
            file_id = ref["file_id"]
            if not isinstance(file_id, str):
                raise invalid_type(f"{param}.file_id", "a string", _json_type(file_id))
            return Source(param, lambda: self._open_file(file_id, f"{param}.file_id"))
        url = ref["image_url"]
        if not isinstance(url, str):
            raise invalid_type(f"{param}.image_url", "a string", _json_type(url))
        return Source(param, lambda: self._open_url(url, f"{param}.image_url"))

    def _open_file(self, file_id: str, param: str) -> IO[bytes]:
        path = self.files(file_id)
        if path is None:
            raise bad_request(f"Invalid file id '{file_id}': no such file.", param=param)
        try:
            return self._keep(path.open("rb"))
        except FileNotFoundError:  # deleted between the lookup and the open
            raise bad_request(f"Invalid file id '{file_id}': no such file.", param=param) from None

    def _open_url(self, url: str, param: str) -> IO[bytes]:
        if len(url) > MAX_IMAGE_URL_CHARS:
            raise bad_request(
                f"Invalid '{param}': string too long. Expected a string with maximum length "
                f"{MAX_IMAGE_URL_CHARS}, but got a string with length {len(url)} instead.",
                param=param,
                code="string_above_max_length",
            )
        if url.startswith(("http://", "https://")):
            raise bad_request(
                f"Invalid '{param}': the sandbox cannot download image URLs (it has no internet). "
                "Upload the image with the Files API and send its file_id, or send a base64 "
                "data URL.",
                param=param,
            )
        match = _DATA_URL.match(url)
        if match is None or ";base64" not in match["params"]:
            raise bad_request(
                f"Invalid '{param}': expected a URL or a base64 data URL "
                "('data:image/png;base64,...').",
                param=param,
            )
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(
                f"Invalid '{param}': the data URL is not valid base64.", param=param
            ) from None
        return io.BytesIO(data)

    def svg(self) -> SvgOptions | None:
        svg = self.body.get("svg")
        if svg is None:
            return None
        if not isinstance(svg, dict):
            raise invalid_type("svg", "an object", _json_type(svg))
        for key in svg:
            if key not in ("model", "reasoning"):
                raise unknown_parameter(f"svg.{key}")
        model = svg.get("model")
        if model is not None and not isinstance(model, str):
            raise invalid_type("svg.model", "a string", _json_type(model))
        reasoning = svg.get("reasoning")
        effort = None
        if reasoning is not None:
            if not isinstance(reasoning, dict):
                raise invalid_type("svg.reasoning", "an object", _json_type(reasoning))
            for key in reasoning:
                if key != "effort":
                    raise unknown_parameter(f"svg.reasoning.{key}")
            effort = reasoning.get("effort")
            if effort is not None and not isinstance(effort, str):
                raise invalid_type("svg.reasoning.effort", "a string", _json_type(effort))
        return SvgOptions(model, effort)
