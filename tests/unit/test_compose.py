"""docker-compose.yml, the Dockerfile and .ci/run cannot drift from the code they deploy.

No Docker engine is needed: the files are parsed (PyYAML) and checked against the settings model
(`pipeline.settings.Settings`), the package metadata (pyproject.toml) and the servers CI installs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CI_RUN = REPO / ".ci" / "run"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

# run editbatch code with its settings
APP_SERVICES = ("worker", "beat", "migrate", "flower", "dashboard")
REQUIRED_SERVICES = {"redis", "postgres", "migrate", "worker", "beat", "flower", "minio"}
REQUIRED_SERVICES |= {"minio-init", "sandbox", "dashboard"}
OPT_IN = {"sandbox": ["sandbox"], "dashboard": ["dashboard"]}  # services behind a profile
# Besides EDITBATCH_*, editbatch processes read only these (the SDK's, s3fs/botocore's, fsspec's).
OTHER_APP_VARIABLES = re.compile(r"^(OPENAI_API_KEY|OPENAI_BASE_URL|AWS_[A-Z0-9_]+|FSSPEC_S3_\w+)$")
EDITBATCH_NAME = re.compile(r"\bEDITBATCH_[A-Z0-9_]+\b")


def settings_variables() -> set[str]:
    """Every environment variable the settings model reads: EDITBATCH_<FIELD>, aliases, CONFIG."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = {"EDITBATCH_CONFIG"}  # names the TOML file; read by settings_customise_sources
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def interpolate(value: str) -> str:
    """What compose makes of `value` with no variables set: `${V:-default}` -> default."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", value)
    return value.replace("$$", "$")


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def resolved_environment(svc: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets when the shell sets none (no-value entries are unset)."""
    return {k: interpolate(v) for k, v in environment(svc).items() if v is not None}


def depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process started with exactly `env` would read."""
    for name in list(os.environ):
        if name.startswith("EDITBATCH_") or name.startswith("OPENAI_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# --- the settings model ------------------------------------------------------------------------


def test_every_editbatch_variable_in_the_deployment_files_is_a_setting() -> None:
    known = settings_variables()
    for path in (COMPOSE_FILE, DOCKERFILE):
        used = set(EDITBATCH_NAME.findall(path.read_text(encoding="utf-8")))
        assert used, f"{path.name} sets no EDITBATCH_* variable at all"
        unknown = used - known
        assert not unknown, (
            f"{path.name} uses {sorted(unknown)}, which pipeline/settings.py does not read "
            f"(known: {sorted(known)}); rename it or add the field to Settings"
        )


def test_app_services_share_the_editbatch_environment() -> None:
    anchor = compose()["x-editbatch-env"]
    assert isinstance(anchor, dict) and anchor
    for name in (*APP_SERVICES, "cli"):
        env = environment(service(name))
        missing = {k for k, v in anchor.items() if k not in env or env[k] != (v and str(v))}
        assert not missing, f"{name} does not use x-editbatch-env for {sorted(missing)}"


def test_app_services_set_only_variables_editbatch_reads() -> None:
    known = settings_variables()
    for name in (*APP_SERVICES, "cli"):
        for var in environment(service(name)):
            assert var in known or OTHER_APP_VARIABLES.match(var), (
                f"{name} sets {var}, which no editbatch process reads; settings are "
                f"EDITBATCH_* fields of pipeline.settings.Settings"
            )


def test_compose_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*APP_SERVICES, "cli"):
        settings = settings_from(resolved_environment(service(name)), monkeypatch)
        assert settings.log_json is True
        assert settings.effective_redis_url == settings.broker_url
    worker = settings_from(resolved_environment(service("worker")), monkeypatch)
    assert worker.metrics_port is not None
    assert str(worker.metrics_port) in [str(p) for p in service("worker").get("expose", [])]


def test_broker_url_points_at_the_redis_service(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(resolved_environment(service("worker")), monkeypatch)
    url = urlsplit(settings.broker_url)
    assert url.scheme == "redis"
    assert url.hostname == "redis" and (url.port or 6379) == 6379
    assert "redis-server" in command(service("redis"))


def test_database_url_points_at_the_postgres_service(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(resolved_environment(service("worker")), monkeypatch)
    url = make_url(settings.effective_database_url)
    assert url.drivername == "postgresql+psycopg", "the driver installed by .[postgres]"
    assert url.host == "postgres" and (url.port or 5432) == 5432
    pg = resolved_environment(service("postgres"))
    assert url.username == pg["POSTGRES_USER"]
    assert url.password == pg["POSTGRES_PASSWORD"]
    assert url.database == pg["POSTGRES_DB"]


def test_outputs_reach_minio_through_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    env = resolved_environment(service("worker"))
    minio = resolved_environment(service("minio"))
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    for var in ("AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        assert urlsplit(env[var]).hostname == "minio"
    init = json.dumps(service("minio-init").get("entrypoint", []))
    assert "mc mb" in init and "local/editbatch" in init


# --- services ----------------------------------------------------------------------------------


def test_every_service_the_project_needs_exists() -> None:
    missing = REQUIRED_SERVICES - set(compose()["services"])
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_sandbox_is_only_in_the_sandbox_profile() -> None:
    sandbox = service("sandbox")
    assert sandbox.get("profiles") == ["sandbox"]
    cmd = command(sandbox)
    assert cmd[:3] == ["python", "-m", "pipeline.sandbox"] or cmd[:2] == ["editbatch", "sandbox"]
    # Reachable from the workers' containers, not only from its own loopback.
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    for name in REQUIRED_SERVICES:
        expected = OPT_IN.get(name)
        assert service(name).get("profiles") == expected, f"{name}: profiles must be {expected}"


def test_worker_runs_the_celery_app_and_scales() -> None:
    worker = service("worker")
    assert command(worker)[:4] == ["celery", "-A", "worker.app", "worker"]
    assert "container_name" not in worker, "a fixed name prevents --scale worker=N"
    assert not worker.get("ports"), "fixed host ports prevent --scale worker=N"
    deps = depends(worker)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("redis") == "service_healthy"


def test_beat_runs_the_same_app() -> None:
    cmd = command(service("beat"))
    assert cmd[:4] == ["celery", "-A", "worker.app", "beat"]
    assert "replicas" not in service("beat").get("deploy", {}), "beat must run exactly once"


def test_migrate_upgrades_the_database_once() -> None:
    migrate = service("migrate")
    assert command(migrate) == ["editbatch", "db", "upgrade"]
    assert depends(migrate).get("postgres") == "service_healthy"
    assert migrate.get("restart") == "no"


def test_flower_monitors_the_same_broker() -> None:
    flower = service("flower")
    cmd = command(flower)
    if "mher/flower" in str(flower.get("image", "")):
        assert any("redis://redis" in c for c in cmd) or "CELERY_BROKER_URL" in environment(flower)
    else:
        assert cmd[:4] == ["celery", "-A", "worker.app", "flower"]
    assert any(str(p).endswith(":5555") for p in flower.get("ports", []))


def test_dashboard_needs_a_token_and_is_published_on_localhost_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.errors import ConfigError
    from pipeline.web.security import check_bind

    dashboard = service("dashboard")
    cmd = command(dashboard)
    assert cmd[:2] == ["editbatch", "serve"]
    host, port = cmd[cmd.index("--host") + 1], cmd[cmd.index("--port") + 1]
    assert "EDITBATCH_DASHBOARD_TOKEN" in environment(dashboard)
    # Without the token in the shell the container's `serve` refuses to start; with it, serves.
    settings = settings_from(resolved_environment(dashboard), monkeypatch)
    assert settings.dashboard_token is None
    with pytest.raises(ConfigError, match="EDITBATCH_DASHBOARD_TOKEN"):
        check_bind(host, None)
    check_bind(host, "a-token")
    published = [interpolate(str(p)) for p in dashboard.get("ports", [])]
    assert published == [f"127.0.0.1:8700:{port}"]
    assert "/healthz" in json.dumps(dashboard["healthcheck"]["test"])
    assert depends(dashboard).get("migrate") == "service_completed_successfully"
    targets = {interpolate(str(v)).rsplit(":", 1)[1] for v in dashboard.get("volumes", [])}
    assert {"/data", "/work"} <= targets


def test_servers_have_healthchecks_and_volumes() -> None:
    data = compose()
    named_volumes = set(data.get("volumes") or {})
    for name in ("redis", "postgres", "minio"):
        svc = service(name)
        test = svc.get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"
        mounts = {str(v).split(":", 1)[0] for v in svc.get("volumes", [])}
        assert mounts & named_volumes, f"{name} keeps its data in no named volume"
    assert "pg_isready" in json.dumps(service("postgres")["healthcheck"]["test"])
    redis_cmd = command(service("redis"))
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert depends(service("minio-init")).get("minio") == "service_healthy"
    assert "minio/mc" in interpolate(str(service("minio-init")["image"]))


def test_app_services_use_the_image_this_repository_builds() -> None:
    images = set()
    for name in (*APP_SERVICES, "cli", "sandbox"):
        svc = service(name)
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context in (".", "./"), f"{name} does not build this repository"
        images.add(svc.get("image"))
    assert len(images) == 1, f"one image for every role, got {images}"


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    return instructions[starts[-1] :]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_uses_the_python_the_package_requires() -> None:
    requires = pyproject()["project"]["requires-python"]
    minor = re.search(r"3\.(\d+)", requires)
    assert minor
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            image = args.split()[0]
            assert re.fullmatch(rf"python:3\.{minor.group(1)}-slim(-\w+)?", image), image


def test_dockerfile_installs_the_package_with_existing_extras() -> None:
    extras_known = set(pyproject()["project"].get("optional-dependencies", {}))
    targets = [
        match
        for k, args in dockerfile_instructions()
        if k == "RUN" and "pip install" in args
        for token in shlex.split(args)
        if (match := re.fullmatch(r"\.(?:\[([\w,-]+)\])?", token))
    ]
    assert targets, "the Dockerfile never runs `pip install .[...]`"
    extras = {e for m in targets for e in (m.group(1) or "").split(",") if e}
    assert "postgres" in extras, "the psycopg driver of EDITBATCH_DATABASE_URL"
    assert extras <= extras_known, f"pyproject.toml has no extra {sorted(extras - extras_known)}"


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    copied = {
        src.rstrip("/")
        for k, args in dockerfile_instructions()
        if k == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in find}
    assert packages <= copied, f"the image misses {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied  # README: the package's readme
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for src in copied:
        hit = [p for p in ignored if fnmatch.fnmatch(src, p.removeprefix("**/"))]
        assert not hit, f".dockerignore {hit} drops {src}, which the Dockerfile copies"


def test_dockerfile_runs_as_a_user_and_defaults_to_the_worker() -> None:
    stage = final_stage()
    users = [args for k, args in stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmds = [json.loads(args) for k, args in stage if k == "CMD"]
    assert cmds, "no CMD"
    assert cmds[-1] == command(service("worker")), "the image's default is the compose worker"
    entrypoints = [json.loads(args) for k, args in stage if k == "ENTRYPOINT"]
    assert not entrypoints, "an ENTRYPOINT would prefix every compose command"


# --- CI ----------------------------------------------------------------------------------------


def _major(text: str) -> int:
    found = re.match(r"\d+", text)
    assert found, text
    return int(found.group(0))


def installed_majors() -> dict[str, int]:
    """Major versions of the redis-server and PostgreSQL that .ci/run installs from Debian."""
    redis = shutil.which("redis-server")
    pgs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts)
    assert redis and pgs, "apt-get install redis-server postgresql (as .ci/run does)"
    out = subprocess.run([redis, "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"v=(\d+)\.", out)
    assert version, out
    return {
        "redis": int(version.group(1)),
        "postgres": max(_major(p.parent.parent.name) for p in pgs),
    }


def test_ci_installs_the_servers_compose_runs() -> None:
    script = CI_RUN.read_text(encoding="utf-8")
    installs = " ".join(re.findall(r"apt-get install[^\n]*", script)).split()
    assert "redis-server" in installs and "postgresql" in installs
    assert "scripts/test" in script


def test_ci_installs_the_browser_the_dashboard_tests_drive() -> None:
    script = CI_RUN.read_text(encoding="utf-8")
    installs = " ".join(re.findall(r"apt-get install[^\n]*", script)).split()
    assert "chromium" in installs and "chromium-driver" in installs
    extras = pyproject()["project"]["optional-dependencies"]["dev"]
    assert any(dep.startswith("selenium") for dep in extras)


def test_compose_servers_have_the_major_versions_ci_tests_against() -> None:
    majors = installed_majors()
    for name in ("redis", "postgres"):
        image = interpolate(str(service(name)["image"]))
        repo, _, tag = image.partition(":")
        assert repo.rsplit("/", 1)[-1] == name
        assert tag and _major(tag) == majors[name], (
            f"compose runs {image} but CI tests against {name} {majors[name]} from Debian "
            f"(.ci/run); use {name}:{majors[name]} or move CI"
        )


# --- docs --------------------------------------------------------------------------------------


def test_deployment_doc_names_every_setting_and_only_settings() -> None:
    text = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    known = settings_variables()
    named = set(EDITBATCH_NAME.findall(text))
    assert not named - known, f"docs/deployment.md names unknown {sorted(named - known)}"
    undocumented = {v for v in known if v.startswith("EDITBATCH_")} - named
    assert not undocumented, f"docs/deployment.md does not describe {sorted(undocumented)}"
