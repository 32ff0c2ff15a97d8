from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.batch.submit import SubmitResult, create_batch
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
    """Store a batch for `manifest` with the default preflight (what `submit` does)."""
    return create_batch(
        db,
        manifest,
        name=kwargs.pop("name", "t"),
        output_uri=output,
        defaults=kwargs.pop("defaults", Defaults()),
        preflight=make_preflight(manifest),
        **kwargs,
    )
