"""The answer to a valid edit: its usage, its cost and the ImagesResponse body (shared by the
sync endpoint and Batch API lines)."""

from __future__ import annotations

import base64
import time
from decimal import Decimal
from typing import Any

from starlette.concurrency import run_in_threadpool

from pipeline.sandbox import tokens
from pipeline.sandbox.errors import bad_request
from pipeline.sandbox.images import EditJob, render
from pipeline.sandbox.validation import EditRequest

BATCH_PRICE_FACTOR = Decimal("0.5")


def usage_for(edit: EditRequest) -> dict[str, Any] | None:
    """The response's `usage`; None for per-image-priced models (dall-e-2 answered without)."""
    if edit.per_image_pricing:
        return None
    return tokens.usage(
        prompt=edit.prompt,
        input_sizes=[(u.info.width, u.info.height) for u in edit.images],
        input_fidelity=edit.input_fidelity,
        output_size=edit.size,
        quality=edit.quality,
        n=edit.n,
        frames=edit.frame_count,
    )


def cost_for(
    edit: EditRequest, usage: dict[str, Any] | None, factor: Decimal = Decimal(1)
) -> Decimal:
    """What an answer is billed: a sync answer rounded to the micro-dollar, a batch line
    (`factor` below 1) exactly."""
    if usage is None:
        return tokens.per_image_cost(edit.model, edit.size_text, edit.n, factor)
    return tokens.cost_usd(edit.model, usage, factor, exact=factor != 1)


def corrupt_b64(value: str) -> str:
    """Base64 no decoder accepts: 4k+1 alphabet characters (padding cannot fix that) and a '!'."""
    core = value.rstrip("=")[:-1]
    core = core[: len(core) - (len(core) - 1) % 4]
    return core + "!"


async def images_response(
    edit: EditRequest,
    usage: dict[str, Any] | None,
    *,
    drift: float,
    seed: int,
    bad_b64: bool = False,
) -> dict[str, Any]:
    """Render the images (in a thread) and build the ImagesResponse payload."""
    job = EditJob(
        image=edit.images[0].file,
        mask=edit.mask.file if edit.mask else None,
        size=edit.size,
        output_format=edit.output_format,
        output_compression=edit.output_compression,
        background=edit.background,
        prompt=edit.prompt,
        n=edit.n,
        drift=drift,
        seed=seed,
        frame_count=edit.frame_count,
        frame_duration_ms=edit.frame_duration_ms,
    )
    try:
        rendered = await run_in_threadpool(render, job)
    except (OSError, ValueError) as exc:
        # Validation reads only headers; a body that does not decode shows up here.
        raise bad_request(
            f"Invalid image file: it could not be decoded ({exc}).",
            param="image",
            code="invalid_image",
        ) from exc
    background = rendered.background
    encoded = [base64.b64encode(image).decode("ascii") for image in rendered.images]
    del rendered  # keep one copy of the images (base64) in memory, not two
    if bad_b64:
        encoded = [corrupt_b64(value) for value in encoded]
    payload: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": value} for value in encoded],
    }
    if edit.per_image_pricing:  # dall-e-2 answered `created` and `data` only
        return payload
    payload.update(
        {
            "background": background,
            "output_format": edit.output_format,
            "quality": edit.quality,
            "size": edit.size_text,
            "usage": usage,
        }
    )
    return payload
