"""Process-wide logging: plain text or JSON lines, with API keys redacted from every record.

`setup_logging` is called once per process: by the CLI's `main()` and by the Celery worker (on
Celery's `setup_logging` signal, so Celery leaves the root logger alone). A JSON line looks like
`{"ts": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "editbatch.executor",
"msg": "...", ...extra}` where the extra keys are whatever the caller passed in `extra=`.

Redaction is belt and braces: the gateway already keeps the key out of what it stores, but a
library or an exception message may still echo it, so every record passing our handlers has
anything shaped like an OpenAI key replaced before it is formatted.
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["REDACTED", "JsonFormatter", "RedactKeys", "add_secret", "redact", "setup_logging"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "sk-[REDACTED]"

# `sk-` then 20+ key characters: covers sk-..., sk-proj-..., sk-svcacct-..., sk-admin-... keys.
_KEY = re.compile(r"sk-[A-Za-z0-9_\-]{20,}")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)

_OURS = "_editbatch_handler"  # marks the handlers setup_logging installed, to replace them


# Keys of other shapes this process holds (an Azure key is 32 hex digits): replaced verbatim.
_SECRETS: set[str] = set()


def add_secret(value: str) -> None:
    """Redact `value` from every record from now on (a key that is not `sk-` shaped; those
    are redacted by their shape already)."""
    if len(value) >= 8 and not value.startswith("sk-"):
        _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every OpenAI-key-shaped substring, and every key given to `add_secret`,
    replaced by REDACTED."""
    for secret in tuple(_SECRETS):
        text = text.replace(secret, REDACTED)
    return _KEY.sub(REDACTED, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


class RedactKeys(logging.Filter):
    """Rewrite a record so that no OpenAI key survives: message, arguments, extras, traceback.

    The message is merged with its arguments first (a key is often an argument). The traceback
    is formatted here, redacted, and left in `exc_text`, which formatters use instead of
    formatting `exc_info` again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call; let the handler report it as usual
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD:
                setattr(record, name, _redact_value(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, extras, exc (if any)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in out:
                out[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(
    json: bool = False, level: str | int = "WARNING", stream: TextIO | None = None
) -> logging.Handler:
    """Log to `stream` (stderr) at `level`, as JSON lines or plain text; returns the handler.

    Calling it again replaces the handler it installed before (other handlers, such as pytest's
    capture, are kept and get the redaction filter too). Python warnings are logged as well.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OURS, False):
            root.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _OURS, True)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    for h in root.handlers:
        if not any(isinstance(f, RedactKeys) for f in h.filters):
            h.addFilter(RedactKeys())
    root.setLevel(_level(level))
    logging.captureWarnings(True)  # warnings become records too: formatted and redacted
    return handler


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return value
