"""Inputs go up once, and come down when nobody needs them.

Each distinct input image, mask or markup is uploaded once (purpose `user_data`), keyed by the
sha256 of its bytes in `provider_files`, and reused by every line that sends those bytes, in
any batch, while the provider still has the file (checked against the provider's listing
before it is reused). Which provider batches use which files is kept in
`provider_batch_files`: after a provider batch is collected, its JSONL input, output and error
files are deleted; when its batch is finished (or cancelled and collected), every input it
uploaded that no open provider batch still uses is deleted too (a line sent again in a later
provider batch of the same batch still finds its input). Unless the batch keeps its provider
files; the provider itself deletes batch output files after 30 days. A file deleted under a
line anyway comes back as an `input_file_gone` answer: the file is forgotten, uploaded again,
and the line sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from pipeline.db.models import ProviderBatch, ProviderBatchFile, ProviderFile, utcnow
from pipeline.errors import ProviderError
from pipeline.files import file_sha256
from pipeline.run.batchroute.api import INPUT_PURPOSE
from pipeline.run.batchroute.context import RouteContext
from pipeline.states import PROVIDER_OPEN

log = logging.getLogger("editbatch.batchroute")

CHUNK = 500


def upload_inputs(
    ctx: RouteContext, pb_id: int, paths: Iterable[str], keep_lease: Callable[[], None]
) -> dict[str, str]:
    """path -> file id for every path, uploading only bytes the provider does not have yet;
    the files are linked to provider batch `pb_id`. `keep_lease` runs after each upload."""
    digests: dict[str, str] = {}
    for path in paths:
        if path not in digests:
            digests[path] = file_sha256(path)
    live = _live_files(ctx, set(digests.values()))
    ids: dict[str, int] = {}  # sha256 -> provider_files.id
    file_ids: dict[str, str] = {}  # sha256 -> provider file id
    for sha, (row_id, file_id) in live.items():
        ids[sha], file_ids[sha] = row_id, file_id
    for path, sha in digests.items():
        if sha in file_ids:
            continue
        row_id, file_id = _upload(ctx, Path(path), sha)
        ids[sha], file_ids[sha] = row_id, file_id
        keep_lease()
    _link(ctx, pb_id, set(ids.values()))
    return {path: file_ids[sha] for path, sha in digests.items()}


def _live_files(ctx: RouteContext, shas: set[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (row id, file id) of uploads we can reuse: recorded, and still at the
    provider (a file it no longer lists is marked deleted, and uploaded again)."""
    found: dict[str, tuple[int, str]] = {}
    ordered = sorted(shas)
    with ctx.deps.db.session() as session:
        for i in range(0, len(ordered), CHUNK):
            for row_id, sha, file_id in session.execute(
                select(ProviderFile.id, ProviderFile.sha256, ProviderFile.file_id).where(
                    ProviderFile.sha256.in_(ordered[i : i + CHUNK]),
                    ProviderFile.deleted_at.is_(None),
                )
            ):
                found[sha] = (row_id, file_id)
    if not found:
        return found
    present = ctx.api.file_ids(INPUT_PURPOSE)
    gone = [row_id for row_id, file_id in found.values() if file_id not in present]
    if gone:
        with ctx.deps.db.session() as session:
            session.execute(
                update(ProviderFile)
                .where(ProviderFile.id.in_(gone), ProviderFile.deleted_at.is_(None))
                .values(deleted_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            session.commit()
        log.info("%s uploaded inputs are gone at the provider; uploading them again", len(gone))
    return {sha: v for sha, v in found.items() if v[0] not in set(gone)}


def _upload(ctx: RouteContext, path: Path, sha: str) -> tuple[int, str]:
    """Upload one input and record it; if another process recorded the same bytes first, use
    theirs and delete ours."""
    file_id, size = ctx.api.upload(path, INPUT_PURPOSE)
    with ctx.deps.db.session() as session:
        row = ProviderFile(sha256=sha, file_id=file_id, bytes=size, purpose=INPUT_PURPOSE)
        session.add(row)
        try:
            session.commit()
            return row.id, file_id
        except IntegrityError:
            session.rollback()
        theirs = session.execute(
            select(ProviderFile.id, ProviderFile.file_id).where(
                ProviderFile.sha256 == sha, ProviderFile.deleted_at.is_(None)
            )
        ).one()
    delete_quietly(ctx, file_id)
    return int(theirs.id), str(theirs.file_id)


def _link(ctx: RouteContext, pb_id: int, row_ids: set[int]) -> None:
    with ctx.deps.db.session() as session:
        linked = set(
            session.scalars(
                select(ProviderBatchFile.provider_file_id).where(
                    ProviderBatchFile.provider_batch_id == pb_id
                )
            )
        )
        for row_id in sorted(row_ids - linked):
            session.add(ProviderBatchFile(provider_batch_id=pb_id, provider_file_id=row_id))
        session.commit()


def forget_file(ctx: RouteContext, file_id: str) -> None:
    """The provider no longer has `file_id` (a line said so): upload its bytes again next time."""
    with ctx.deps.db.session() as session:
        session.execute(
            update(ProviderFile)
            .where(ProviderFile.file_id == file_id, ProviderFile.deleted_at.is_(None))
            .values(deleted_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()


def delete_quietly(ctx: RouteContext, file_id: str | None) -> None:
    if not file_id:
        return
    try:
        ctx.api.delete_file(file_id)
    except ProviderError as exc:  # left for the provider's own retention; nothing is lost
        log.warning("could not delete provider file %s: %s", file_id, exc)


def clean_up(ctx: RouteContext, pb: ProviderBatch) -> None:
    """Delete a collected provider batch's JSONL input, output and error files."""
    for file_id in (pb.input_file_id, pb.output_file_id, pb.error_file_id):
        delete_quietly(ctx, file_id)


def clean_inputs(ctx: RouteContext, batch_id: int) -> int:
    """Delete the inputs a finished (or cancelled and collected) batch uploaded that no open
    provider batch uses any more; how many were deleted."""
    other = aliased(ProviderBatchFile)
    open_use = (
        select(other.provider_file_id)
        .join(ProviderBatch, ProviderBatch.id == other.provider_batch_id)
        .where(
            other.provider_file_id == ProviderFile.id,
            ProviderBatch.state.in_(list(PROVIDER_OPEN)),
        )
    )
    deleted = 0
    with ctx.deps.db.session() as session:
        candidates = list(
            session.execute(
                select(ProviderFile.id, ProviderFile.file_id)
                .join(ProviderBatchFile, ProviderBatchFile.provider_file_id == ProviderFile.id)
                .join(ProviderBatch, ProviderBatch.id == ProviderBatchFile.provider_batch_id)
                .where(ProviderBatch.batch_id == batch_id, ProviderFile.deleted_at.is_(None))
                .distinct()
            )
        )
    for row_id, file_id in candidates:
        with ctx.deps.db.session() as session:
            result = session.execute(
                update(ProviderFile)
                .where(
                    ProviderFile.id == row_id,
                    ProviderFile.deleted_at.is_(None),
                    ~exists(open_use),
                )
                .values(deleted_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            session.commit()
        if getattr(result, "rowcount", 0) == 1:
            delete_quietly(ctx, file_id)
            deleted += 1
    return deleted
