"""Who may use the dashboard, and proof that a state-changing request comes from its pages.

- Binding: 127.0.0.1 by default; any other address needs EDITBATCH_DASHBOARD_TOKEN
  (`check_bind`). Without a token only loopback Host names are answered (a DNS-rebinding page
  cannot reach the dashboard under its own name).
- Token: `Authorization: Bearer <token>`, or the login form, which sets an HttpOnly,
  SameSite=Strict cookie holding an HMAC of the token (never the token itself).
- CSRF: every state change is a POST carrying the value of the `eb_csrf` cookie in the form
  field `csrf_token` or the `X-CSRF-Token` header (double submit; the cookie is SameSite=Strict
  and a page of another origin cannot read it). A POST whose Origin is another site is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

from pipeline.errors import ConfigError

CSRF_COOKIE = "eb_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
AUTH_COOKIE = "eb_auth"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
OPEN_PATHS = ("/login", "/healthz", "/static/")
SECURITY_HEADERS = {
    # Scripts and styles only from our own static files: no inline script can run.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port: `[::1]:8700` -> `[::1]`."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (ConfigError names the setting)."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without a token: set "
            "EDITBATCH_DASHBOARD_TOKEN (a long random string; people sign in with it), or "
            "serve on 127.0.0.1 (the default) and reach it through an SSH tunnel"
        )


def session_value(token: str) -> str:
    """What the login cookie holds: an HMAC of the token, so the cookie is not the token."""
    return hmac.new(token.encode(), b"editbatch-dashboard-session", hashlib.sha256).hexdigest()


def token_ok(request: Request, token: str) -> bool:
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(AUTH_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def csrf_ok(request: Request, submitted: str | None) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = submitted or request.headers.get(CSRF_HEADER, "")
    if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
        return False
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        return urlsplit(origin).netloc == host
    return True


def safe_next(target: str | None, default: str = "/") -> str:
    """A same-site path to go back to (never another site: no scheme, no //host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


class Guard(BaseHTTPMiddleware):
    """Token check, Host check, CSRF cookie and security headers on every response."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: tuple[str, ...]) -> None:
        super().__init__(app)
        self.token = token
        self.hosts = hosts

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if self.hosts and host_name(request.headers.get("host", "")) not in self.hosts:
            return PlainTextResponse(
                "unknown Host: without EDITBATCH_DASHBOARD_TOKEN the dashboard answers only "
                "to localhost",
                status_code=400,
            )
        path = request.url.path
        if self.token and not path.startswith(OPEN_PATHS) and not token_ok(request, self.token):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
            return PlainTextResponse(
                "sign in: send Authorization: Bearer <EDITBATCH_DASHBOARD_TOKEN>, or use /login",
                status_code=401,
            )
        csrf = request.cookies.get(CSRF_COOKIE)
        fresh = None
        if not csrf:
            fresh = csrf = secrets.token_urlsafe(32)
        request.state.csrf = csrf
        started = time.perf_counter()
        response = await call_next(request)
        # The server's own time for the request (what bench/dashboard.py reads).
        elapsed_ms = (time.perf_counter() - started) * 1000
        response.headers["server-timing"] = f"app;dur={elapsed_ms:.1f}"
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if fresh:
            response.set_cookie(
                CSRF_COOKIE,
                fresh,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response
