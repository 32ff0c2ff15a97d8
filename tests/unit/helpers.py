from __future__ import annotations

from pathlib import Path

from pipeline.catalog import load_catalog
from pipeline.preflight import Preflight, PreflightOptions


def make_preflight(manifest: Path) -> Preflight:
    return Preflight(
        PreflightOptions(
            allowed_roots=(manifest.resolve().parent,),
            catalog=load_catalog(),
            work_dir=manifest.parent / ".work",
        )
    )
