"""Providers from settings: the SDK's Azure variables plus one mapping, the TOML form for
several providers, lanes and their limits, price overrides, and errors that name the setting."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.batch.submit import sync_duration
from pipeline.cost.estimate import Estimate, estimate_batch
from pipeline.cost.pricing import Usage, load_prices
from pipeline.errors import ConfigError
from pipeline.providers import (
    AZURE_FORMATS,
    Auth,
    Kind,
    LaneLimit,
    account_id,
    parse_deployment_pairs,
    providers_of,
)
from pipeline.settings import Settings

ENDPOINT = "https://my-resource.openai.azure.com"
AZURE_ENV = {
    "EDITBATCH_PROVIDER": "azure",
    "AZURE_OPENAI_ENDPOINT": ENDPOINT,
    "AZURE_OPENAI_API_KEY": "azure-key-000000000001",
    "OPENAI_API_VERSION": "2025-04-01-preview",
    "EDITBATCH_AZURE_DEPLOYMENTS": "gpt-image-2=img2-a,gpt-image-2=img2-b,gpt-image-1.5=img15",
}


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AZURE_ENV.items():
        monkeypatch.setenv(name, value)


def test_the_simplest_azure_setup_is_the_sdk_variables_and_one_mapping(azure_env: None) -> None:
    """EDITBATCH_PROVIDER=azure, AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, OPENAI_API_VERSION
    and EDITBATCH_AZURE_DEPLOYMENTS make the default provider: a model named twice gets two
    lanes, each counting requests, and Azure's formats (no WEBP)."""
    providers = providers_of(Settings())
    azure = providers.get(None)
    assert providers.default == "azure" and azure.kind == Kind.AZURE
    assert azure.connection.url == ENDPOINT
    assert azure.connection.api_version == "2025-04-01-preview"
    assert azure.connection.auth == Auth.API_KEY
    assert azure.connection.api_key == "azure-key-000000000001"
    lanes = providers.lanes("azure", "gpt-image-2")
    assert [lane.deployment for lane in lanes] == ["img2-a", "img2-b"]
    assert [lane.scope for lane in lanes] == ["azure:img2-a", "azure:img2-b"]
    assert all(lane.per_request and lane.units(4) == 1 for lane in lanes)
    assert azure.output_formats == AZURE_FORMATS and azure.input_formats == AZURE_FORMATS
    assert providers.names() == ("azure", "openai")  # OpenAI stays available by name
    with pytest.raises(ConfigError, match=r"provider azure has no deployment of gpt-image-2.5"):
        providers.lanes("azure", "gpt-image-2.5-flare")


def test_azure_limits_from_the_environment_apply_per_deployment(
    azure_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITBATCH_AZURE_REQUESTS_PER_MINUTE", "10")
    monkeypatch.setenv("EDITBATCH_MAX_IN_FLIGHT", "3")
    providers = providers_of(Settings())
    for scope in ("azure:img2-a", "azure:img2-b", "azure:img15"):
        assert providers.limit_for(scope) == LaneLimit(10, 3, account=account_id(ENDPOINT))
    assert providers.any_limit()


@pytest.mark.parametrize(
    ("unset", "extra", "message"),
    [
        ("OPENAI_API_VERSION", {}, "OPENAI_API_VERSION is not.*2025-04-01-preview"),
        ("AZURE_OPENAI_API_KEY", {}, "AZURE_OPENAI_API_KEY is not.*EDITBATCH_AZURE_AUTH=entra_id"),
        ("AZURE_OPENAI_ENDPOINT", {}, "set AZURE_OPENAI_ENDPOINT, e.g. https://"),
        (None, {"EDITBATCH_AZURE_DEPLOYMENTS": "gpt-image-2"}, "'gpt-image-2' is not MODEL="),
        (None, {"EDITBATCH_AZURE_AUTH": "password"}, "EDITBATCH_AZURE_AUTH='password'"),
        (None, {"AZURE_OPENAI_ENDPOINT": "my-resource"}, "AZURE_OPENAI_ENDPOINT=.*not an https"),
    ],
)
def test_a_missing_or_bad_azure_variable_is_named(
    azure_env: None,
    monkeypatch: pytest.MonkeyPatch,
    unset: str | None,
    extra: dict[str, str],
    message: str,
) -> None:
    if unset:
        monkeypatch.delenv(unset)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        providers_of(Settings())


def test_entra_id_needs_no_key_and_sends_none(
    azure_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITBATCH_AZURE_AUTH", "entra_id")
    azure = providers_of(Settings()).get("azure")
    assert azure.connection.auth == Auth.ENTRA_ID
    assert azure.connection.api_key == ""  # the key left in the environment is not sent


def test_choosing_azure_without_configuring_it_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITBATCH_PROVIDER", "azure")
    with pytest.raises(ConfigError, match=r"EDITBATCH_PROVIDER='azure'.*EDITBATCH_AZURE_DEPLOY"):
        providers_of(Settings())


def test_deployment_pairs_accumulate_and_refuse_repeats() -> None:
    assert parse_deployment_pairs(" a=x , a=y,b=z ", "V") == {"a": ["x", "y"], "b": ["z"]}
    with pytest.raises(ConfigError, match="a=x is given twice"):
        parse_deployment_pairs("a=x,a=x", "V")
    with pytest.raises(ConfigError, match="no ':' or spaces"):
        parse_deployment_pairs("a=x:y", "V")


TOML = """
provider = "azure-east"

[providers.openai]
images_per_minute = 250
max_in_flight = 100
model_limits = { "gpt-image-1-mini" = { images_per_minute = 50 } }

[providers.azure-east]
kind = "azure"
endpoint = "https://east.openai.azure.com"
api_version = "2025-04-01-preview"
api_key_env = "EAST_KEY"
requests_per_minute = 10
max_in_flight = 4

[providers.azure-east.deployments]
"gpt-image-2" = [
  "img2",
  WEST_TABLE,
]

[providers.azure-east.prices."gpt-image-2"]
text_input = "4.00"
image_input = "6.00"
image_output = "24.00"

[providers.gateway]
kind = "compatible"
base_url = "https://litellm.internal/v1"
api_key_env = "GATEWAY_KEY"
models = ["gpt-image-2", "gpt-image-2.5-flare"]
images_per_minute = 60
output_formats = ["png", "jpeg", "webp"]
"""


# A TOML inline table must be on one line.
WEST_TABLE = (
    '{ name = "img2", endpoint = "https://west.openai.azure.com", api_key_env = "WEST_KEY", '
    "requests_per_minute = 12 }"
)


@pytest.fixture
def toml_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    path = tmp_path / "editbatch.toml"
    path.write_text(TOML.replace("WEST_TABLE", WEST_TABLE), encoding="utf-8")
    monkeypatch.setenv("EDITBATCH_CONFIG", str(path))
    monkeypatch.setenv("EAST_KEY", "east-key-000000000001")
    monkeypatch.setenv("WEST_KEY", "west-key-000000000001")
    monkeypatch.setenv("GATEWAY_KEY", "gw-key-000000000001")
    return Settings()


def test_the_toml_form_covers_several_providers_with_their_own_limits(
    toml_settings: Settings,
) -> None:
    """[providers.NAME] tables: the default provider, each provider's limits per lane, one
    model on two regions (the same deployment name is two lanes), a compatible gateway."""
    providers = providers_of(toml_settings)
    assert providers.default == "azure-east"
    assert providers.names() == ("azure-east", "gateway", "openai")

    east, west = providers.lanes("azure-east", "gpt-image-2")
    assert (east.scope, west.scope) == ("azure-east:img2", "azure-east:img2@west.openai.azure.com")
    assert east.connection.api_key == "east-key-000000000001"
    assert west.connection.api_key == "west-key-000000000001"
    assert west.connection.url == "https://west.openai.azure.com"
    assert providers.limit_for(east.scope).per_minute == 10
    assert providers.limit_for(west.scope) == LaneLimit(
        12, 4, account=account_id("https://west.openai.azure.com")
    )

    assert providers.limit_for("openai:gpt-image-1-mini").per_minute == 50
    assert providers.limit_for("openai:gpt-image-2").per_minute == 250
    assert providers.limit_for("openai:gpt-image-2").max_in_flight == 100
    gateway = providers.get("gateway")
    assert gateway.connection.url == "https://litellm.internal/v1"
    assert gateway.connection.api_key == "gw-key-000000000001"
    assert providers.limit_for("gateway:gpt-image-2").per_minute == 60
    assert gateway.output_formats == ("png", "jpeg", "webp")
    with pytest.raises(ConfigError, match=r"provider gateway does not serve gpt-image-1.5"):
        providers.lanes("gateway", "gpt-image-1.5")
    assert providers.limit_for("nobody:gpt-image-2") == LaneLimit()
    # one SDK client per endpoint and key: openai, east, west, the gateway
    assert len(providers.connections()) == 4


def test_a_providers_prices_override_the_table_for_its_calls_only(
    toml_settings: Settings,
) -> None:
    providers = providers_of(toml_settings)
    prices = providers.prices(load_prices())
    usage = Usage(text_input=1_000_000, image_input=1_000_000, image_output=1_000_000)
    assert prices.cost("gpt-image-2", usage, "azure-east") == Decimal("34.000000")
    assert prices.cost("gpt-image-2", usage, "openai") == Decimal("43.000000")
    assert prices.cost("gpt-image-2", usage) == Decimal("34.000000")  # the default: azure-east
    assert load_prices().cost("gpt-image-2", usage, "azure-east") == Decimal("43.000000")


def test_the_toml_keys_are_masked_in_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "editbatch.toml"
    path.write_text(
        '[providers.gw]\nkind = "compatible"\nbase_url = "https://gw/v1"\n'
        'api_key = "gw-secret-123456789"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("EDITBATCH_CONFIG", str(path))
    settings = Settings()
    assert providers_of(settings).get("gw").connection.api_key == "gw-secret-123456789"
    shown = str(settings.masked())
    assert "gw-secret" not in shown and "****" in shown


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[providers.x]\nbase_url = "https://x/v1"\n', "providers.x needs kind ="),
        ('[providers.x]\nkind = "compatible"\n', "needs base_url"),
        ('[providers.x]\nkind = "bedrock"\n', 'kind = .bedrock.: expected "openai"'),
        (
            '[providers.x]\nkind = "compatible"\nbase_url = "https://x/v1"\nmodel = ["a"]\n',
            "unknown key 'model' \\(did you mean 'models'\\?\\)",
        ),
        (
            '[providers.azure]\nendpoint = "https://a"\napi_version = "v1"\napi_key = "k"\n'
            'images_per_minute = 9\ndeployments = {"gpt-image-2" = "d"}\n',
            "images_per_minute does not apply to kind azure .*requests_per_minute",
        ),
        (
            '[providers.azure]\nendpoint = "https://a"\napi_version = "v1"\napi_key = "k"\n',
            "needs deployments",
        ),
        (
            '[providers.azure]\nendpoint = "https://a"\napi_version = "v1"\n'
            'deployments = {"gpt-image-2" = "d"}\n',
            "variable AZURE_OPENAI_API_KEY .* is not set",
        ),
        (
            '[providers.azure]\nendpoint = "https://a"\napi_version = "v1"\napi_key = "k"\n'
            'deployments = {"gpt-image-2" = "d", "gpt-image-1.5" = "d"}\n',
            "deployment d is given for gpt-image-2 and gpt-image-1.5",
        ),
        (
            '[providers.gw]\nkind = "compatible"\nbase_url = "https://x/v1"\n'
            'api_key_env = "NOPE_NOT_SET"\n',
            "variable NOPE_NOT_SET .* is not set",
        ),
        (
            '[providers.gw]\nkind = "compatible"\nbase_url = "https://x/v1"\n'
            'output_formats = ["png", "bmp"]\n',
            "output_formats = .*: expected a list drawn from png, webp, jpeg, gif, svg",
        ),
        (
            '[providers.gw]\nkind = "compatible"\nbase_url = "https://x/v1"\n'
            '[providers.gw.prices."gpt-image-2"]\ntext_input = "1"\n',
            "providers.gw.prices: model 'gpt-image-2' lacks image_input, image_output",
        ),
        ('[providers."a b"]\nkind = "openai"\n', "'a b': letters, digits"),
    ],
)
def test_a_bad_provider_table_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, message: str
) -> None:
    path = tmp_path / "editbatch.toml"
    path.write_text(table, encoding="utf-8")
    monkeypatch.setenv("EDITBATCH_CONFIG", str(path))
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=message):
        providers_of(Settings())


def test_without_configuration_there_is_openai_alone_with_the_old_limits() -> None:
    """No provider configured: one provider, openai, whose lanes are its models, limited by
    EDITBATCH_IMAGES_PER_MINUTE / EDITBATCH_MAX_IN_FLIGHT / EDITBATCH_MODEL_LIMITS."""
    settings = Settings(
        openai_api_key="sk-test-0000000000",
        images_per_minute=20,
        model_limits={"gpt-image-1-mini": {"max_in_flight": 2}},
    )
    providers = providers_of(settings)
    assert providers.names() == ("openai",)
    [lane] = providers.lanes(None, "gpt-image-2")
    assert (lane.provider, lane.deployment, lane.scope) == (
        "openai",
        "gpt-image-2",
        "openai:gpt-image-2",
    )
    assert not lane.per_request and lane.units(3) == 3
    account = account_id("sk-test-0000000000")
    assert providers.limit_for(lane.scope) == LaneLimit(20, None, account=account)
    assert providers.limit_for("openai:gpt-image-1-mini") == LaneLimit(20, 2, account=account)
    with pytest.raises(ConfigError, match=r"EDITBATCH_MODEL_LIMITS.*unknown field"):
        providers_of(Settings(model_limits={"m": {"image_per_minute": 5}}))
    assert not providers_of(Settings()).any_limit()


def documented_toml(name: str) -> str:
    import re

    text = (Path(__file__).resolve().parents[2] / name).read_text(encoding="utf-8")
    [example] = re.findall(r"```toml\n(.*?)```", text, re.S)
    return str(example)


def test_the_toml_example_of_docs_providers_md_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented example stays true: it parses into the providers and lanes it describes."""
    example = documented_toml("docs/providers.md")
    path = tmp_path / "editbatch.toml"
    path.write_text(example, encoding="utf-8")
    monkeypatch.setenv("EDITBATCH_CONFIG", str(path))
    for name in ("AZURE_EAST_KEY", "AZURE_WEST_KEY", "LITELLM_KEY"):
        monkeypatch.setenv(name, f"{name.lower()}-0001")
    providers = providers_of(Settings())
    assert providers.default == "azure-east"
    assert providers.names() == ("azure-east", "entra", "gateway", "openai")
    east = providers.lanes("azure-east", "gpt-image-2")
    assert [lane.connection.url for lane in east] == [
        "https://east.openai.azure.com",
        "https://west.openai.azure.com",
    ]
    assert providers.get("entra").connection.auth == Auth.ENTRA_ID
    assert providers.limit_for("openai:gpt-image-1-mini").per_minute == 50


def test_the_toml_example_of_the_readme_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "editbatch.toml"
    path.write_text(documented_toml("README.md"), encoding="utf-8")
    monkeypatch.setenv("EDITBATCH_CONFIG", str(path))
    monkeypatch.setenv("AZURE_EAST_KEY", "east-0001")
    monkeypatch.setenv("LITELLM_KEY", "gw-0001")
    providers = providers_of(Settings())
    assert providers.names() == ("azure-east", "gateway", "openai")
    assert [lane.scope for lane in providers.lanes(None, "gpt-image-2")] == [
        "azure-east:img2-a",
        "azure-east:img2-b",
    ]
    price = providers.prices(load_prices()).get("gpt-image-2", "azure-east")
    assert price is not None and price.image_output == Decimal("24.00")


def test_sandbox_overrides_send_every_lane_to_the_sandbox_with_throwaway_keys(
    toml_settings: Settings, azure_env: None
) -> None:
    """`run --sandbox`: every provider's connection points at the sandbox (no real endpoint,
    no real key), the lanes stay the same lanes, and the sandbox learns the deployments."""
    from pipeline.providers import SANDBOX_KEY, sandbox_overrides

    settings = Settings()  # the TOML and the Azure environment together
    overrides, deployments = sandbox_overrides(settings, "http://127.0.0.1:9999")
    rehearsal = providers_of(settings.model_copy(update=overrides))
    real = providers_of(settings)
    assert rehearsal.names() == real.names()
    for name in rehearsal.names():
        for lane in rehearsal.get(name).all_lanes():
            assert (lane.connection.url or "").startswith(
                ("http://127.0.0.1:9999", "http://localhost:9999")
            )
            assert lane.connection.api_key == SANDBOX_KEY
    assert [lane.scope for lane in rehearsal.lanes("azure-east", "gpt-image-2")] == [
        "azure-east:img2",
        "azure-east:img2@localhost",
    ]
    assert rehearsal.get("gateway").connection.url == "http://127.0.0.1:9999/v1"
    assert rehearsal.get("openai").connection.api_key == SANDBOX_KEY
    assert deployments == {
        "img2": "gpt-image-2",
        "img2-a": "gpt-image-2",
        "img2-b": "gpt-image-2",
        "img15": "gpt-image-1.5",
    }


def _load(provider: str | None, model: str) -> Estimate:
    return Estimate(
        model, Usage(), Decimal("0.01"), Decimal("0.01"), Decimal("0.01"), True, provider
    )


def test_the_estimated_duration_follows_each_providers_lanes(
    azure_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`estimate`'s duration: Azure's two deployments of gpt-image-2 at 10 requests/min each
    carry 600 calls in 30 min (not at one lane's 60 min, nor at EDITBATCH_IMAGES_PER_MINUTE);
    OpenAI's calls beside them run at its own limit, side by side; the phrase names both."""
    monkeypatch.setenv("EDITBATCH_AZURE_REQUESTS_PER_MINUTE", "10")
    monkeypatch.setenv("EDITBATCH_IMAGES_PER_MINUTE", "100")
    monkeypatch.setenv("EDITBATCH_MAX_IN_FLIGHT", "1000")
    settings = Settings()
    azure_only = estimate_batch([(_load("azure", "gpt-image-2"), 2)] * 600)
    took = sync_duration(settings, azure_only)
    assert took.seconds == pytest.approx(30 * 60)  # requests, not images: n=2 counts once
    assert took.limits(settings) == "azure gpt-image-2 at 20 requests/min over 2 deployments"

    both = estimate_batch(
        [(_load("azure", "gpt-image-2"), 1)] * 600 + [(_load("openai", "gpt-image-2"), 1)] * 4000
    )
    took = sync_duration(settings, both)
    assert took.seconds == pytest.approx(40 * 60)  # OpenAI's 4,000 at 100/min is the longer
    assert took.limits(settings) == (
        "azure gpt-image-2 at 20 requests/min over 2 deployments; "
        "openai gpt-image-2 at 100 images/min"
    )


def test_without_providers_the_estimate_reads_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITBATCH_IMAGES_PER_MINUTE", "250")
    monkeypatch.setenv("EDITBATCH_MAX_IN_FLIGHT", "170")
    settings = Settings()
    est = estimate_batch([(_load(None, "gpt-image-2"), 1)] * 1000)
    took = sync_duration(settings, est)
    assert took.seconds == pytest.approx(240.0)
    assert took.limits(settings) == "250 images/min, 170 in flight, ~40 s per call"
