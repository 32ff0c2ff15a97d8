"""Models that go away: the sandbox's calendar, `unavailable_models`, `/v1/models`, keys and
organisation verification, as the real openai SDK sees them."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

import httpx2
import openai
import pytest
from openai.types import ImageModel

from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.sandbox.models import MODELS
from tests.sandbox.helpers import API_KEY, admin, billing_lines, png, upload

IMAGE = upload(png(32, 32))
ENDING = ("gpt-image-1.5", "gpt-image-1-mini", "chatgpt-image-latest")
CURRENT = (
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
)


def _edit(client: openai.OpenAI, model: str) -> int:
    try:
        client.images.edit(image=IMAGE, prompt="p", model=model, size="1024x1024")
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_every_model_of_the_sdk_is_known() -> None:
    """The catalogue covers `openai.types.ImageModel` of the installed SDK, no more, no less."""
    assert set(typing.get_args(ImageModel)) == set(MODELS)


def test_default_model_is_gpt_image_2_5_sunburst(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    client.images.edit(image=IMAGE, prompt="p")
    [line] = billing_lines(sandbox.config.billing_log)
    assert line["model"] == "gpt-image-2.5-sunburst"


@pytest.mark.parametrize(
    ("model", "last_day", "gone_day"),
    [
        *[(name, "2026-11-30", "2026-12-01") for name in ENDING],
        ("gpt-image-1", "2026-10-22", "2026-10-23"),
    ],
)
def test_a_model_answers_until_its_shutdown_date(
    client: openai.OpenAI, sandbox: SandboxServer, model: str, last_day: str, gone_day: str
) -> None:
    """The day before its shutdown a model edits; from the shutdown date on it is 404."""
    sandbox.config.today = last_day
    assert _edit(client, model) == 200
    sandbox.config.today = gone_day
    with pytest.raises(openai.NotFoundError) as info:
        client.images.edit(image=IMAGE, prompt="p", model=model)
    assert info.value.code == "model_not_found"
    assert info.value.param is None
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == (
        f"The model `{model}` does not exist or you do not have access to it."
    )
    assert len(billing_lines(sandbox.config.billing_log)) == 1


def test_current_models_stay_after_the_shutdowns(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.today = "2027-06-01"
    assert [_edit(client, model) for model in CURRENT] == [200] * len(CURRENT)


def test_unavailable_style_400_names_the_shutdown_date(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.today = "2026-12-01"
    sandbox.config.unavailable_style = "400"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", model="gpt-image-1.5")
    error = info.value
    assert (error.type, error.code, error.param) == (
        "invalid_request_error",
        "invalid_value",
        "model",
    )
    assert "shut down on 2026-12-01" in error.message
    assert "gpt-image-2.5-sunburst" in error.message
    # Unknown names stay 404 whatever the style.
    with pytest.raises(openai.NotFoundError):
        client.images.edit(image=IMAGE, prompt="p", model="gpt-image-9")


def test_retired_dall_e_models_are_gone(client: openai.OpenAI) -> None:
    for model in ("dall-e-2", "dall-e-3"):
        with pytest.raises(openai.NotFoundError):
            client.images.edit(image=IMAGE, prompt="p", model=model)


def test_dall_e_3_never_edited(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    """Before its retirement dall-e-3 exists (listed) but the edits endpoint refuses it."""
    sandbox.config.today = "2026-05-11"
    assert "dall-e-3" in {m.id for m in client.models.list()}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", model="dall-e-3")
    assert info.value.param == "model"


def test_a_model_made_unavailable_mid_run_goes_away_from_the_next_request(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    assert _edit(client, "gpt-image-2") == 200
    admin(sandbox.base_url, "config", {"unavailable_models": ["gpt-image-2"]})
    assert _edit(client, "gpt-image-2") == 404
    assert _edit(client, "gpt-image-2.6-flare") == 200
    sandbox.config.unavailable_style = "400"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", model="gpt-image-2")
    assert info.value.param == "model"
    assert "shut down on 2026-11-30" in info.value.message
    assert "gpt-image-2" not in {m.id for m in client.models.list()}


def test_models_list_shows_what_is_available_today(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {*ENDING, *CURRENT}
    assert listed["gpt-image-1.5"].shutdown_date == "2026-12-01"
    assert listed["gpt-image-2.5-sunburst"].shutdown_date is None
    assert listed["gpt-image-2"].owned_by == "system"
    assert listed["gpt-image-2-2026-04-21"].created == int(
        datetime(2026, 4, 21, tzinfo=UTC).timestamp()
    )
    sandbox.config.today = "2026-12-01"
    assert {m.id for m in client.models.list()} == set(CURRENT)
    sandbox.config.today = "2026-05-01"  # before the shutdown was announced (2026-06-02)
    early = {m.id: m for m in client.models.list()}
    assert {"dall-e-2", "dall-e-3", "gpt-image-1"} <= set(early)
    assert early["gpt-image-1.5"].shutdown_date is None


def test_models_retrieve(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    model = client.models.retrieve("gpt-image-2.5-flare")
    assert (model.id, model.object) == ("gpt-image-2.5-flare", "model")
    for gone in ("gpt-image-1", "dall-e-2", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(gone)
        assert info.value.code == "model_not_found"
    sandbox.config.today = "2026-12-01"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1.5")


def test_unverified_organisation_gets_403_on_gpt_image_models(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.org_verified = False
    with pytest.raises(openai.PermissionDeniedError) as edit:
        client.images.edit(image=IMAGE, prompt="p", model="gpt-image-2")
    assert "organization must be verified" in edit.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve("gpt-image-2.5-sunburst")
    # Unknown models are still 404, and listing still works.
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert client.models.list().data
    assert billing_lines(sandbox.config.billing_log) == []


def test_key_models_limit_what_each_key_may_use(sandbox: SandboxServer) -> None:
    sandbox.config.key_models = {"sk-narrow": ["gpt-image-2.5-flare"]}
    narrow = openai.OpenAI(api_key="sk-narrow", base_url=sandbox.base_url, max_retries=0)
    wide = openai.OpenAI(api_key=API_KEY, base_url=sandbox.base_url, max_retries=0)
    assert _edit(narrow, "gpt-image-2.5-flare") == 200
    with pytest.raises(openai.NotFoundError) as info:
        narrow.images.edit(image=IMAGE, prompt="p", model="gpt-image-2.5-sunburst")
    assert info.value.code == "model_not_found"
    assert [m.id for m in narrow.models.list()] == ["gpt-image-2.5-flare"]
    with pytest.raises(openai.NotFoundError):
        narrow.models.retrieve("gpt-image-2")
    # A key the map does not name is not limited.
    assert _edit(wide, "gpt-image-2.5-sunburst") == 200


def test_models_endpoints_need_a_key(sandbox: SandboxServer) -> None:
    for path in ("models", "models/gpt-image-2"):
        response = httpx2.get(f"{sandbox.base_url}/{path}")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_today_none_is_the_real_utc_date() -> None:
    assert SandboxConfig().current_date() == datetime.now(UTC).date()
    assert SandboxConfig(today="2026-12-01").current_date().isoformat() == "2026-12-01"
