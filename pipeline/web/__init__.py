"""The web dashboard (`editbatch serve`): batches, live progress, jobs, attempts, and a review
gallery whose decisions are stored, exported and re-run. A view over the database; its actions
call the same functions as the CLI. See docs/dashboard.md.

app.py       the Starlette app: routes, forms, the actions (given a `send` function)
queries.py   what the pages read: a few indexed queries each, keyset pages
images.py    outputs by database id, inputs by (job, index), thumbnails cached on disk
security.py  binding, the token, CSRF, the Host check, security headers
advice.py    what to do about a held batch or a group of failures (pure)
templates/, static/   Jinja2 pages and the one script and style sheet (no CDN)
"""

from __future__ import annotations

from pipeline.db.session import Database
from pipeline.settings import Settings
from pipeline.web.app import Dashboard, Send, create_app
from pipeline.web.security import check_bind

__all__ = ["Dashboard", "Send", "create_app", "serve"]


def serve(
    settings: Settings,
    db: Database,
    host: str = "127.0.0.1",
    port: int = 8700,
    read_only: bool = False,
    send: Send | None = None,
) -> None:
    """Serve the dashboard until interrupted; refuses a non-loopback host without a token."""
    import uvicorn

    token = settings.dashboard_token
    check_bind(host, token.get_secret_value() if token else None)
    dash = Dashboard(db, settings, send, read_only, host)
    uvicorn.run(create_app(dash), host=host, port=port, log_level="info", proxy_headers=False)
