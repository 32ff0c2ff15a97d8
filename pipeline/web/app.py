"""The dashboard: a Starlette app over the database (pages, live parts, images, actions).

Reads go through `pipeline.web.queries`; every action calls the function the CLI calls
(`pipeline.batch.controls`, `pipeline.batch.review`, `pipeline.output.export`) and, when jobs
must run, sends them with the `send` function it was given: `editbatch serve` gives the CLI's
`dispatch.to_workers` (Celery, with the CLI's message when the broker refuses), so this package
never imports the workers. GET handlers are plain functions (Starlette runs them in its thread
pool, where a blocking database session belongs); POST handlers read the form, check CSRF and
read-only, then do their work in the thread pool too.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import jinja2
from markupsafe import Markup
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.batch import controls, review
from pipeline.batch.status import cost_by_provider, reuse_figures
from pipeline.db.models import Batch, Job, Output
from pipeline.db.session import Database
from pipeline.errors import EditbatchError, ImageMissing, NotFoundError
from pipeline.output.export import export_approved
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from pipeline.states import (
    BATCH_OPEN,
    BATCH_STOPPED,
    BatchState,
    JobState,
    ReviewDecision,
)
from pipeline.web import queries
from pipeline.web.images import SVG, Images, ThumbCache
from pipeline.web.security import (
    AUTH_COOKIE,
    CSRF_FIELD,
    LOOPBACK_NAMES,
    Guard,
    csrf_ok,
    safe_next,
    session_value,
)

HERE = Path(__file__).parent
FLASH_COOKIE = "eb_flash"
ACTIONS = ("pause", "resume", "cancel", "retry", "export")
# Image routes accept exactly these query parameters and values; anything else is a 404.
OUTPUT_PARAMS = {"size": ("thumb", "full")}
INPUT_PARAMS = {"size": ("thumb", "large"), "overlay": ("mask",)}

# An SVG opened on its own is a document: no script, no style from elsewhere, no form.
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
CLEAR = "clear"  # the review form's decision that makes an output unreviewed again

Send = Callable[[int], int]
"""Sends the queued jobs of a batch (by id) to the workers; returns how many were sent."""


@dataclass
class Dashboard:
    """What the app needs, built once per process and passed in."""

    db: Database
    settings: Settings
    send: Send | None = None  # None: actions that run jobs say there are no workers
    read_only: bool = False
    host: str = "127.0.0.1"
    images: Images = field(init=False)

    def __post_init__(self) -> None:
        self.images = Images(
            ThumbCache(self.settings.home.resolve() / "thumbs"),
            self.settings.effective_spool_dir,
        )

    @property
    def token(self) -> str | None:
        secret = self.settings.dashboard_token
        return secret.get_secret_value() if secret and secret.get_secret_value() else None


# -- template helpers ---------------------------------------------------------------------------


def _usd(value: Any, places: int = 4) -> str:
    if value is None:
        return "-"
    return f"${Decimal(str(value)):,.{places}f}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _time(value: datetime | None) -> Markup:
    """A <time> the page's script shows in the viewer's zone; UTC stays in the title."""
    if value is None:
        return Markup("-")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    utc = value.astimezone(UTC)
    iso = utc.isoformat(timespec="seconds").replace("+00:00", "Z")
    shown = utc.strftime("%Y-%m-%d %H:%M UTC")
    return Markup(f'<time datetime="{iso}" title="{utc:%Y-%m-%d %H:%M:%S} UTC">{shown}</time>')


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _query(params: dict[str, Any], **changes: Any) -> str:
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=_usd, num=_num, time=_time, duration=_duration, pct=_pct)
    env.globals.update(
        query=_query,
        states=queries.STATES,
        review_filters=queries.REVIEW_FILTERS,
        JobState=JobState,
        BatchState=BatchState,
        ReviewDecision=ReviewDecision,
        BATCH_OPEN=BATCH_OPEN,
        BATCH_STOPPED=BATCH_STOPPED,
    )
    return env


# -- request helpers ----------------------------------------------------------------------------


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(str(raw))
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number") from None


def _text(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    return raw.strip() if raw and raw.strip() else None


def _image_params(request: Request, allowed: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """The image route's parameters, or 404 for any other name or value (no paths, no ../)."""
    params = dict(request.query_params)
    for name, value in params.items():
        if name not in allowed or value not in allowed[name]:
            raise HTTPException(404)
    return params


def _flash(response: Response, message: str, kind: str = "ok") -> Response:
    response.set_cookie(
        FLASH_COOKIE, quote(f"{kind}:{message[:600]}"), httponly=True, samesite="strict"
    )
    return response


def _back(target: str, message: str, kind: str = "ok") -> Response:
    return _flash(RedirectResponse(target, status_code=303), message, kind)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def create_app(dash: Dashboard) -> Starlette:
    """The dashboard app for `dash` (see `pipeline.web.serve` to run it)."""
    env = _environment()
    db = dash.db

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        flash = unquote(request.cookies.get(FLASH_COOKIE, ""))
        kind, _, message = flash.partition(":")
        context.update(
            request=request,
            csrf=request.state.csrf,
            csrf_field=CSRF_FIELD,
            read_only=dash.read_only,
            signed_in=dash.token is not None,
            flash={"kind": kind, "message": message} if message else None,
        )
        response = HTMLResponse(env.get_template(name).render(context), status_code=status)
        if flash:
            response.delete_cookie(FLASH_COOKIE)
        return response

    async def checked_form(request: Request) -> FormData:
        if dash.read_only:
            raise HTTPException(403, "read-only dashboard (--read-only): actions are turned off")
        form = await request.form()
        submitted = form.get(CSRF_FIELD)
        if not csrf_ok(request, submitted if isinstance(submitted, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return form

    def send(batch_id: int) -> str:
        if dash.send is None:
            return "no workers are attached to this dashboard: run `editbatch resume` to send"
        return f"{dash.send(batch_id):,} queued jobs sent to the workers"

    # -- pages --

    def batches(request: Request) -> Response:
        with db.session() as s:
            rows, next_before = queries.batches_page(s, _int(request, "before"))
        return render(request, "batches.html", rows=rows, next_before=next_before)

    def batch(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        with db.session() as s:
            view = queries.batch_view(s, batch_id)
            # Calls and cost per provider (a batch split between providers): read once here,
            # not by the live part's polls.
            by_provider = cost_by_provider(s, view.batch)
        return render(request, "batch.html", v=view, by_provider=by_provider)

    def live(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        with db.session() as s:
            view = queries.batch_view(s, batch_id)
        return render(request, "_live.html", v=view)

    def reuse(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        with db.session() as s:
            queries.get_batch(s, batch_id)
            reused, saved = reuse_figures(s, batch_id)
        return PlainTextResponse(
            f"Reused {reused:,} identical edits bought before, saving {_usd(saved)}."
            if reused
            else "No edit was reused from an identical one bought before."
        )

    def jobs(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        state = _text(request, "state")
        if state and state not in queries.STATES:
            raise HTTPException(400, f"state must be one of {', '.join(queries.STATES)}")
        filters = queries.JobFilters(
            state=state,
            model=_text(request, "model"),
            code=_text(request, "code"),
            key=_text(request, "key"),
            meta=_text(request, "meta"),
            value=_text(request, "value"),
        )
        with db.session() as s:
            b = queries.get_batch(s, batch_id)
            page = queries.jobs_page(
                s, batch_id, filters, _int(request, "after"), _int(request, "before")
            )
            models = queries.batch_models(s, batch_id)
            codes = sorted({code for code, _, _ in queries.failure_counts(s, batch_id)})
            keys = queries.metadata_keys(s, batch_id)
        return render(
            request,
            "jobs.html",
            b=b,
            page=page,
            f=filters,
            models=models,
            codes=codes,
            meta_keys=keys,
        )

    def job(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        job_id = int(request.path_params["job_id"])
        with db.session() as s:
            b = queries.get_batch(s, batch_id)
            view = queries.job_view(s, batch_id, job_id)
        return render(request, "job.html", b=b, j=view)

    def gallery(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        review_filter = _text(request, "review") or "all"
        if review_filter not in queries.REVIEW_FILTERS:
            raise HTTPException(400, f"review must be one of {', '.join(queries.REVIEW_FILTERS)}")
        filters = queries.GalleryFilters(
            review=review_filter,
            model=_text(request, "model"),
            meta=_text(request, "meta"),
            value=_text(request, "value"),
        )
        after_raw = _text(request, "after")
        after = None
        if after_raw:
            try:
                job_part, out_part = after_raw.split("-", 1)
                after = (int(job_part), int(out_part))
            except ValueError:
                raise HTTPException(400, "after must be JOB-OUTPUT ids") from None
        with db.session() as s:
            b = queries.get_batch(s, batch_id)
            page = queries.gallery_page(s, batch_id, filters, after)
            reviews = queries.review_summary(s, batch_id)
            models = queries.batch_models(s, batch_id)
            keys = queries.metadata_keys(s, batch_id)
            waiting = queries.rerun_count(s, batch_id)
        return render(
            request,
            "gallery.html",
            b=b,
            g=page,
            f=filters,
            rv=reviews,
            models=models,
            meta_keys=keys,
            rerun_count=waiting,
        )

    def rerun_form(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        with db.session() as s:
            b = queries.get_batch(s, batch_id)
            rows = queries.rerun_candidates(s, batch_id)
        return render(request, "rerun.html", b=b, rows=rows)

    # -- images --

    def output_image(request: Request) -> Response:
        params = _image_params(request, OUTPUT_PARAMS)
        batch_id = int(request.path_params["batch_id"])
        output_id = int(request.path_params["output_id"])
        with db.session() as s:
            row = s.execute(
                select(Output, Batch.output_uri)
                .join(Job, Job.id == Output.job_id)
                .join(Batch, Batch.id == Job.batch_id)
                .where(Output.id == output_id, Job.batch_id == batch_id)
            ).first()
        if row is None:
            raise HTTPException(404)
        try:
            served = dash.images.output(row[0], row[1], params.get("size", "thumb"))
        except ImageMissing:
            raise HTTPException(404) from None
        headers = {"cache-control": "private"}
        if served.media_type == SVG:
            headers["content-security-policy"] = SVG_CSP
        return Response(served.data, media_type=served.media_type, headers=headers)

    def input_image(request: Request) -> Response:
        params = _image_params(request, INPUT_PARAMS)
        batch_id = int(request.path_params["batch_id"])
        job_id = int(request.path_params["job_id"])
        index = int(request.path_params["index"])
        with db.session() as s:
            spec_json = s.scalar(select(Job.spec).where(Job.id == job_id, Job.batch_id == batch_id))
        if spec_json is None or spec_json == "{}":
            raise HTTPException(404)
        try:
            served = dash.images.input(
                job_id,
                EditSpec.from_json(spec_json),
                index,
                params.get("size", "thumb"),
                params.get("overlay") == "mask",
            )
        except ImageMissing:
            raise HTTPException(404) from None
        return Response(
            served.data, media_type=served.media_type, headers={"cache-control": "private"}
        )

    # -- actions (POST) --

    async def action(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        name = str(request.path_params["action"])
        if name not in ACTIONS:
            raise HTTPException(404)
        form = await checked_form(request)
        fields = {k: str(v).strip() for k, v in form.items() if isinstance(v, str)}

        def work() -> str:
            with db.session() as s:
                if name == "pause":
                    controls.pause(s, batch_id)
                    return "Paused: calls in flight finish, no new call starts."
                if name == "cancel":
                    n = controls.cancel(s, batch_id)
                    return f"Cancelled: {n:,} jobs not started."
                if name == "resume":
                    controls.resume(s, batch_id, _budget(fields.get("budget")))
                    return f"Resumed: {send(batch_id)}."
                if name == "retry":
                    n = controls.retry_failed(s, batch_id, fields.get("prompt") or None).count
                    if not n:
                        return "No failed jobs to retry."
                    return f"Retrying {n:,} failed jobs: {send(batch_id)}."
            destination = fields.get("destination", "")
            if not destination:
                raise EditbatchError("say where to export to: a folder or an s3:// URL")
            result = export_approved(db, batch_id, destination)
            return (
                f"Exported {len(result.copied):,} approved outputs "
                f"({result.bytes / 1e6:,.1f} MB) to {result.destination}, each checked by "
                "sha256."
            )

        try:
            message = await run_in_threadpool(work)
        except EditbatchError as exc:
            return _back(f"/batches/{batch_id}", str(exc), "error")
        return _back(f"/batches/{batch_id}", message)

    async def decide(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        form = await checked_form(request)
        decision = str(form.get("decision", ""))
        note = str(form.get("note", "") or "")
        try:
            ids = [int(str(v)) for v in form.getlist("output_id")]
        except ValueError:
            raise HTTPException(400, "output_id must be whole numbers") from None

        def work() -> tuple[int, dict[str, int], int]:
            with db.session() as s:
                n = review.decide(s, batch_id, ids, None if decision == CLEAR else decision, note)
                return n, queries.review_summary(s, batch_id), queries.rerun_count(s, batch_id)

        try:
            n, counts, rerun_rows = await run_in_threadpool(work)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except EditbatchError as exc:
            raise HTTPException(400, str(exc)) from None
        if _wants_json(request):
            # The gallery's script updates its counts and the re-run link from these.
            return JSONResponse(
                {"decided": n, "decision": decision, "reviews": counts, "rerun": rerun_rows}
            )
        target = safe_next(str(form.get("next", "")), f"/batches/{batch_id}/gallery")
        return _back(target, f"{n} output(s) {decision if decision != CLEAR else 'cleared'}.")

    async def rerun(request: Request) -> Response:
        batch_id = int(request.path_params["batch_id"])
        form = await checked_form(request)
        try:
            chosen = [int(str(v)) for v in form.getlist("job_id")]
        except ValueError:
            raise HTTPException(400, "job_id must be whole numbers") from None
        prompts = {j: str(form.get(f"prompt_{j}", "")) for j in chosen if form.get(f"prompt_{j}")}
        amend = str(form.get("amend", "") or "")

        def work() -> str:
            with db.session() as s:
                new = controls.rerun_rejected(s, batch_id, prompts, amend, job_ids=chosen)
            if not new:
                return "Nothing to re-run: no rejected row left that has not been re-run."
            return f"Re-running {len(new):,} rejected rows: {send(batch_id)}."

        if not chosen:
            return _back(f"/batches/{batch_id}/rerun", "Tick at least one row.", "error")
        try:
            message = await run_in_threadpool(work)
        except EditbatchError as exc:
            return _back(f"/batches/{batch_id}/rerun", str(exc), "error")
        return _back(f"/batches/{batch_id}", message)

    # -- sign in --

    def login_form(request: Request) -> Response:
        if dash.token is None:
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html", next=safe_next(request.query_params.get("next")))

    async def login(request: Request) -> Response:
        form = await request.form()
        submitted = form.get(CSRF_FIELD)
        if dash.token is None:
            return RedirectResponse("/", status_code=303)
        if not csrf_ok(request, submitted if isinstance(submitted, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        given = str(form.get("token", ""))
        if not hmac.compare_digest(given.encode(), dash.token.encode()):
            return render(request, "login.html", status=401, next=form.get("next"), failed=True)
        response = RedirectResponse(safe_next(str(form.get("next", ""))), status_code=303)
        response.set_cookie(
            AUTH_COOKIE,
            session_value(dash.token),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        form = await request.form()
        submitted = form.get(CSRF_FIELD)
        if not csrf_ok(request, submitted if isinstance(submitted, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(AUTH_COOKIE)
        return response

    def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    # -- errors --

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_page(request, 404, str(exc) or "not found")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_page(request, exc.status_code, exc.detail)

    def error_page(request: Request, status: int, detail: str) -> Response:
        if _wants_json(request) or request.url.path.endswith("/image"):
            return JSONResponse({"error": detail}, status_code=status)
        if not hasattr(request.state, "csrf"):
            return PlainTextResponse(detail, status_code=status)
        return render(request, "error.html", status=status, status_code=status, detail=detail)

    hosts: tuple[str, ...] = ()
    if dash.token is None:
        hosts = (*LOOPBACK_NAMES, dash.host)
    b = "/batches/{batch_id:int}"
    routes = [
        Route("/", batches),
        Route("/healthz", healthz),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route(b, batch),
        Route(f"{b}/live", live),
        Route(f"{b}/reuse", reuse),
        Route(f"{b}/jobs", jobs),
        Route(b + "/jobs/{job_id:int}", job),
        Route(b + "/jobs/{job_id:int}/inputs/{index:int}/image", input_image),
        Route(b + "/outputs/{output_id:int}/image", output_image),
        Route(f"{b}/gallery", gallery),
        Route(f"{b}/reviews", decide, methods=["POST"]),
        Route(f"{b}/rerun", rerun_form, methods=["GET"]),
        Route(f"{b}/rerun", rerun, methods=["POST"]),
        Route(b + "/actions/{action:str}", action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=dash.token, hosts=hosts)],
        exception_handlers={NotFoundError: not_found, HTTPException: http_error},
    )
    app.state.dashboard = dash
    return app


def _budget(value: str | None) -> Decimal | None:
    if not value:
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise EditbatchError(f"budget {value!r} is not a number of US dollars") from None
    if amount < 0 or not amount.is_finite():
        raise EditbatchError("the budget must be a positive number of US dollars")
    return amount
