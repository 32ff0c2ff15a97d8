"""The dashboard in a real headless Chromium while real workers run the batches.

One stack for the module: a real redis-server, a real `celery -A worker.app worker` process,
the sandbox API (with latency, so a batch takes seconds), SQLite, and the dashboard started as
`editbatch serve` in its own process (so its buttons send jobs to the workers the way the CLI
does). Batches are submitted with `editbatch submit`. Screenshots of the batch page and the
gallery are saved to the folder the `artifacts` fixture prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job, Review
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.spec import EditSpec
from tests.conftest import FAKE_KEY, TEST_TODAY
from tests.factories import product_rows, write_manifest
from tests.servers import REPO, CeleryWorker, RedisServer, _wait_port, free_port, wait_until

pytestmark = pytest.mark.integration


class Serve:
    """`editbatch serve` in its own process (extra CLI options, extra environment)."""

    def __init__(self, env: dict[str, str], log: Path, *options: str) -> None:
        self.port = free_port()
        self.fh = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port), *options],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.fh,
            stderr=subprocess.STDOUT,
        )
        _wait_port(self.port, 30, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.fh.close()


@dataclass
class Stack:
    env: dict[str, str]
    db: Database
    dashboard: Serve
    tmp: Path
    sandbox: SandboxServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dashboard-e2e")
    url = f"sqlite:///{tmp / 'editbatch.db'}"
    config = SandboxConfig(billing_log=str(tmp / "billing.jsonl"), latency_ms=900, today=TEST_TODAY)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_BROKER_URL": redis_server.url,
            "EDITBATCH_DATABASE_URL": url,
            "EDITBATCH_HOME": str(tmp / "home"),
            # The stack outlives the per-test date pin: its processes get the date themselves.
            "EDITBATCH_TODAY": TEST_TODAY,
            "EDITBATCH_BACKOFF_BASE_SECONDS": "0.05",
            "EDITBATCH_BACKOFF_MAX_SECONDS": "0.2",
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        db = Database(url)
        worker = CeleryWorker(env, tmp / "worker.log", concurrency=2)
        dashboard = Serve(env, tmp / "dashboard.log")
        try:
            yield Stack(env, db, dashboard, tmp, sandbox)
        finally:
            dashboard.stop()
            worker.stop()
            db.dispose()
        assert FAKE_KEY not in (tmp / "dashboard.log").read_text(errors="replace")


def submit(stack: Stack, name: str, rows: list[dict[str, Any]]) -> int:
    """Submit `rows` as batch `name` (its name in every prompt: no reuse between tests)."""
    for row in rows:
        row["prompt"] = f"{row['prompt']} ({name})"
    manifest = write_manifest(stack.tmp / name / "manifest.csv", rows)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "submit",
            str(manifest),
            "--json",
            "--name",
            name,
            "--output",
            str(stack.tmp / name / "out"),
        ],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["batch_id"])


def batch_state(db: Database, batch_id: int) -> str:
    with db.session() as s:
        return str(s.scalar(select(Batch.state).where(Batch.id == batch_id)))


def accept_confirm(browser: Any) -> None:
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    browser.switch_to.alert.accept()


def text_of(browser: Any, css: str) -> str:
    """The element's text, read in one script call (the live part may be swapped meanwhile)."""
    text = browser.execute_script(
        "const el = document.querySelector(arguments[0]); return el && el.textContent;", css
    )
    assert text is not None, f"no {css} on {browser.current_url}"
    return " ".join(str(text).split())


def test_batch_page_counts_change_live_until_finished(
    stack: Stack, browser: Any, artifacts: Path
) -> None:
    """While the workers run a batch, the page's counts change without a reload and reach
    "finished"; a job page then shows its attempts as recorded."""
    batch_id = submit(stack, "live", product_rows(stack.tmp / "live", 12))
    browser.get(f"{stack.dashboard.url}/batches/{batch_id}")
    browser.execute_script("window.__notReloaded = true;")
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = int(text_of(browser, "#done-count").replace(",", ""))
        if not seen or seen[-1] != done:
            seen.append(done)
        if text_of(browser, "#batch-state") == "finished":
            break
        time.sleep(0.2)
    assert text_of(browser, "#batch-state") == "finished", seen
    assert browser.execute_script("return window.__notReloaded === true;")
    assert seen[-1] == 12 and len([n for n in seen if 0 < n < 12]) >= 1, seen
    assert seen == sorted(seen)
    assert text_of(browser, '#counts tr[data-state="succeeded"] td') == "12"
    browser.save_screenshot(str(artifacts / "batch-page.png"))

    with stack.db.session() as s:
        job_id = s.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1))
        attempts = s.scalars(select(Attempt).where(Attempt.job_id == job_id)).all()
    browser.get(f"{stack.dashboard.url}/batches/{batch_id}/jobs/{job_id}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")
    assert len(rows) == len(attempts) >= 1
    cells = rows[0].find_elements(By.CSS_SELECTOR, "td")
    assert cells[1].text == attempts[0].outcome == "ok"
    assert cells[2].text == "200"
    assert cells[7].text == str(attempts[0].request_id)
    # Local time shown, UTC kept on hover.
    started = rows[0].find_element(By.CSS_SELECTOR, "time")
    assert started.get_attribute("title").endswith("UTC")


def test_reject_by_key_then_rerun_with_an_amended_prompt(
    stack: Stack, browser: Any, artifacts: Path
) -> None:
    """In the gallery, `r` rejects the focused output (and a note can follow); "Re-run
    rejected" with an amended prompt creates a linked job that the workers run with it."""
    rows = product_rows(stack.tmp / "review", 3)
    for row in rows:
        row["prompt"] = "#sandbox:latency=10 " + row["prompt"]
    batch_id = submit(stack, "review", rows)
    wait_until(lambda: batch_state(stack.db, batch_id) == "finished", timeout=90)
    browser.get(f"{stack.dashboard.url}/batches/{batch_id}/gallery")
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert len(cards) == 3
    browser.find_element(By.TAG_NAME, "body").send_keys("j")
    first = browser.switch_to.active_element
    assert first.get_attribute("data-output") == cards[0].get_attribute("data-output")
    first.send_keys("r")
    WebDriverWait(browser, 10).until(
        lambda d: cards[0].find_element(By.CSS_SELECTOR, ".decision").text == "rejected"
    )
    note = browser.switch_to.active_element
    assert "note" in (note.get_attribute("class") or "")
    note.send_keys("background too dark", Keys.ENTER)
    WebDriverWait(browser, 10).until(
        lambda d: (
            d.switch_to.active_element.get_attribute("data-output")
            == cards[1].get_attribute("data-output")
        )
    )
    browser.switch_to.active_element.send_keys("a")
    WebDriverWait(browser, 10).until(
        lambda d: cards[1].find_element(By.CSS_SELECTOR, ".decision").text == "approved"
    )
    output_id = int(cards[0].get_attribute("data-output"))
    with stack.db.session() as s:
        decided = s.get(Review, output_id)
        assert decided is not None and decided.decision == "rejected"
        assert decided.note == "background too dark"
        original = decided.job_id
    assert text_of(browser, "#review-counts") == "1 approved · 1 rejected · 1 unreviewed"
    assert text_of(browser, "#rerun-link") == "Re-run rejected (1)"
    browser.execute_script("window.scrollTo(0, 0);")
    browser.save_screenshot(str(artifacts / "gallery.png"))

    browser.find_element(By.ID, "rerun-link").click()
    prompt = browser.find_element(By.NAME, f"prompt_{original}")
    prompt.clear()
    prompt.send_keys("white studio sweep, brighter light #sandbox:latency=10")
    browser.find_element(By.ID, "rerun-submit").click()
    accept_confirm(browser)
    WebDriverWait(browser, 20).until(lambda d: "Re-running 1 rejected rows" in d.page_source)

    def rerun_done() -> bool:
        with stack.db.session() as s:
            job = s.scalar(select(Job).where(Job.rerun_of_job_id == original))
            return job is not None and job.state == "succeeded"

    wait_until(rerun_done, timeout=90)
    with stack.db.session() as s:
        job = s.scalar(select(Job).where(Job.rerun_of_job_id == original))
        assert job is not None
        spec = EditSpec.from_json(job.spec)
        assert spec.prompt == "white studio sweep, brighter light #sandbox:latency=10"
        attempts = s.scalars(select(Attempt).where(Attempt.job_id == job.id)).all()
        assert [a.http_status for a in attempts] == [200]
    wait_until(lambda: batch_state(stack.db, batch_id) == "finished", timeout=60)


def test_pause_then_resume_from_the_page(stack: Stack, browser: Any) -> None:
    """Pause (after confirming) stops new calls; Resume with a budget continues to the end."""
    batch_id = submit(stack, "pause", product_rows(stack.tmp / "pause", 10))
    browser.get(f"{stack.dashboard.url}/batches/{batch_id}")
    assert text_of(browser, "#batch-state") == "running", browser.page_source[:3000]
    browser.find_element(By.ID, "pause").click()
    accept_confirm(browser)
    WebDriverWait(browser, 20).until(lambda d: text_of(d, "#batch-state") == "paused")
    assert batch_state(stack.db, batch_id) == "paused"
    assert "Paused" in text_of(browser, ".flash")
    time.sleep(3)  # calls in flight finish; nothing new starts

    def settled() -> tuple[int, int]:
        with stack.db.session() as s:
            jobs = s.scalars(select(Job.state).where(Job.batch_id == batch_id)).all()
        return sum(j == "succeeded" for j in jobs), sum(j in ("queued", "held") for j in jobs)

    done_paused, waiting = settled()
    assert waiting > 0, "the pause came too late to hold anything"
    time.sleep(2)
    assert settled()[0] == done_paused
    budget = browser.find_element(By.ID, "budget")
    budget.clear()
    budget.send_keys("5")
    browser.find_element(By.ID, "resume").click()
    accept_confirm(browser)
    WebDriverWait(browser, 20).until(lambda d: "Resumed" in text_of(d, ".flash"))
    WebDriverWait(browser, 120).until(lambda d: text_of(d, "#batch-state") == "finished")
    with stack.db.session() as s:
        batch = s.get(Batch, batch_id)
        assert (
            batch is not None and batch.state == "finished" and str(batch.budget_usd) == "5.000000"
        )


def test_read_only_and_token_dashboards_refuse_actions(stack: Stack, browser: Any) -> None:
    """`editbatch serve --read-only` shows no button and refuses a POST; with
    EDITBATCH_DASHBOARD_TOKEN set, the browser is sent to sign in, and only the token lets in."""
    batch_id = submit(stack, "ro", product_rows(stack.tmp / "ro", 2))
    read_only = Serve(stack.env, stack.tmp / "ro.log", "--read-only")
    token = "s3cret-dashboard-token-for-the-test"
    guarded = Serve({**stack.env, "EDITBATCH_DASHBOARD_TOKEN": token}, stack.tmp / "tok.log")
    try:
        browser.get(f"{read_only.url}/batches/{batch_id}")
        assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == []
        assert "read-only" in browser.page_source
        status = browser.execute_script(
            "const t = document.querySelector('meta[name=csrf-token]').content;"
            f"return fetch('/batches/{batch_id}/actions/cancel', {{method: 'POST', "
            "body: new URLSearchParams({csrf_token: t})}).then(r => r.status);"
        )
        assert status == 403
        browser.get(f"{guarded.url}/batches/{batch_id}")
        assert browser.current_url.startswith(f"{guarded.url}/login")
        status = browser.execute_script(
            "const t = document.querySelector('meta[name=csrf-token]').content;"
            f"return fetch('/batches/{batch_id}/actions/cancel', {{method: 'POST', "
            "body: new URLSearchParams({csrf_token: t})}).then(r => r.status);"
        )
        assert status == 401
        assert batch_state(stack.db, batch_id) != "cancelled"
        browser.find_element(By.ID, "token").send_keys(token, Keys.ENTER)
        WebDriverWait(browser, 10).until(
            lambda d: d.current_url == f"{guarded.url}/batches/{batch_id}"
        )
        assert browser.find_element(By.ID, "batch-state").text in ("running", "finished")
    finally:
        read_only.stop()
        guarded.stop()


def test_pages_fit_a_phone_and_a_laptop(stack: Stack, browser: Any) -> None:
    """At 390 px and 1280 px no page is wider than the window (wide tables scroll inside
    their own box), and every table has header cells."""
    with stack.db.session() as s:
        batch_id = s.scalar(select(Batch.id).order_by(Batch.id).limit(1))
        job_id = s.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1))
    pages = [
        "/",
        f"/batches/{batch_id}",
        f"/batches/{batch_id}/jobs",
        f"/batches/{batch_id}/jobs/{job_id}",
        f"/batches/{batch_id}/gallery",
    ]
    for width in (390, 1280):
        browser.set_window_size(width, 900)
        for page in pages:
            browser.get(stack.dashboard.url + page)
            inner, scroll = browser.execute_script(
                "return [window.innerWidth, document.documentElement.scrollWidth];"
            )
            assert scroll <= inner, (width, page, scroll, inner)
            for table in browser.find_elements(By.TAG_NAME, "table"):
                assert table.find_elements(By.CSS_SELECTOR, "thead th"), page
