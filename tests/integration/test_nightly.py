"""Nightly runs for real: the beat entry, the dated S3 manifest, a celery worker, the webhook.

The clock is controlled: the schedule is evaluated with a fixed `now`, and the task is sent
with the time it would have had at 02:00 (beat sends none; the task then takes the UTC time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from pydantic import SecretStr
from sqlalchemy import func, select

from pipeline.batch.nightly import cron_fields, plan, preview, render, run_nightly
from pipeline.db.models import Batch, Job
from pipeline.db.session import Database
from pipeline.errors import ConfigError
from pipeline.observe.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY
from tests.factories import product_rows
from tests.integration.test_s3 import MotoS3, fs, moto_s3, upload_manifest
from tests.servers import REPO, CeleryWorker, wait_until
from worker.constants import QUEUE

__all__ = ["moto_s3"]  # the fixture, shared with test_s3

SECRET = "whsec-nightly-test"
TONIGHT = datetime(2026, 3, 14, 2, 0, 3, tzinfo=UTC)


class WebhookReceiver:
    """A tiny HTTP server that records every POST; answers `statuses` in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/editbatch"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver([503])  # the first delivery fails: the webhook is retried
    yield server
    server.stop()


# --- the schedule ------------------------------------------------------------------------------


def test_beat_schedule_has_the_nightly_entry_mapped_to_the_task() -> None:
    code = (
        "import json; from worker.app import app; app.loader.import_default_modules();"
        "e = app.conf.beat_schedule['editbatch-nightly']; s = e['schedule'];"
        "print(json.dumps({'task': e['task'], 'registered': e['task'] in app.tasks,"
        "'minute': sorted(s.minute), 'hour': sorted(s.hour), 'days': len(s.day_of_month)}))"
    )
    env = {
        **os.environ,
        "EDITBATCH_NIGHTLY_MANIFEST": "s3://b/manifests/{date:%Y-%m-%d}.csv",
        "EDITBATCH_NIGHTLY_OUTPUT": "s3://b/outputs/{date:%Y-%m-%d}",
        "EDITBATCH_NIGHTLY_CRON": "30 2 * * *",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout.strip().splitlines()[-1])
    assert entry == {
        "task": "editbatch.nightly",
        "registered": True,
        "minute": [30],
        "hour": [2],
        "days": 31,
    }


def test_the_schedule_fires_at_two_utc_and_not_before() -> None:
    last_run = datetime(2026, 3, 13, 2, 0, tzinfo=UTC)

    def schedule_at(now: datetime) -> crontab:
        return crontab(**cron_fields("0 2 * * *"), nowfun=lambda: now)

    due, _ = schedule_at(TONIGHT).is_due(last_run)
    assert due
    due, next_in = schedule_at(datetime(2026, 3, 14, 1, 59, tzinfo=UTC)).is_due(last_run)
    assert not due and 0 < next_in <= 60


def test_patterns_and_cron_are_checked() -> None:
    day = TONIGHT.date()
    assert render("s3://b/m/{date:%Y/%m/%d}.csv", day) == "s3://b/m/2026/03/14.csv"
    assert render("out/{date}", day) == "out/2026-03-14"
    with pytest.raises(ConfigError, match=r"only \{date\}"):
        render("s3://b/{date.__class__}.csv", day)
    with pytest.raises(ConfigError, match="five fields"):
        cron_fields("0 2 * *")
    with pytest.raises(ConfigError, match="EDITBATCH_NIGHTLY_MANIFEST"):
        plan(Settings(), TONIGHT)


# --- a night, end to end -----------------------------------------------------------------------


@pytest.fixture
def night(
    tmp_path: Path,
    moto_s3: MotoS3,
    redis_url: str,
    database_url: str,
    receiver: WebhookReceiver,
) -> Iterator[tuple[dict[str, str], Settings, Database, str]]:
    bucket = moto_s3.bucket()
    config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), latency_ms=20)
    with SandboxServer(config) as sandbox:
        env = {
            **moto_s3.env,
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": database_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "EDITBATCH_BACKOFF_BASE_SECONDS": "0.05",
            "EDITBATCH_BACKOFF_MAX_SECONDS": "0.2",
            "EDITBATCH_NIGHTLY_MANIFEST": f"s3://{bucket}/manifests/{{date:%Y-%m-%d}}.csv",
            "EDITBATCH_NIGHTLY_OUTPUT": f"s3://{bucket}/outputs/{{date:%Y-%m-%d}}",
            "EDITBATCH_NIGHTLY_BUDGET_USD": "5",
            "EDITBATCH_WEBHOOK_URL": receiver.url,
            "EDITBATCH_WEBHOOK_SECRET": SECRET,
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        # The same configuration, for the calls this test makes in its own process.
        settings = Settings(
            home=tmp_path / "home",
            database_url=database_url,
            nightly_manifest=env["EDITBATCH_NIGHTLY_MANIFEST"],
            nightly_output=env["EDITBATCH_NIGHTLY_OUTPUT"],
            nightly_budget_usd=Decimal(5),
            webhook_url=receiver.url,
            webhook_secret=SecretStr(SECRET),
        )
        db = Database(database_url)
        yield env, settings, db, bucket
        db.dispose()


def test_a_night_submits_the_dated_manifest_once_and_signs_the_summary(
    tmp_path: Path,
    night: tuple[dict[str, str], Settings, Database, str],
    receiver: WebhookReceiver,
) -> None:
    env, settings, db, bucket = night
    rows = product_rows(tmp_path / "src", 3)
    rows[2]["prompt"] = "flaky #sandbox:500x1"
    upload_manifest(bucket, tmp_path, rows, "manifests/2026-03-14.csv")
    upload_manifest(bucket, tmp_path, product_rows(tmp_path / "src", 1), "manifests/2026-03-13.csv")

    before = preview(settings, TONIGHT, db)
    assert before["manifest_found"] and before["would_submit"] and before["submitted_as"] is None
    assert before["name"] == "nightly-2026-03-14" and before["budget_usd"] == "5"
    assert before["webhook"] == receiver.url.rsplit("/hooks", 1)[0]  # host only

    client = Celery("nightly-test", broker=env["EDITBATCH_BROKER_URL"])
    worker = CeleryWorker(env, tmp_path / "worker.log", concurrency=2)
    try:
        client.send_task("editbatch.nightly", kwargs={"now": TONIGHT.isoformat()}, queue=QUEUE)
        wait_until(lambda: len(receiver.requests) >= 2, timeout=90)
    finally:
        worker.stop()
        client.close()

    with db.session() as s:
        batch = s.scalars(select(Batch)).one()
        assert batch.name == "nightly-2026-03-14" and batch.state == "finished"
        assert batch.manifest_uri == f"s3://{bucket}/manifests/2026-03-14.csv"
        assert batch.budget_usd == Decimal(5)
        states = s.scalars(select(Job.state).where(Job.batch_id == batch.id)).all()
        assert states == ["succeeded"] * 3
        batch_id = batch.id

    # Delivered on the second try, each attempt signed afresh; the receiver verifies it.
    assert len(receiver.requests) == 2
    headers, body = receiver.requests[-1]
    assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify_signature("wrong", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert FAKE_KEY.encode() not in body and SECRET.encode() not in body
    summary = json.loads(body)
    output = f"s3://{bucket}/outputs/2026-03-14"
    assert summary["event"] == "batch.finished" and summary["batch_id"] == batch_id
    assert summary["counts"]["succeeded"] == 3 and summary["outputs"] == 3
    assert summary["nightly"] == {"date": "2026-03-14", "manifest": batch.manifest_uri}
    assert summary["report"] == {
        "csv": f"{output}/report-{batch_id}.csv",
        "json": f"{output}/report-{batch_id}.json",
    }
    assert fs().exists(summary["report"]["csv"]) and fs().exists(summary["report"]["json"])

    # The same night again (beat fired twice, or a person ran it): nothing new is submitted.
    sent: list[list[int]] = []
    assert run_nightly(settings, TONIGHT.replace(hour=3), sent.append, db=db) is None
    assert preview(settings, TONIGHT, db)["submitted_as"] == batch_id
    # A night whose manifest is not there (yet): nothing either.
    assert run_nightly(settings, datetime(2026, 3, 15, 2, tzinfo=UTC), sent.append, db=db) is None
    assert sent == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 1


def test_a_racing_second_submission_cancels_itself(
    tmp_path: Path, night: tuple[dict[str, str], Settings, Database, str]
) -> None:
    _env, settings, db, bucket = night
    upload_manifest(bucket, tmp_path, product_rows(tmp_path / "src", 2), "manifests/2026-03-14.csv")
    sent: list[list[int]] = []
    first = run_nightly(settings, TONIGHT, sent.append, db=db)
    assert first is not None and len(sent) == 1 and len(sent[0]) == 2
    # Another submitter that checked before `first` was stored: it stores its batch too, sees
    # the earlier one, and cancels its own before sending anything.
    from pipeline.batch import nightly

    real = nightly.existing_batch
    calls = {"n": 0}

    def blind_first(db: Database, tonight: Any) -> int | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else real(db, tonight)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nightly, "existing_batch", blind_first)
        assert run_nightly(settings, TONIGHT, sent.append, db=db) is None
    assert len(sent) == 1
    with db.session() as s:
        states = {id_: state for id_, state in s.execute(select(Batch.id, Batch.state))}
    assert states[first] == "running" and sorted(states.values()) == ["cancelled", "running"]
