from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.catalog import load_catalog
from pipeline.db.session import Database
from pipeline.manifest import Defaults
from pipeline.preflight import Preflight, PreflightOptions
from pipeline.producer import SubmitResult, create_batch


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
