"""`editbatch export BATCH --approved DEST`: the approved outputs of a batch copied to a shop's
folder or bucket, each verified by sha256.

Names are the outputs' names under their batch's output root; a re-run's outputs (written
under `rerun<N>/`) go out under their row's own name, replacing the rejected original's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from sqlalchemy import select, tuple_

from pipeline.batch.controls import RERUN_FOLDER
from pipeline.db.models import Batch, Job, Output, Review
from pipeline.db.session import Database
from pipeline.errors import EditbatchError, NotFoundError, StorageError
from pipeline.output.collector import StorageCache
from pipeline.output.storage import Storage
from pipeline.states import ReviewDecision

CHUNK = 1000


@dataclass(frozen=True)
class Approved:
    output_id: int
    job_id: int
    uri: str
    sha256: str
    name: str  # where it goes under the destination


def export_name(uri: str, output_root: str, rerun: bool) -> str:
    """The output's name under its batch's output root, without a re-run's rerun<N>/ folder."""
    prefix = Storage(output_root).uri("x")[:-1]  # the root with its separator
    if not uri.startswith(prefix):
        raise EditbatchError(f"output {uri} is not under the batch's output root {output_root}")
    name = uri[len(prefix) :].lstrip("/")
    return RERUN_FOLDER.sub("", name) if rerun else name


def approved_outputs(db: Database, batch_id: int) -> Iterator[Approved]:
    """The approved, collected outputs of a batch in row order, CHUNK at a time."""
    with db.session() as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
        root = batch.output_uri
    last = (0, 0)
    while True:
        with db.session() as session:
            rows = session.execute(
                select(
                    Review.job_id, Review.output_id, Output.uri, Output.sha256, Job.rerun_of_job_id
                )
                .join(Output, Output.id == Review.output_id)
                .join(Job, Job.id == Review.job_id)
                .where(
                    Review.batch_id == batch_id,
                    Review.decision == ReviewDecision.APPROVED,
                    tuple_(Review.job_id, Review.output_id) > tuple_(*last),
                )
                .order_by(Review.job_id, Review.output_id)
                .limit(CHUNK)
            ).all()
        if not rows:
            return
        for job_id, output_id, uri, sha, rerun_of in rows:
            if not uri or not sha:
                raise EditbatchError(
                    f"output {output_id} (job {job_id}) is approved but was never written; "
                    f"run: editbatch collect {batch_id}"
                )
            yield Approved(
                output_id, job_id, uri, sha, export_name(uri, root, rerun_of is not None)
            )
        last = (rows[-1][0], rows[-1][1])


@dataclass
class ExportResult:
    destination: str
    copied: list[str] = field(default_factory=list)  # destination URIs
    bytes: int = 0
    # Names approved twice (an original and its re-run): the newer job's output is kept.
    superseded: list[str] = field(default_factory=list)


def export_approved(
    db: Database, batch_id: int, destination: str, storages: StorageCache | None = None
) -> ExportResult:
    """Copy every approved output of the batch to `destination` (a folder or an fsspec URL),
    under its name in the output root (a re-run's under its row's own name), verified by sha256:
    the source must still have the sha256 recorded at collection, and what the destination
    holds afterwards is read back and must have it too. StorageError names the file otherwise.
    """
    storages = storages or StorageCache()
    target = storages.get(destination)
    chosen: dict[str, Approved] = {}
    result = ExportResult(destination=target.root_uri)
    for item in approved_outputs(db, batch_id):
        if item.name in chosen:
            result.superseded.append(item.name)
        chosen[item.name] = item  # row order: a re-run comes after its original
    for name, item in chosen.items():
        data = _read(item.uri)
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise StorageError(
                f"{item.uri} changed since it was collected (sha256 differs); not exported"
            )
        uri = target.write(name, data)
        if hashlib.sha256(_read(uri)).hexdigest() != item.sha256:
            raise StorageError(f"{uri}: the copy's sha256 differs from the source's")
        result.copied.append(uri)
        result.bytes += len(data)
    return result


def _read(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as fh:
            return bytes(fh.read())
    except (OSError, ValueError) as exc:  # gone, or a bucket we may not read
        raise StorageError(f"cannot read {uri}: {exc}") from exc
