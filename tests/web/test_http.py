"""The dashboard over HTTP: pages, filters, images by id only, CSRF, read-only, the token.

A real batch is stored by submit and run by the executor against the sandbox (SQLite);
the app is called through Starlette's TestClient, and through a real uvicorn socket where a
raw request path matters (`../` is sent as is).
"""

from __future__ import annotations

import http.client
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select, update
from starlette.testclient import TestClient

from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Batch, Job, Output
from pipeline.db.session import Database
from pipeline.errors import ConfigError
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from pipeline.web import Dashboard, create_app
from pipeline.web import images as web_images
from pipeline.web.queries import JobFilters, jobs_page
from pipeline.web.security import check_bind
from tests.conftest import FAKE_KEY
from tests.factories import make_image, product_rows, write_manifest
from tests.servers import REPO
from tests.unit.helpers import new_batch
from tests.web.conftest import DashboardServer

LOCAL = "http://127.0.0.1"


@dataclass
class Filled:
    db: Database
    settings: Settings
    batch: int
    other: int
    tmp: Path


def _run(db: Database, settings: Settings, batch_id: int) -> None:
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    for ids in queued_job_ids(db, batch_id):
        for job_id in ids:
            process_job(job_id, deps)


@pytest.fixture
def filled(tmp_path: Path, db: Database, settings: Settings) -> Filled:
    """Batch 1: 6 rows (row 3 fails with a 400, row 5 is moderated), a category column;
    batch 2: 2 rows in another output folder."""
    rows = product_rows(tmp_path / "in", 6)
    for i, row in enumerate(rows):
        row["category"] = "shoes" if i % 2 else "bags"
    rows[2]["prompt"] = "bad #sandbox:400"
    rows[4]["prompt"] = "nope #sandbox:moderation"
    rows[5]["model"] = "gpt-image-2.5-flare"
    first = new_batch(
        db,
        write_manifest(tmp_path / "in" / "m.csv", rows),
        str(tmp_path / "out"),
        budget_usd=Decimal("5"),
    )
    _run(db, settings, first.batch_id)
    rows2 = product_rows(tmp_path / "in2", 2)
    second = new_batch(
        db, write_manifest(tmp_path / "in2" / "m.csv", rows2), str(tmp_path / "out2")
    )
    _run(db, settings, second.batch_id)
    return Filled(db, settings, first.batch_id, second.batch_id, tmp_path)


def client(f: Filled, **kwargs: object) -> TestClient:
    return TestClient(create_app(Dashboard(f.db, f.settings, **kwargs)), base_url=LOCAL)  # type: ignore[arg-type]


def csrf_of(c: TestClient, page: str = "/") -> str:
    html = c.get(page, headers={"accept": "text/html"}).text
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def outputs(db: Database, batch_id: int) -> list[Output]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Output)
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Output.id)
            )
        )


def batch_state(db: Database, batch_id: int) -> str:
    with db.session() as s:
        return str(s.scalar(select(Batch.state).where(Batch.id == batch_id)))


def test_every_page_renders_and_shows_no_api_key(
    filled: Filled, caplog: pytest.LogCaptureFixture
) -> None:
    """Each page answers 200 with its facts (counts, failures grouped with advice, attempts),
    and neither a page nor a log line carries the API key."""
    caplog.set_level(logging.DEBUG)
    c = client(filled)
    b = filled.batch
    out = outputs(filled.db, b)[0]
    pages = {
        "/": [f"/batches/{b}", f"/batches/{filled.other}"],
        f"/batches/{b}": ["invalid_request_error", "moderation_blocked", "What to do"],
        f"/batches/{b}/live": ['id="live"'],
        f"/batches/{b}/jobs": ["SKU0000", "SKU0005"],
        f"/batches/{b}/jobs/{out.job_id}": ['id="attempts"', "req_", "overlay=mask"],
        f"/batches/{b}/gallery": [f'data-output="{out.id}"', "Approve all 4 shown"],
        f"/batches/{b}/rerun": ["No rejected output"],
    }
    for page, expected in pages.items():
        response = c.get(page, headers={"accept": "text/html"})
        assert response.status_code == 200, (page, response.text[:300])
        for text in expected:
            assert text in response.text, (page, text)
        assert FAKE_KEY not in response.text
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
    live = c.get(f"/batches/{b}/live").text
    assert re.search(
        r'data-state="failed">\s*<th scope="row"><a[^>]*>failed</a></th>'
        r'<td class="num">2</td>',
        live,
    ), live
    # Batch 2 repeats two edits of batch 1: bought once, reused at $0 (shown after the page).
    assert "reuse" in c.get(f"/batches/{filled.other}").text
    reuse = c.get(f"/batches/{filled.other}/reuse").text
    with filled.db.session() as s:
        donors = s.scalars(
            select(Job.cost_usd).where(Job.batch_id == b, Job.row_number.in_((1, 2)))
        ).all()
    assert sum(donors) > 0
    assert reuse.startswith("Reused 2 identical edits") and f"${sum(donors):,.4f}" in reuse
    assert c.get(f"/batches/{b}/reuse").text.startswith("No edit was reused")
    assert FAKE_KEY not in caplog.text


def test_jobs_table_filters_in_sql_and_pages_by_id(filled: Filled) -> None:
    """State, model, error code, the user's id and a metadata column each filter the table;
    keyset pages walk every job once, forwards and back."""
    c = client(filled)
    b = filled.batch

    def skus(query: str) -> list[str]:
        html = c.get(f"/batches/{b}/jobs?{query}").text
        return re.findall(r"<td>(SKU\d+)", html)

    assert skus("state=failed") == ["SKU0002", "SKU0004"]
    assert skus("model=gpt-image-2.5-flare") == ["SKU0005"]
    assert skus("code=moderation_blocked") == ["SKU0004"]
    assert skus("key=SKU0003") == ["SKU0003"]
    assert skus("meta=category&value=shoes") == ["SKU0001", "SKU0003", "SKU0005"]
    assert skus("meta=category&value=shoes&state=succeeded") == ["SKU0001", "SKU0003", "SKU0005"]
    assert skus("meta=category&value=hats") == []
    assert c.get(f"/batches/{b}/jobs?state=bogus").status_code == 400
    with filled.db.session() as s:
        seen, after = [], None
        while True:
            page = jobs_page(s, b, JobFilters(), after=after, size=4)
            seen += [r[2] for r in page.rows]
            if page.next_after is None:
                break
            after = page.next_after
        assert seen == [f"SKU{i:04d}" for i in range(6)]
        back = jobs_page(s, b, JobFilters(), before=5, size=4)
        assert [r[2] for r in back.rows] == [f"SKU{i:04d}" for i in range(4)]
        assert back.prev_before is None and back.next_after == 4
        assert jobs_page(s, b, JobFilters(), before=6, size=4).prev_before == 2
        meta = jobs_page(s, b, JobFilters(meta="category", value="bags"), after=1, size=1)
        assert [r[2] for r in meta.rows] == ["SKU0002"] and meta.next_after == 3


def raw_get(server: DashboardServer, path: str) -> tuple[int, bytes]:
    """GET with the path exactly as given (no client normalising `../`)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def opened_files() -> Iterator[list[str]]:
    """Every file this process opens while the test runs (a Python audit hook)."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active[0] and event == "open" and isinstance(args[0], str | Path):
            seen.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one switches itself off
    yield seen
    active[0] = False


def test_images_are_served_by_database_id_only(filled: Filled, opened_files: list[str]) -> None:
    """A path, another batch's output id, a missing id, or `../` in any part of the request
    gets 404, and no file outside the outputs is read (not even one recorded in the database
    by tampering); real images come with their content type."""
    b, other = filled.batch, filled.other
    secret = make_image(filled.tmp / "secret" / "private.png")
    mine, theirs = outputs(filled.db, b)[0], outputs(filled.db, other)[0]
    tampered = outputs(filled.db, b)[1]
    with filled.db.session() as s:
        s.execute(update(Output).where(Output.id == tampered.id).values(uri=str(secret)))
        s.commit()
    with DashboardServer(Dashboard(filled.db, filled.settings)) as server:
        bad = [
            f"/batches/{b}/outputs/{theirs.id}/image",
            f"/batches/{b}/outputs/999999/image",
            f"/batches/{b}/outputs/{tampered.id}/image?size=full",
            f"/batches/{b}/outputs/{tampered.id}/image",
            f"/batches/{b}/outputs/../../secret/private.png",
            f"/batches/{b}/outputs/..%2F..%2Fsecret%2Fprivate.png/image",
            f"/batches/{b}/outputs/{mine.id}/image?size=../../secret/private.png",
            f"/batches/{b}/outputs/{mine.id}/image?path={secret}",
            f"/batches/{b}/outputs/{mine.id}/image?size=full&file=../x",
            f"/batches/{b}/jobs/{mine.job_id}/inputs/0/image?overlay=../../secret",
            f"/batches/{b}/jobs/{mine.job_id}/inputs/7/image",
            f"/batches/{other}/jobs/{mine.job_id}/inputs/0/image",
            f"/batches/{b}/jobs/{mine.job_id}/inputs/../../../secret/image",
            f"/image?path={secret}",
            "/static/../../secret/private.png",
            f"/static/..%2F..%2F..%2F..%2F{secret}",
            f"/batches/{b}/outputs/{mine.id}/image/..%2F..%2F..%2Fsecret",
        ]
        secret_bytes = secret.read_bytes()
        opened_files.clear()
        for path in bad:
            status, body = raw_get(server, path)
            assert status == 404, (path, status, body[:200])
            assert secret_bytes not in body
        assert not [p for p in opened_files if "secret" in p], opened_files
        status, body = raw_get(server, f"/batches/{b}/outputs/{mine.id}/image?size=full")
        assert status == 200 and body == Path(str(mine.uri)).read_bytes()
    c = client(filled)
    full = c.get(f"/batches/{b}/outputs/{mine.id}/image?size=full")
    assert full.headers["content-type"] == "image/png"
    thumb = c.get(f"/batches/{b}/outputs/{mine.id}/image")
    assert thumb.headers["content-type"] == "image/webp" and thumb.content[8:12] == b"WEBP"


def test_thumbnails_are_made_once_and_cached_on_disk(
    filled: Filled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request makes the thumbnail with Pillow, the next ones read the cache under
    the editbatch home; a changed output (new sha256) gets a new one."""
    made: list[int] = []
    real = web_images.thumbnail

    def counting(data: bytes, side: int = web_images.THUMB_SIDE) -> bytes:
        made.append(side)
        return real(data, side)

    monkeypatch.setattr(web_images, "thumbnail", counting)
    c = client(filled)
    out = outputs(filled.db, filled.batch)[0]
    url = f"/batches/{filled.batch}/outputs/{out.id}/image"
    first = c.get(url).content
    assert c.get(url).content == first and len(made) == 1
    cached = list((filled.settings.home / "thumbs").glob(f"out-{out.id}-*.webp"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    with filled.db.session() as s:
        s.execute(update(Output).where(Output.id == out.id).values(sha256="f" * 64))
        s.commit()
    c.get(url)
    assert len(made) == 2


def test_posts_need_the_csrf_token(filled: Filled) -> None:
    """A POST without the CSRF token, with a wrong one, or from another origin is refused and
    changes nothing; with it, the action runs (the batch pauses)."""
    c = client(filled)
    b = filled.batch
    with filled.db.session() as s:
        s.execute(update(Batch).where(Batch.id == b).values(state="running", finished_at=None))
        s.commit()
    token = csrf_of(c)
    url = f"/batches/{b}/actions/pause"
    assert c.post(url, data={}).status_code == 403
    assert c.post(url, data={"csrf_token": "x" * 43}).status_code == 403
    evil = c.post(url, data={"csrf_token": token}, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    fresh = TestClient(create_app(Dashboard(filled.db, filled.settings)), base_url=LOCAL)
    assert fresh.post(url, data={"csrf_token": token}).status_code == 403  # no cookie
    review_post = c.post(f"/batches/{b}/reviews", data={"output_id": "1", "decision": "approved"})
    assert review_post.status_code == 403
    assert batch_state(filled.db, b) == "running"
    assert c.get(url).status_code == 405
    ok = c.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == f"/batches/{b}"
    assert batch_state(filled.db, b) == "paused"
    assert "Paused" in c.get(f"/batches/{b}").text


def test_read_only_hides_and_refuses_every_action(filled: Filled) -> None:
    """`--read-only`: no form that changes anything is on any page, and every POST is 403."""
    c = client(filled, read_only=True)
    b = filled.batch
    with filled.db.session() as s:
        s.execute(update(Batch).where(Batch.id == b).values(state="running", finished_at=None))
        s.commit()
    for page in (f"/batches/{b}", f"/batches/{b}/gallery", f"/batches/{b}/rerun"):
        html = c.get(page).text
        assert 'method="post"' not in html, page
        assert "read-only" in html
    token = csrf_of(c)
    out = outputs(filled.db, b)[0]
    posts = {
        **{f"/batches/{b}/actions/{a}": {} for a in ("pause", "resume", "cancel", "retry")},
        f"/batches/{b}/actions/export": {"destination": str(filled.tmp / "x")},
        f"/batches/{b}/reviews": {"output_id": str(out.id), "decision": "rejected"},
        f"/batches/{b}/rerun": {"job_id": str(out.job_id)},
    }
    for url, data in posts.items():
        response = c.post(url, data={"csrf_token": token, **data})
        assert response.status_code == 403, url
        assert "read-only" in response.text
    assert batch_state(filled.db, b) == "running"
    assert not (filled.tmp / "x").exists()


def test_token_is_required_when_set(filled: Filled) -> None:
    """With EDITBATCH_DASHBOARD_TOKEN: pages send a browser to the sign-in form, other
    requests get 401; a Bearer header or the form's cookie (not the token itself) lets in."""
    secret = "correct-horse-battery-staple-0123456789"
    settings = filled.settings.model_copy(update={"dashboard_token": SecretStr(secret)})
    app = create_app(Dashboard(filled.db, settings))
    b = filled.batch
    c = TestClient(app, base_url=LOCAL)
    page = c.get(f"/batches/{b}", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == f"/login?next=/batches/{b}"
    assert c.get(f"/batches/{b}/outputs/1/image").status_code == 401
    token = csrf_of(c, "/login")
    denied = c.post(f"/batches/{b}/actions/cancel", data={"csrf_token": token})
    assert denied.status_code == 401 and batch_state(filled.db, b) == "finished"
    bearer = c.get(f"/batches/{b}", headers={"authorization": f"Bearer {secret}"})
    assert bearer.status_code == 200 and secret not in bearer.text
    wrong = c.post("/login", data={"csrf_token": token, "token": "guess", "next": "/"})
    assert wrong.status_code == 401
    assert c.get("/").status_code == 401
    signed = c.post(
        "/login",
        data={"csrf_token": token, "token": secret, "next": f"/batches/{b}"},
        follow_redirects=False,
    )
    assert signed.status_code == 303 and signed.headers["location"] == f"/batches/{b}"
    assert secret not in signed.headers["set-cookie"]
    assert c.get(f"/batches/{b}").status_code == 200
    evil_next = c.post(
        "/login",
        data={"csrf_token": token, "token": secret, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert evil_next.headers["location"] == "/"


def test_without_a_token_only_loopback_host_names_are_answered(filled: Filled) -> None:
    """A page of another site that rebinds its name to 127.0.0.1 gets nothing."""
    c = client(filled)
    assert c.get("/", headers={"host": "evil.example:8700"}).status_code == 400
    assert c.get("/", headers={"host": "localhost:8700"}).status_code == 200
    assert c.get("/", headers={"host": "[::1]:8700"}).status_code == 200


def test_serve_refuses_other_addresses_without_a_token(tmp_path: Path) -> None:
    """`editbatch serve --host 0.0.0.0` without EDITBATCH_DASHBOARD_TOKEN exits 2 naming the
    setting; loopback addresses need none."""
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ConfigError, match="EDITBATCH_DASHBOARD_TOKEN"):
            check_bind(host, None)
        check_bind(host, "a-token")
    env = {
        "PATH": "/usr/bin:/bin",
        "EDITBATCH_HOME": str(tmp_path / "home"),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "EDITBATCH_DASHBOARD_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


def test_review_posts_save_and_the_gallery_filters(filled: Filled) -> None:
    """Decisions posted by the gallery's script (JSON) or its forms are stored; the gallery
    filters unreviewed / approved / rejected, by model and by a metadata column."""
    c = client(filled)
    b = filled.batch
    token = csrf_of(c, f"/batches/{b}/gallery")
    outs = outputs(filled.db, b)
    saved = c.post(
        f"/batches/{b}/reviews",
        data={
            "csrf_token": token,
            "output_id": str(outs[0].id),
            "decision": "rejected",
            "note": "halo",
        },
        headers={"accept": "application/json"},
    )
    assert saved.json() == {
        "decided": 1,
        "decision": "rejected",
        "reviews": {"approved": 0, "rejected": 1, "unreviewed": 3},
        "rerun": 1,
    }
    bulk = c.post(
        f"/batches/{b}/reviews",
        data={
            "csrf_token": token,
            "output_id": [str(o.id) for o in outs[1:3]],
            "decision": "approved",
            "next": f"/batches/{b}/gallery?review=unreviewed",
        },
        follow_redirects=False,
    )
    assert bulk.headers["location"] == f"/batches/{b}/gallery?review=unreviewed"
    theirs = outputs(filled.db, filled.other)[0]
    cross = c.post(
        f"/batches/{b}/reviews",
        data={"csrf_token": token, "output_id": str(theirs.id), "decision": "approved"},
    )
    assert cross.status_code == 404

    def shown(query: str) -> list[int]:
        html = c.get(f"/batches/{b}/gallery?{query}").text
        return [int(x) for x in re.findall(r'data-output="(\d+)"', html)]

    assert shown("review=rejected") == [outs[0].id]
    assert shown("review=approved") == [outs[1].id, outs[2].id]
    assert shown("review=unreviewed") == [outs[3].id]
    assert shown("model=gpt-image-2.5-flare") == [outs[3].id]
    assert shown("meta=category&value=shoes") == [o.id for o in outs[1:4]]
    assert "1 approved" not in c.get(f"/batches/{b}/gallery").text
    assert "2 approved" in c.get(f"/batches/{b}/gallery").text
    rerun = c.get(f"/batches/{b}/rerun").text
    assert "halo" in rerun and 'name="prompt_' in rerun


def test_gif_and_svg_outputs_are_shown_safely(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """A GIF output gets a WebP thumbnail of its first frame and is served whole as image/gif;
    an SVG output is served as it is (no Pillow), with a CSP that runs no script in it."""
    folder = tmp_path / "in"
    make_image(folder / "shoe.png", (512, 512))
    rows = [
        {"id": "anim", "image": "shoe.png", "prompt": "make it spin", "output_format": "gif",
         "frame_count": "3", "size": "1024x1024", "quality": "low"},
        {"id": "logo", "image": "shoe.png", "prompt": "as a flat vector logo",
         "output_format": "svg", "size": "1024x1024", "quality": "medium"},
    ]  # fmt: skip
    batch_id = new_batch(db, write_manifest(folder / "m.csv", rows), str(tmp_path / "out")).batch_id
    _run(db, settings, batch_id)
    gif, svg = outputs(db, batch_id)
    assert (gif.format, svg.format) == ("gif", "svg")
    c = TestClient(create_app(Dashboard(db, settings)), base_url=LOCAL)
    thumb = c.get(f"/batches/{batch_id}/outputs/{gif.id}/image")
    assert thumb.status_code == 200 and thumb.content[8:12] == b"WEBP"
    full = c.get(f"/batches/{batch_id}/outputs/{gif.id}/image?size=full")
    assert full.headers["content-type"] == "image/gif"
    assert full.content == Path(str(gif.uri)).read_bytes()
    for size in ("thumb", "full"):
        shown = c.get(f"/batches/{batch_id}/outputs/{svg.id}/image?size={size}")
        assert shown.status_code == 200, shown.text
        assert shown.headers["content-type"].startswith("image/svg+xml")
        assert shown.content == Path(str(svg.uri)).read_bytes()
        csp = shown.headers["content-security-policy"]
        assert "sandbox" in csp and "default-src 'none'" in csp and "script-src" not in csp
    gallery = c.get(f"/batches/{batch_id}/gallery").text
    assert f'data-output="{gif.id}"' in gallery and f'data-output="{svg.id}"' in gallery


def test_actions_send_queued_jobs_through_the_function_they_were_given(filled: Filled) -> None:
    """Resume and retry send the batch's queued jobs with the dashboard's `send` (what
    `editbatch serve` gives: the CLI's dispatch to the workers) and say how many went."""
    sent: list[int] = []

    def send(batch_id: int) -> int:
        sent.append(batch_id)
        return 7

    c = client(filled, send=send)
    b = filled.batch
    token = csrf_of(c)
    retried = c.post(f"/batches/{b}/actions/retry", data={"csrf_token": token})
    assert retried.status_code == 200 and sent == [b]
    assert "Retrying 2 failed jobs: 7 queued jobs sent to the workers" in retried.text
    c.post(f"/batches/{b}/actions/pause", data={"csrf_token": token})
    assert batch_state(filled.db, b) == "paused"
    resumed = c.post(f"/batches/{b}/actions/resume", data={"csrf_token": token, "budget": "9"})
    assert "Resumed: 7 queued jobs sent" in resumed.text and sent == [b, b]
    assert batch_state(filled.db, b) == "running"
    unsent = client(filled).post(f"/batches/{b}/actions/retry", data={"csrf_token": token})
    assert unsent.status_code == 403  # a fresh client has no CSRF cookie: nothing happens
