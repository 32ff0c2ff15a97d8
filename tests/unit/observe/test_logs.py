"""Logging: plain or JSON lines, levels, and OpenAI keys redacted from every record."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from pipeline.observe.logs import REDACTED, JsonFormatter, RedactKeys, redact, setup_logging
from pipeline.settings import get_settings

KEY = "sk-proj-" + "Ab3_x-9" * 8  # shaped like a real key; not one
LEGACY_KEY = "sk-" + "a1B2c3D4e5" * 5


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[logging.Logger]:
    """Leave the root logger as the test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    filters = {h: list(h.filters) for h in handlers}
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h, fs in filters.items():
        h.filters[:] = fs
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key={KEY}", f"key={REDACTED}"),
        (f"Bearer {LEGACY_KEY}.", f"Bearer {REDACTED}."),
        (f"{KEY} and {LEGACY_KEY}", f"{REDACTED} and {REDACTED}"),
        ("sk-short-key", "sk-short-key"),  # fewer than 20 key characters: not a key
        ("sk-sandbox-local", "sk-sandbox-local"),
        ("no key here", "no key here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_key_in_an_argument_is_redacted() -> None:
    stream = io.StringIO()
    setup_logging(json=False, level="INFO", stream=stream)
    logging.getLogger("editbatch.test").warning("calling with %s (%d)", KEY, 3)
    (line,) = lines(stream)
    assert KEY not in line
    assert f"calling with {REDACTED} (3)" in line


def test_a_key_in_a_traceback_is_redacted() -> None:
    stream = io.StringIO()
    setup_logging(json=False, level="INFO", stream=stream)
    try:
        raise RuntimeError(f"Incorrect API key provided: {KEY}")
    except RuntimeError:
        logging.getLogger("editbatch.test").exception("call failed")
    text = stream.getvalue()
    assert "RuntimeError: Incorrect API key provided: " + REDACTED in text
    assert KEY not in text


def test_a_key_in_extra_fields_is_redacted_in_json() -> None:
    stream = io.StringIO()
    setup_logging(json=True, level="INFO", stream=stream)
    logging.getLogger("editbatch.test").info(
        "request", extra={"headers": {"authorization": f"Bearer {KEY}"}, "keys": [LEGACY_KEY]}
    )
    (line,) = lines(stream)
    entry = json.loads(line)
    assert entry["headers"] == {"authorization": f"Bearer {REDACTED}"}
    assert entry["keys"] == [REDACTED]
    assert KEY not in line and LEGACY_KEY not in line


def test_records_from_child_loggers_are_redacted_by_the_handler_filter() -> None:
    stream = io.StringIO()
    handler = setup_logging(json=False, level="DEBUG", stream=stream)
    assert any(isinstance(f, RedactKeys) for f in handler.filters)
    # A third-party logger with its own level, propagating to the root handler.
    lib = logging.getLogger("openai._base_client.deep")
    lib.debug("Request options: %s", {"headers": {"Authorization": f"Bearer {KEY}"}})
    assert KEY not in stream.getvalue()
    assert REDACTED in stream.getvalue()


def test_other_root_handlers_get_the_filter_too() -> None:
    other_stream = io.StringIO()
    other = logging.StreamHandler(other_stream)
    logging.getLogger().addHandler(other)
    setup_logging(json=False, level="INFO", stream=io.StringIO())
    logging.getLogger("editbatch.test").warning("%s", KEY)
    assert KEY not in other_stream.getvalue()


# --- formats and levels ------------------------------------------------------------------------


def test_json_lines_have_ts_level_logger_msg_and_extras() -> None:
    stream = io.StringIO()
    setup_logging(json=True, level="INFO", stream=stream)
    log = logging.getLogger("editbatch.executor")
    log.info("job %s succeeded", 7, extra={"job_id": 7, "batch_id": 2})
    log.debug("not shown at INFO")
    (line,) = lines(stream)
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "editbatch.executor"
    assert entry["msg"] == "job 7 succeeded"
    assert entry["job_id"] == 7 and entry["batch_id"] == 2
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert list(entry)[:4] == ["ts", "level", "logger", "msg"]


def test_json_exception_and_unserialisable_extra() -> None:
    stream = io.StringIO()
    setup_logging(json=True, level="INFO", stream=stream)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("x").error("boom", exc_info=True, extra={"obj": object()})
    entry = json.loads(lines(stream)[0])
    assert "ZeroDivisionError" in entry["exc"]
    assert entry["obj"].startswith("<object object")


def test_an_extra_cannot_overwrite_the_standard_keys() -> None:
    record = logging.LogRecord("real", logging.INFO, __file__, 1, "hello", None, None)
    record.logger = "fake"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["logger"] == "real"


def test_plain_format() -> None:
    stream = io.StringIO()
    setup_logging(json=False, level="warning", stream=stream)
    logging.getLogger("editbatch.cli").info("hidden")
    logging.getLogger("editbatch.cli").warning("shown")
    (line,) = lines(stream)
    assert line.endswith(" WARNING editbatch.cli: shown")


def test_setup_again_replaces_its_own_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(json=False, level="INFO", stream=first)
    setup_logging(json=True, level="INFO", stream=second)
    logging.getLogger("editbatch").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_warnings_become_json_lines() -> None:
    stream = io.StringIO()
    setup_logging(json=True, level="INFO", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated option; key {KEY}", DeprecationWarning, stacklevel=1)
    entry = json.loads(lines(stream)[-1])
    assert entry["logger"] == "py.warnings" and entry["level"] == "WARNING"
    assert "DeprecationWarning: deprecated option; key " + REDACTED in entry["msg"]


def test_numeric_level_and_unknown_level() -> None:
    setup_logging(level=logging.DEBUG, stream=io.StringIO())
    assert logging.getLogger().level == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging(level="LOUD", stream=io.StringIO())


# --- hooks: the CLI and the Celery worker ------------------------------------------------------


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_main_logs_json_lines_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_settings: None
) -> None:
    from pipeline import cli

    monkeypatch.setenv("EDITBATCH_LOG_JSON", "true")
    monkeypatch.setenv("EDITBATCH_LOG_LEVEL", "info")
    monkeypatch.setattr(
        cli, "app", lambda: logging.getLogger("editbatch.cli").info("using %s", KEY)
    )
    cli.main()
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["msg"] == f"using {REDACTED}"
    assert entry["level"] == "INFO"


def test_cli_main_survives_an_invalid_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_settings: None
) -> None:
    from pipeline import cli

    monkeypatch.setenv("EDITBATCH_LOG_LEVEL", "LOUD")
    monkeypatch.setattr(cli, "app", lambda: logging.getLogger("editbatch.cli").warning("ran"))
    cli.main()  # the command itself reports bad settings; logging falls back to plain WARNING
    assert capsys.readouterr().err.strip().endswith("WARNING editbatch.cli: ran")


def test_celery_setup_logging_signal_installs_our_handler(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    from celery import signals

    import worker.app  # noqa: F401  (connects the receivers)

    monkeypatch.setenv("EDITBATCH_LOG_JSON", "true")
    monkeypatch.delenv("EDITBATCH_LOG_LEVEL", raising=False)
    get_settings.cache_clear()  # importing worker.app read the settings already
    # What Celery does at worker start; with a receiver it configures no handler of its own.
    responses = signals.setup_logging.send(
        sender=None, loglevel=logging.INFO, logfile=None, format="", colorize=False
    )
    assert responses and not any(isinstance(r, Exception) for _, r in responses)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    assert root.level == logging.INFO  # the worker's --loglevel when EDITBATCH_LOG_LEVEL is unset


def test_a_key_of_another_shape_is_redacted_once_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An Azure key (32 hex digits, no `sk-`) is redacted from records once the gateway that
    uses it registered it; `sk-` keys need no registration."""
    from pipeline.observe import logs

    monkeypatch.setattr(logs, "_SECRETS", set())
    azure_key = "0123456789abcdef0123456789abcdef"
    stream = io.StringIO()
    setup_logging(json=True, level="INFO", stream=stream)
    logging.getLogger("editbatch.test").warning("api-key %s", azure_key)
    logs.add_secret(azure_key)
    logs.add_secret("sk-sandbox-local")  # sk- shaped: left to the pattern
    logging.getLogger("editbatch.test").warning("api-key %s", azure_key)
    first, second = (json.loads(line)["msg"] for line in lines(stream))
    assert first == f"api-key {azure_key}"
    assert second == f"api-key {REDACTED}"
    assert redact("sk-sandbox-local") == "sk-sandbox-local"
