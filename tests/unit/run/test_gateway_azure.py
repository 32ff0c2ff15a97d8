"""Azure OpenAI through the real SDK clients (AzureOpenAI on deployment paths, OpenAI on the v1
path) against the sandbox in process: lanes, the ledger naming provider and deployment, the
content filter, a wrong deployment, Entra ID tokens."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from sqlalchemy import select
from starlette.testclient import TestClient

from pipeline.batch.status import batch_status
from pipeline.batch.submit import BatchOptions, Prepared, store
from pipeline.cost.pricing import load_prices
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.errors import ConfigError
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults
from pipeline.intake.preflight import Preflight, PreflightOptions
from pipeline.providers import Auth, Connection, Kind, providers_of
from pipeline.run import gateway
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from pipeline.web import Dashboard, create_app
from tests.conftest import billed_total
from tests.factories import product_rows, write_manifest
from tests.fakes import InProcessAPI
from tests.unit.helpers import AZURE_KEY, AZURE_VERSION, SANDBOX_ROOT, azure_api, azure_settings

KEY = AZURE_KEY
TOKEN = "entra-token-0001"
VERSION = AZURE_VERSION
ROOT = SANDBOX_ROOT


@pytest.fixture
def api(tmp_path: Path) -> Iterator[InProcessAPI]:
    with azure_api(tmp_path, azure_ad_tokens=[TOKEN]) as fake:
        yield fake


def batch(
    tmp_path: Path, db: Database, settings: Settings, rows: list[dict[str, Any]]
) -> tuple[int, list[int]]:
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    preflight = Preflight(
        PreflightOptions(
            allowed_roots=(manifest.parent.resolve(),),
            catalog=load_catalog(),
            work_dir=tmp_path / "work",
            providers=providers_of(settings),
        )
    )
    prepared = Prepared.local(
        manifest, Defaults(model="gpt-image-2", provider=settings.provider), preflight
    )
    result = store(db, prepared, BatchOptions(output_uri=str(tmp_path / "out")), load_prices())
    assert result.rejected == 0, result.errors
    return result.batch_id, [i for chunk in queued_job_ids(db, result.batch_id) for i in chunk]


def run(settings: Settings, db: Database, api: InProcessAPI, ids: list[int]) -> list[str]:
    deps = build_deps(settings, LocalLimiter(None, None), db, http_client=api.client())
    deps.sleep = lambda _s: None
    return [str(process_job(i, deps).state) for i in ids]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'editbatch.db'}")
    yield database
    database.dispose()


def test_jobs_go_to_the_models_deployments_and_the_ledger_names_them(
    tmp_path: Path, db: Database, api: InProcessAPI
) -> None:
    """Through AzureOpenAI: each call takes a deployment of the row's model (in the path, with
    the api-version and the api-key); each attempt names provider and deployment, each job its
    provider, and the ledger equals the bill line by line."""
    settings = azure_settings(tmp_path)
    _, ids = batch(tmp_path, db, settings, product_rows(tmp_path / "in", 6, model="gpt-image-2"))
    assert run(settings, db, api, ids) == ["succeeded"] * 6

    billed, per_request = billed_total(Path(str(api.config.billing_log)))
    with db.session() as s:
        attempts = s.scalars(select(Attempt)).all()
        providers = set(s.scalars(select(Job.provider)))
    assert providers == {"azure"}
    assert {(a.provider, a.outcome) for a in attempts} == {("azure", "ok")}
    assert {a.deployment for a in attempts} <= {"img-a", "img-b"}
    assert sum(a.cost_usd for a in attempts) == billed
    assert all(a.cost_usd == per_request[str(a.request_id)] for a in attempts)
    lines = [json.loads(x) for x in Path(str(api.config.billing_log)).read_text().splitlines()]
    by_request = {line["request_id"]: line for line in lines}
    for a in attempts:
        line = by_request[str(a.request_id)]
        assert (line["provider"], line["deployment"]) == ("azure", a.deployment)
    log = api.sandbox.requests.snapshot()
    edits = [r for r in log["requests"] if r["path"].endswith("/images/edits")]
    assert {r["path"] for r in edits} <= {
        "/openai/deployments/img-a/images/edits",
        "/openai/deployments/img-b/images/edits",
    }
    assert {r["key"] for r in edits} == {"..." + KEY[-4:]}


def test_a_content_filter_answer_fails_the_job_with_azures_code_and_never_holds(
    tmp_path: Path, db: Database, api: InProcessAPI
) -> None:
    settings = azure_settings(tmp_path)
    rows = product_rows(tmp_path / "in", 3, model="gpt-image-2")
    rows[1]["prompt"] = "a bag on a beach #sandbox:moderation"
    batch_id, ids = batch(tmp_path, db, settings, rows)
    assert run(settings, db, api, ids) == ["succeeded", "failed", "succeeded"]
    with db.session() as s:
        job = s.get(Job, ids[1])
        assert job is not None
        b = s.get(Batch, batch_id)
        assert b is not None
        calls = s.scalars(select(Attempt).where(Attempt.job_id == ids[1])).all()
    assert job.last_error_code == "contentFilter"
    assert job.last_error_message == (
        "Your task failed as a result of our safety system. (filtered: violence (medium))"
    )
    assert len(calls) == 1 and calls[0].http_status == 400  # never retried
    assert b.state == "finished" and b.hold_code is None


def test_a_deployment_azure_does_not_know_holds_the_batch_naming_it(
    tmp_path: Path, db: Database, api: InProcessAPI
) -> None:
    settings = azure_settings(tmp_path, azure_deployments="gpt-image-2=img-typo")
    batch_id, ids = batch(
        tmp_path, db, settings, product_rows(tmp_path / "in", 2, model="gpt-image-2")
    )
    assert run(settings, db, api, ids[:1]) == ["held"]
    with db.session() as s:
        b = s.get(Batch, batch_id)
        assert b is not None
    assert b.state == "held" and b.hold_code == "provider"
    assert b.hold_reason is not None
    assert b.hold_reason.startswith("provider azure, deployment img-typo: 404 DeploymentNotFound")
    assert f"editbatch resume {batch_id}" in b.hold_reason


def test_a_provider_the_worker_lacks_holds_the_batch_before_any_call(
    tmp_path: Path, db: Database, api: InProcessAPI
) -> None:
    settings = azure_settings(tmp_path)
    batch_id, ids = batch(
        tmp_path, db, settings, product_rows(tmp_path / "in", 1, model="gpt-image-2")
    )
    worker = azure_settings(tmp_path, provider="openai", azure_deployments=None)
    assert run(worker, db, api, ids) == ["held"]
    with db.session() as s:
        b = s.get(Batch, batch_id)
        assert b is not None
        assert s.scalars(select(Attempt)).all() == []
    assert b.hold_code == "provider"
    assert b.hold_reason is not None and "unknown provider 'azure'" in b.hold_reason


class FakeCredential:
    """Stands in for DefaultAzureCredential (no Azure AD here): hands out one token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, 4_102_444_800)


@pytest.mark.parametrize("version", [VERSION, "v1"])
def test_entra_id_sends_a_bearer_token_from_azure_identity(
    tmp_path: Path,
    db: Database,
    api: InProcessAPI,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
) -> None:
    """auth entra_id: azure-identity's get_bearer_token_provider over the credential gives the
    token (for Azure OpenAI's audience) to AzureOpenAI (deployment paths) or to the plain
    client on the v1 path; no key is sent."""
    credential = FakeCredential(TOKEN)
    monkeypatch.setattr(gateway, "entra_credential", lambda: credential)
    settings = azure_settings(
        tmp_path, azure_auth="entra_id", azure_openai_api_key=None, openai_api_version=version
    )
    _, ids = batch(tmp_path, db, settings, product_rows(tmp_path / "in", 2, model="gpt-image-2"))
    assert run(settings, db, api, ids) == ["succeeded", "succeeded"]
    assert credential.scopes and set(credential.scopes) == {
        ("https://cognitiveservices.azure.com/.default",)
    }
    edits = [r for r in api.sandbox.requests.snapshot()["requests"] if "edits" in r["path"]]
    assert {r["key"] for r in edits} == {"..." + TOKEN[-4:]}
    paths = {r["path"] for r in edits}
    if version == "v1":
        assert paths == {"/openai/v1/images/edits"}
        assert {r["deployment"] for r in edits} <= {"img-a", "img-b"}
    else:
        assert paths <= {
            "/openai/deployments/img-a/images/edits",
            "/openai/deployments/img-b/images/edits",
        }


def test_entra_id_without_azure_identity_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    connection = Connection(Kind.AZURE, ROOT, VERSION, Auth.ENTRA_ID)
    with pytest.raises(ConfigError, match=r"pip install 'editbatch\[azure\]'"):
        gateway.build_client(connection, 10.0)


@pytest.mark.parametrize(
    ("overrides", "ok", "status", "code"),
    [
        ({}, True, 400, "integer_below_min_value"),
        ({"azure_deployments": "gpt-image-2=img-typo"}, False, 404, "DeploymentNotFound"),
        ({"azure_openai_api_key": "wrong-key-000001"}, False, 401, "401"),
        ({"openai_api_version": "2023-01-01"}, False, 400, "BadRequest"),
    ],
)
def test_check_lane_probes_a_deployment_without_paying(
    tmp_path: Path,
    api: InProcessAPI,
    overrides: dict[str, Any],
    ok: bool,
    status: int,
    code: str,
) -> None:
    """The doctor's probe of an Azure deployment: an edit with n=0 that the model refuses
    proves endpoint, api-version, key and deployment; each wrong setting shows as its own
    answer; nothing is billed."""
    settings = azure_settings(tmp_path, **overrides)
    providers = providers_of(settings)
    deps = build_deps(settings, LocalLimiter(None, None), http_client=api.client())
    [lane] = providers.lanes("azure", "gpt-image-2")[:1]
    result = gateway.check_lane(deps.gateway, lane)
    assert (result.ok, result.status, result.code) == (ok, status, code), result
    assert not Path(str(api.config.billing_log)).exists()


def test_check_lane_on_openai_retrieves_the_model(tmp_path: Path, api: InProcessAPI) -> None:
    settings = azure_settings(tmp_path, provider="openai")
    deps = build_deps(settings, LocalLimiter(None, None), http_client=api.client())
    [lane] = providers_of(settings).lanes("openai", "gpt-image-2")
    assert gateway.check_lane(deps.gateway, lane).ok
    [gone] = providers_of(settings).lanes("openai", "gpt-image-1")
    assert not gateway.check_lane(deps.gateway, gone).ok


def test_status_shows_cost_by_provider_when_a_batch_uses_two(
    tmp_path: Path, db: Database, api: InProcessAPI
) -> None:
    """A manifest column sends half the rows to Azure and half to OpenAI: `status` gives calls
    and exact cost per provider (their sum is the batch's cost, each the provider's bill); a
    batch on one provider has no such table (its status reads only the counters)."""
    settings = azure_settings(tmp_path)
    rows = product_rows(tmp_path / "in", 6, model="gpt-image-2")
    for row in rows[::2]:
        row["provider"] = "openai"
    batch_id, ids = batch(tmp_path, db, settings, rows)
    assert run(settings, db, api, ids) == ["succeeded"] * 6
    with db.session() as s:
        status = batch_status(s, batch_id)
        attempts = s.scalars(select(Attempt)).all()
    by_provider = {p["provider"]: p for p in status.by_provider}
    assert sorted(by_provider) == ["azure", "openai"]
    assert by_provider["azure"]["calls"] == by_provider["openai"]["calls"] == 3
    for name in ("azure", "openai"):
        assert Decimal(by_provider[name]["cost_usd"]) == sum(
            a.cost_usd for a in attempts if a.provider == name
        )
    assert sum(Decimal(p["cost_usd"]) for p in status.by_provider) == status.cost_usd
    assert status.to_json()["cost_by_provider"] == status.by_provider
    # The dashboard's batch page shows the same table (read with the page, not by the polls).
    client = TestClient(create_app(Dashboard(db, settings)), base_url="http://127.0.0.1")
    page = client.get(f"/batches/{batch_id}").text
    table = page[page.index('id="providers"') :]
    for name in ("azure", "openai"):
        assert f'<th scope="row">{name}</th><td class="num">3</td>' in table
        assert f"${by_provider[name]['cost_usd']}" in table
    live = client.get(f"/batches/{batch_id}/live")
    assert live.status_code == 200 and "Cost by model" in live.text
    assert 'id="providers"' not in live.text

    alone, alone_ids = batch(
        tmp_path, db, settings, product_rows(tmp_path / "in2", 2, model="gpt-image-2")
    )
    assert run(settings, db, api, alone_ids) == ["succeeded"] * 2
    with db.session() as s:
        assert batch_status(s, alone).by_provider == []
    assert 'id="providers"' not in client.get(f"/batches/{alone}").text
