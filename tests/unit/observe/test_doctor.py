"""doctor's checks without servers: the list runs in order and skips after bad settings, a
failing check cannot take the list down, typos in variable names are caught, old data fails,
and the rate-limit comparison says the figure to set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date

import pytest

from pipeline.cli.operations import rate_limit_check
from pipeline.errors import ConfigError
from pipeline.observe.doctor import CHECKS, Check, Context, check_data, run_checks
from pipeline.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith(("EDITBATCH_", "OPENAI_")):
            monkeypatch.delenv(name)
    yield monkeypatch


def test_bad_settings_skip_every_other_check(clean_env: pytest.MonkeyPatch) -> None:
    def bad() -> Settings:
        raise ConfigError("EDITBATCH_CONCURRENCY='x': not a number")

    results = run_checks(Context(load_settings=bad))
    assert results[0] == Check(
        "settings",
        False,
        "EDITBATCH_CONCURRENCY='x': not a number",
        "correct the value(s) named above",
    )
    assert [r.name for r in results[1:]] == [name for name, _ in CHECKS[1:]]
    assert all(r.skipped and not r.ok for r in results[1:])


def test_a_variable_that_is_no_setting_is_named_with_the_nearest(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("EDITBATCH_CONCURENCY", "4")
    results = run_checks(Context(load_settings=Settings), [CHECKS[0]])
    assert not results[0].ok
    assert results[0].detail == (
        "not settings, ignored: EDITBATCH_CONCURENCY (did you mean EDITBATCH_CONCURRENCY?)"
    )


def test_a_check_that_raises_is_a_failure_not_a_crash(clean_env: pytest.MonkeyPatch) -> None:
    def broken(_: Context) -> list[Check]:
        raise RuntimeError("boom")

    results = run_checks(Context(load_settings=Settings), [CHECKS[0], ("broken", broken)])
    assert results[0].ok
    assert results[1] == Check("broken", False, "the check itself failed: RuntimeError('boom')")


def test_price_and_catalogue_data_older_than_the_setting_fail(
    clean_env: pytest.MonkeyPatch,
) -> None:
    ctx = Context(load_settings=Settings, today=date(2027, 3, 1))
    ctx.settings = Settings(max_data_age_days=30)
    results = check_data(ctx)
    assert [r.name for r in results] == ["prices", "catalogue"]
    assert not any(r.ok for r in results)
    assert "days old (more than EDITBATCH_MAX_DATA_AGE_DAYS=30)" in results[0].detail
    assert "EDITBATCH_PRICES_FILE" in results[0].fix
    ctx.settings = Settings(max_data_age_days=1000)
    assert all(r.ok for r in check_data(ctx))


@pytest.mark.parametrize(
    ("headers", "configured", "ok", "says"),
    [
        ({"x-ratelimit-limit-requests": "250"}, 250, True, "within the account's 250/min"),
        ({"x-ratelimit-limit-requests": "250"}, 300, False, "set EDITBATCH_IMAGES_PER_MINUTE=250"),
        ({"x-ratelimit-limit-images": "50"}, None, False, "set EDITBATCH_IMAGES_PER_MINUTE=50"),
        ({}, 100, True, "no rate-limit header"),
    ],
)
def test_rate_limit_against_the_setting(
    headers: dict[str, str], configured: int | None, ok: bool, says: str
) -> None:
    check = rate_limit_check(headers, configured, "paid $0.01")
    assert check.ok is ok
    assert says in check.detail + check.fix
    assert check.detail.startswith("paid $0.01")
