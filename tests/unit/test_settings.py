"""Every configuration mistake is one line naming the setting, the value and what is accepted.

The table `BAD` holds one bad value for every field of `Settings`; a test holds the table to the
model, so a new setting cannot be added without saying what a mistake in it looks like. Each
case runs the real entry point (`pipeline.cli.main`, as `editbatch status` does) in this process:
exit status 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings, accepted, get_settings, variable

SECRET = "sk-not shown-0123456789"

Value = str | Callable[[Path], str]


def _a_file(tmp: Path) -> str:
    path = tmp / "a-file"
    path.write_text("x")
    return str(path)


# field -> a bad value as an environment variable would carry it (or a function of tmp_path).
BAD: dict[str, Value] = {
    "home": _a_file,
    "database_url": "editbatch.db",
    "broker_url": "localhost:6379",
    "redis_url": "http://localhost:6379",
    "spool_dir": _a_file,
    "default_model": "gpt image 1.5",
    "shutdown_warn_days": "-1",
    "concurrency": "abc",
    "images_per_minute": "0",
    "max_in_flight": "-4",
    "model_limits": "{gpt-image-1: 5}",
    "max_attempts": "51",
    "backoff_base_seconds": "0",
    "backoff_max_seconds": "one minute",
    "request_timeout_seconds": "-1",
    "lease_seconds": "60",  # shorter than the request timeout (300 s)
    "prices_file": lambda tmp: str(tmp / "missing-prices.toml"),
    "catalog_file": lambda tmp: str(tmp / "missing-catalog.toml"),
    "daily_budget_usd": "ten dollars",
    "metrics_port": "70000",
    "log_json": "maybe",
    "log_level": "LOUD",
    "remote_schemes": "s3",
    "remote_max_image_bytes": "50MB",
    "remote_max_manifest_bytes": "0",
    "nightly_manifest": "s3://bucket/{day}.csv",
    "nightly_output": "out/{date.year}",
    "nightly_budget_usd": "-1",
    "nightly_cron": "at two",
    "webhook_url": "hooks.example.com/x",
    "webhook_secret": "   ",
    "webhook_timeout_seconds": "0",
    "webhook_attempts": "0",
    "nightly_route": "tonight",
    "batch_poll_seconds": "0",
    "batch_max_lines": "60000",
    "batch_max_bytes": "200MB",
    "dashboard_token": SECRET,
    "breaker_threshold": "1",
    "breaker_probe_seconds": "0",
    "breaker_probe_max_seconds": "soon",
    "breaker_give_up_seconds": "-5",
    "broker_check_seconds": "-1",
    "max_data_age_days": "0",
    "openai_admin_key": SECRET,
    "openai_api_key": SECRET,
    "openai_base_url": "api.openai.com/v1",
    "provider": "azure east",
    "providers": "azure-east",  # not the JSON of [providers.NAME] tables
    "azure_deployments": "gpt-image-2",  # no =DEPLOYMENT
    "azure_requests_per_minute": "0",
    "azure_auth": "password",
    "azure_openai_endpoint": "my-resource.openai.azure.com",
    "azure_openai_api_key": SECRET,
    "openai_api_version": "2025-04-01 preview",
}
SECRETS = {
    "openai_api_key",
    "openai_admin_key",
    "webhook_secret",
    "dashboard_token",
    "azure_openai_api_key",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No EDITBATCH_*/OPENAI_* variable from the machine; the settings are read again."""
    import os

    for name in list(os.environ):
        if name.startswith(("EDITBATCH_", "OPENAI_")):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`editbatch ARGS` through the real entry point; its exit status."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["editbatch", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def test_the_table_covers_every_setting() -> None:
    """A new setting needs a bad value here: every field has one, and nothing else is listed."""
    assert set(BAD) == set(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_one_line_naming_the_setting_and_exit_2(
    name: str,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`EDITBATCH_X=bad editbatch status` exits 2 with one line: the variable, the value (secrets
    hidden) and what is wrong or accepted; no traceback."""
    raw = BAD[name]
    value = raw(tmp_path) if callable(raw) else raw
    clean_env.chdir(tmp_path)
    clean_env.setenv(variable(name), value)
    assert run_cli(clean_env, "status") == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: "), line
    assert variable(name) in line, line
    assert "Traceback" not in captured.err + captured.out
    if name in SECRETS:
        assert value.strip() not in line or not value.strip(), "a secret was printed"
        assert "(hidden)" in line
    elif name != "lease_seconds":  # the rule over two settings names both, with the values
        assert repr(value) in line, line


def test_type_errors_say_what_is_accepted() -> None:
    """A value of the wrong kind is answered with the kind and the bounds of the setting."""
    with pytest.raises(ConfigError) as info:
        Settings(concurrency="abc")
    assert str(info.value) == (
        "EDITBATCH_CONCURRENCY='abc': input should be a valid integer, unable to parse string "
        "as an integer; accepted: a whole number (at least 1, at most 1000)"
    )
    assert accepted("daily_budget_usd") == "an amount in USD (at least 0), e.g. 25.00"
    assert accepted("log_json") == "true or false"


def test_several_bad_settings_give_one_line_each(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDITBATCH_CONCURRENCY", "x")
    clean_env.setenv("EDITBATCH_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError) as info:
        Settings()
    lines = str(info.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "EDITBATCH_CONCURRENCY",
        "EDITBATCH_MAX_ATTEMPTS",
    ]


def test_toml_mistakes_name_the_key_and_the_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In a TOML file, the key and its file are named; an unknown key (a typo) is refused with
    the nearest setting; a missing file or broken TOML names EDITBATCH_CONFIG."""
    config = tmp_path / "editbatch.toml"
    clean_env.setenv("EDITBATCH_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"EDITBATCH_CONFIG='.*editbatch.toml': no such file"):
        Settings()
    config.write_text('max_attempts = "many"\n')
    with pytest.raises(ConfigError) as info:
        Settings()
    assert str(info.value).startswith(f"max_attempts (in {config})='many': ")
    config.write_text("concurency = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'concurency' \(did you mean 'concurrency'"):
        Settings()
    config.write_text("concurrency = \n")
    with pytest.raises(ConfigError, match=r"EDITBATCH_CONFIG=.*: not valid TOML"):
        Settings()
    config.write_text("concurrency = 3\n")
    assert Settings().concurrency == 3


def test_a_missing_database_driver_names_the_extra(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A postgresql+psycopg:// URL without psycopg installed says to install editbatch[postgres]
    (the password is not printed)."""
    clean_env.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails as if missing
    clean_env.setenv("EDITBATCH_DATABASE_URL", "postgresql+psycopg://me:pw123@db.local/editbatch")
    assert run_cli(clean_env, "status") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: EDITBATCH_DATABASE_URL='postgresql+psycopg://me:***@db.local/editbatch' needs "
        "the database driver 'psycopg', which is not installed: pip install 'editbatch[postgres]'"
    )
