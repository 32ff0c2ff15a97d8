from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.batch.submit import BatchOptions, Prepared, SubmitResult, store
from pipeline.cost.pricing import load_prices
from pipeline.db.session import Database
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults
from pipeline.intake.preflight import Preflight, PreflightOptions
from pipeline.sandbox import SandboxConfig
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY, TEST_TODAY
from tests.fakes import InProcessAPI


def make_preflight(manifest: Path) -> Preflight:
    return Preflight(
        PreflightOptions(
            allowed_roots=(manifest.resolve().parent,),
            catalog=load_catalog(),
            work_dir=manifest.parent / ".work",
        )
    )


def new_batch(db: Database, manifest: Path, output: str, **kwargs: Any) -> SubmitResult:
    """Store a batch for `manifest` with the default preflight (what `submit` does).

    `defaults` and `preflight` set how rows are read; other keywords are BatchOptions fields.
    """
    prepared = Prepared.local(
        manifest,
        kwargs.pop("defaults", Defaults()),
        kwargs.pop("preflight", None) or make_preflight(manifest),
    )
    options = BatchOptions(output_uri=output, name=kwargs.pop("name", "t"), **kwargs)
    return store(db, prepared, options, load_prices())


# -- Azure OpenAI through the sandbox in process (tests/fakes.InProcessAPI) ------------------

AZURE_KEY = "azure-key-0000000001"
AZURE_VERSION = "2025-04-01-preview"
SANDBOX_ROOT = "http://sandbox.test"  # where InProcessAPI answers


@contextmanager
def azure_api(tmp_path: Path, **config: Any) -> Iterator[InProcessAPI]:
    """The sandbox in process answering as Azure: deployments img-a and img-b of gpt-image-2,
    the key AZURE_KEY (and whatever `config` adds)."""
    values: dict[str, Any] = {
        "billing_log": str(tmp_path / "billing.jsonl"),
        "today": TEST_TODAY,
        "azure_deployments": {"img-a": "gpt-image-2", "img-b": "gpt-image-2"},
        "azure_api_keys": [AZURE_KEY],
    }
    with InProcessAPI(SandboxConfig(**{**values, **config})) as fake:
        yield fake


def azure_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings whose default provider is Azure at the sandbox (SDK variables and one mapping),
    OpenAI at the sandbox's v1 path beside it."""
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": f"sqlite:///{tmp_path / 'editbatch.db'}",
        "openai_api_key": FAKE_KEY,
        "openai_base_url": f"{SANDBOX_ROOT}/v1",
        "default_model": "gpt-image-2",  # what the deployments serve
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "request_timeout_seconds": 10,
        "provider": "azure",
        "azure_deployments": "gpt-image-2=img-a,gpt-image-2=img-b",
        "azure_openai_endpoint": SANDBOX_ROOT,
        "azure_openai_api_key": AZURE_KEY,
        "openai_api_version": AZURE_VERSION,
    }
    return Settings(**{**values, **overrides})
