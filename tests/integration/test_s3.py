"""Inputs from and outputs to S3, for real: moto's S3 server on localhost, s3fs, the sandbox API.

s3fs (through botocore) finds the server from `AWS_ENDPOINT_URL_S3`, read when a client is
made; `FSSPEC_S3_ENDPOINT_URL` works too, but fsspec reads it once, when it is imported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.asyn import sync_wrapper
from sqlalchemy import select

from pipeline.batch.submit import BatchOptions, Intake, prepare, store
from pipeline.cost.pricing import load_prices
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Batch, Job, Output
from pipeline.db.session import Database
from pipeline.intake.manifest import Defaults
from pipeline.intake.remote import localize_manifest
from pipeline.output.storage import Storage
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from tests.factories import product_rows
from tests.servers import REPO, free_port

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoS3:
    """moto's S3 API served on a free localhost port, in a thread of this process."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**AWS_ENV, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def bucket(self) -> str:
        name = f"eb-{uuid.uuid4().hex[:12]}"
        fs().mkdir(name)
        return name

    def stop(self) -> None:
        self.server.stop()


def fs() -> Any:
    return fsspec.filesystem("s3")


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    import s3fs

    server = MotoS3()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # no client made before the endpoint was set
        yield server
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def upload_manifest(bucket: str, tmp_path: Path, rows: list[dict[str, Any]], key: str) -> str:
    """Upload each row's images and a CSV naming them relative to the manifest; its URI."""
    s3 = fs()
    folder = tmp_path / "src"
    for row in rows:
        for column in ("image", "mask"):
            if column in row:
                s3.put_file(str(folder / row[column]), f"{bucket}/images/{row[column]}")
                row[column] = f"../images/{row[column]}"
    text = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    s3.pipe_file(f"{bucket}/{key}", text.getvalue().encode())
    return f"s3://{bucket}/{key}"


def run_batch(settings: Settings, db: Database, manifest_uri: str, output_uri: str) -> int:
    """Localize, submit and run every job in this process (as `editbatch run` does)."""
    prepared = prepare(settings, manifest_uri, Intake(Defaults()))
    result = store(db, prepared, BatchOptions(output_uri, name="s3"), load_prices())
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    for chunk in queued_job_ids(db, result.batch_id):
        for job_id in chunk:
            process_job(job_id, deps)
    return result.batch_id


def test_s3_inputs_outputs_and_report_end_to_end(
    tmp_path: Path, moto_s3: MotoS3, settings: Settings, db: Database
) -> None:
    bucket = moto_s3.bucket()
    rows = product_rows(tmp_path / "src", 4)
    rows[1]["n"] = 2
    manifest_uri = upload_manifest(bucket, tmp_path, rows, "manifests/2026-03-14.csv")
    output_uri = f"s3://{bucket}/outputs/2026-03-14"

    batch_id = run_batch(settings, db, manifest_uri, output_uri)

    s3 = fs()
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "finished"
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.row_number))
        assert [(j.row_number, j.external_key, j.state) for j in jobs] == [
            (1, "SKU0000", "succeeded"),
            (2, "SKU0001", "succeeded"),
            (3, "SKU0002", "succeeded"),
            (4, "SKU0003", "succeeded"),
        ]
        outputs = s.scalars(
            select(Output).join(Job, Job.id == Output.job_id).where(Job.batch_id == batch_id)
        ).all()
        assert len(outputs) == 5
        for out in outputs:
            assert out.uri is not None and out.uri.startswith(f"{output_uri}/SKU")
            data = s3.cat_file(out.uri)
            assert hashlib.sha256(data).hexdigest() == out.sha256 and len(data) == out.bytes
        report_uri = batch.report_uri
    assert report_uri == f"{output_uri}/report-{batch_id}.csv"
    report = list(csv.DictReader(io.StringIO(s3.cat_file(report_uri).decode())))
    assert [r["id"] for r in report] == ["SKU0000", "SKU0001", "SKU0002", "SKU0003"]
    assert report[1]["outputs"].count(f"{output_uri}/") == 2
    summary = json.loads(s3.cat_file(f"{output_uri}/report-{batch_id}.json"))["summary"]
    assert summary["counts"]["succeeded"] == 4 and summary["outputs"] == 5
    # Nothing but the outputs and the report at the output root (no temporary objects).
    names = sorted(p.rsplit("/", 1)[1] for p in s3.find(f"{bucket}/outputs/2026-03-14"))
    images = ["SKU0000_1.png", "SKU0001_1.png", "SKU0001_2.png", "SKU0002_1.png", "SKU0003_1.png"]
    assert names == sorted([f"report-{batch_id}.csv", f"report-{batch_id}.json", *images])


def test_second_run_uses_the_cache_and_missing_images_reject_their_row(
    tmp_path: Path, moto_s3: MotoS3, settings: Settings
) -> None:
    bucket = moto_s3.bucket()
    rows = product_rows(tmp_path / "src", 2)
    manifest_uri = upload_manifest(bucket, tmp_path, rows, "m/night.csv")
    first = localize_manifest(manifest_uri, settings)
    assert first.fetched == 3  # two images and one mask
    again = localize_manifest(manifest_uri, settings)
    assert again.fetched == 0 and again.path == first.path  # same ETags: nothing downloaded
    # The object changes: its ETag changes, so it is downloaded again.
    fs().put_file(str(tmp_path / "src" / "img0.png"), f"{bucket}/images/img1.png")
    fs().rm(f"{bucket}/images/mask0.png")
    third = localize_manifest(manifest_uri, settings)
    assert third.fetched == 1 and third.path == first.path  # the manifest itself is unchanged
    img1 = "../images/img1.png"
    assert third.refs[img1] != first.refs[img1]  # the new copy of the changed image
    assert third.problems == {f"s3://{bucket}/images/mask0.png": "not found"}


def test_storage_write_is_one_put_even_past_the_multipart_size(
    moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_s3.bucket()
    storage = Storage(f"s3://{bucket}/out")
    calls: list[str] = []
    real = storage.fs._call_s3

    async def recording(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await real(method, *args, **kwargs)

    # Both paths into botocore: the coroutine, and its blocking twin that file objects use.
    monkeypatch.setattr(storage.fs, "_call_s3", recording)
    monkeypatch.setattr(storage.fs, "call_s3", sync_wrapper(recording, obj=storage.fs))
    small = os.urandom(300_000)
    large = os.urandom(60 * 2**20)  # above s3fs's 50 MiB block size (a big report, say)
    assert storage.write("a/small.png", small) == f"s3://{bucket}/out/a/small.png"
    storage.write("report.json", large)
    assert calls == ["put_object", "put_object"]
    assert fs().cat_file(f"{bucket}/out/report.json") == large


def test_fsspec_endpoint_variable_is_read_at_import(moto_s3: MotoS3) -> None:
    bucket = moto_s3.bucket()
    fs().pipe_file(f"{bucket}/hello.txt", b"hi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(AWS_ENV)
    env["FSSPEC_S3_ENDPOINT_URL"] = moto_s3.endpoint
    code = f"import fsspec; print(fsspec.open('s3://{bucket}/hello.txt').open().read())"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "b'hi'"
