"""Reproducible installs: constraints.txt pins every dependency, CI and the image install with it,
and the pinned openai SDK is the one the catalogue was reviewed against."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from pipeline.intake.catalog import load_catalog

REPO = Path(__file__).resolve().parents[2]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION (scripts/lock)"
        assert normal(name) not in out, f"constraints.txt pins {name} twice"
        out[normal(name)] = version
    return out


def test_every_dependency_and_extra_is_pinned() -> None:
    """A dependency added to pyproject.toml without rerunning scripts/lock fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted.extend(extra)
    pinned = pins()
    missing = sorted({normal(Requirement(r).name) for r in wanted} - set(pinned))
    assert not missing, f"not in constraints.txt: {missing}; rerun scripts/lock"
    for req in map(Requirement, wanted):
        version = pinned[normal(req.name)]
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {req.name}=={version}, outside pyproject's {req}: "
            "rerun scripts/lock"
        )


def test_the_pinned_sdk_is_the_one_the_catalogue_was_reviewed_against() -> None:
    catalog = load_catalog()
    assert catalog.sdk is not None
    assert pins()["openai"] == catalog.sdk.version, (
        "bump [sdk] version in pipeline/data/catalog.toml together with the openai pin, after "
        "tests/unit/intake/test_sdk_drift.py passes (docs/dependencies.md)"
    )


def test_ci_and_the_image_install_with_the_constraints() -> None:
    for path in (REPO / ".ci" / "run", REPO / "Dockerfile"):
        installs = [
            shlex.split(line.split("#", 1)[0])
            for line in path.read_text(encoding="utf-8").splitlines()
            if "pip install" in line and not line.lstrip().startswith("#")
        ]
        ours = [args for args in installs if any(re.match(r"'?\.(\[|$)", a) for a in args)]
        assert ours, f"{path.name} never installs the package"
        for args in ours:
            assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", (
                f"{path.name}: {' '.join(args)} does not use -c constraints.txt"
            )
