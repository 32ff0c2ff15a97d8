"""doctor's checks without servers: the list runs in order and skips after bad settings, a
failing check cannot take the list down, typos in variable names are caught, old data fails,
the rate-limit comparison says the figure to set, and each provider and deployment is checked
(the sandbox in process, answering as Azure does)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.operations import rate_limit_check
from pipeline.errors import ConfigError
from pipeline.observe.doctor import CHECKS, Check, Context, check_data, run_checks
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY
from tests.fakes import InProcessAPI
from tests.unit import helpers
from tests.unit.helpers import AZURE_KEY, AZURE_VERSION, SANDBOX_ROOT, azure_api


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


# -- providers and deployments (the sandbox in process answers as Azure does) -----------------

VERSION = AZURE_VERSION
ROOT = SANDBOX_ROOT


@pytest.fixture(name="azure_api")
def azure_api_fixture(tmp_path: Path) -> Iterator[InProcessAPI]:
    with azure_api(tmp_path) as fake:
        yield fake


def azure_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Azure alone: no OpenAI key (doctor checks OpenAI's only when OpenAI is in use)."""
    return helpers.azure_settings(tmp_path, **{"openai_api_key": None, **overrides})


PROVIDER_CHECKS = [
    entry for entry in CHECKS if entry[0] in ("provider", "api key", "models", "deployments")
]


def provider_checks(
    settings: Settings, api: InProcessAPI, uses: tuple[tuple[str | None, str], ...] = ()
) -> dict[str, Check]:
    ctx = Context(load_settings=lambda: settings, uses=uses, http_client=api.client())
    ctx.settings = settings
    return {check.name: check for check in run_checks(ctx, PROVIDER_CHECKS)}


def test_a_healthy_azure_provider_passes_each_deployment_for_free(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, azure_api: InProcessAPI
) -> None:
    """Azure as the default provider (no OpenAI key): one ✓ for the provider, one for the
    model it deploys, one per deployment (an edit with n=0 refused after everything else was
    accepted); OpenAI's key is not asked for, and nothing is billed."""
    checks = provider_checks(azure_settings(tmp_path), azure_api)
    assert list(checks) == [
        "provider azure",
        "model gpt-image-2 on azure",
        "deployment azure:img-a",
        "deployment azure:img-b",
    ]
    assert all(c.ok and not c.skipped for c in checks.values()), checks
    assert checks["model gpt-image-2 on azure"].detail.startswith("deployed as img-a, img-b")
    assert "api-version, key and deployment accepted" in checks["deployment azure:img-a"].detail
    assert not Path(str(azure_api.config.billing_log)).exists()


@pytest.mark.parametrize(
    ("overrides", "failing", "said", "fix"),
    [
        (
            {"azure_deployments": "gpt-image-2=img-a,gpt-image-2=img-typo"},
            {"deployment azure:img-typo"},
            "has no deployment img-typo",
            "correct the deployment name of gpt-image-2 in EDITBATCH_AZURE_DEPLOYMENTS",
        ),
        (
            {"azure_openai_api_key": "wrong-key-000001"},
            {"deployment azure:img-a", "deployment azure:img-b"},
            "refused the credential: 401",
            "set AZURE_OPENAI_API_KEY to a valid key",
        ),
        (
            {"openai_api_version": "2023-01-01"},
            {"deployment azure:img-a", "deployment azure:img-b"},
            "API version not supported",
            "set OPENAI_API_VERSION to an api-version the resource supports",
        ),
    ],
)
def test_a_wrong_azure_setting_fails_its_deployments_with_the_setting_to_fix(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    azure_api: InProcessAPI,
    overrides: dict[str, Any],
    failing: set[str],
    said: str,
    fix: str,
) -> None:
    """A wrong deployment name, a wrong key and an api-version the resource does not take each
    give a ✗ on exactly the deployments they break, saying what Azure answered and naming the
    setting that fixes it; the provider itself still answers."""
    checks = provider_checks(azure_settings(tmp_path, **overrides), azure_api)
    bad = {name for name, c in checks.items() if not c.ok}
    assert bad == failing, checks
    for name in failing:
        assert said in checks[name].detail, checks[name]
        assert checks[name].fix.startswith(fix), checks[name]
    assert checks["provider azure"].ok


def test_a_toml_provider_names_its_own_keys_and_a_manifest_provider_must_exist(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, azure_api: InProcessAPI
) -> None:
    """A [providers.NAME] table's mistake is fixed in the table (its key named); OpenAI, in use
    beside it, gets its usual checks; a provider the manifest names that is not configured, and
    a model a provider does not deploy, are each a ✗ by provider and model."""
    clean_env.setenv("EAST_KEY", AZURE_KEY)
    east = {
        "kind": "azure",
        "endpoint": ROOT,
        "api_version": VERSION,
        "api_key_env": "EAST_KEY",
        "deployments": {"gpt-image-2": ["img-a", "img-gone"]},
    }
    settings = azure_settings(
        tmp_path,
        provider="openai",
        azure_deployments=None,
        providers={"east": east},
        openai_api_key=FAKE_KEY,
        openai_base_url=f"{ROOT}/v1",
    )
    uses = (
        (None, "gpt-image-2"),
        ("east", "gpt-image-2"),
        ("east", "gpt-image-1.5"),
        ("west", "gpt-image-2"),
    )
    checks = provider_checks(settings, azure_api, uses)
    assert [n for n, c in checks.items() if c.ok] == [
        "provider openai",
        "provider east",
        "api key",
        "model gpt-image-2 on east",
        "model gpt-image-2",
        "deployment east:img-a",
    ]
    gone = checks["deployment east:img-gone"]
    assert not gone.ok and gone.fix.startswith(
        "correct the deployment name of gpt-image-2 in providers.east.deployments "
        "(EDITBATCH_CONFIG)"
    )
    undeployed = checks["model gpt-image-1.5 on east"]
    assert not undeployed.ok and "provider east has no deployment of gpt-image-1.5" in (
        undeployed.detail
    )
    unknown = checks["model gpt-image-2 on west"]
    assert not unknown.ok and "provider west (named by the manifest) is not configured" in (
        unknown.detail
    )


def test_provider_settings_that_cannot_be_read_are_one_failure(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, azure_api: InProcessAPI
) -> None:
    checks = provider_checks(azure_settings(tmp_path, openai_api_version=None), azure_api)
    assert list(checks) == ["providers"]
    assert "OPENAI_API_VERSION is not" in checks["providers"].detail
    assert "docs/providers.md" in checks["providers"].fix
