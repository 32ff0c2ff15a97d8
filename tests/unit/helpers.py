from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.batch.submit import BatchOptions, Prepared, SubmitResult, store
from pipeline.cost.pricing import load_prices
from pipeline.db.session import Database
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults
from pipeline.intake.preflight import Preflight, PreflightOptions


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
