"""Start real servers for integration tests: redis-server, PostgreSQL, celery workers.

Each server runs from a temporary folder on a free port and is stopped afterwards. A missing
binary is a failure with the install hint, never a skip: CI must prove the real thing works.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def _binary(name: str, hint: str, extra_dirs: tuple[str, ...] = ()) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(f"{name} not found: {hint}")


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = _binary("redis-server", "apt-get install redis-server")
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 10, proc)
        return proc

    def restart(self) -> None:
        """Stop the server and start an empty one on the same port (no persistence: every
        message, key and unacknowledged delivery is gone, as after a crash)."""
        self.stop()
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()


PG_DIRS = tuple(sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True))


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb in a temp folder; runs as `postgres` under root)."""

    def __init__(self, tmp: Path | None = None) -> None:
        # Not under pytest's tmp folder: that is private to root and `postgres` must enter it.
        tmp = Path(tempfile.mkdtemp(prefix="editbatch-pg-"))
        self.tmp = tmp
        self.port = free_port()
        initdb = _binary("initdb", "apt-get install postgresql", PG_DIRS)
        pg_ctl = str(Path(initdb).parent / "pg_ctl")
        self.pg_ctl = pg_ctl
        self.data = tmp / "pgdata"
        self.sock = tmp / "pgsock"
        self.sock.mkdir(parents=True, exist_ok=True)
        self._as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")
            shutil.chown(tmp, "postgres")
            shutil.chown(self.sock, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [
                *self._as,
                initdb,
                "-D",
                str(self.data),
                "-U",
                "editbatch",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        subprocess.run(
            [
                *self._as,
                pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(tmp / "pg.log"),
                "-w",
                "start",
                "-o",
                f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=300",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _wait_port(self.port, 20)
        self.admin_url = f"postgresql+psycopg://editbatch@127.0.0.1:{self.port}/postgres"
        self._n = 0

    def create_database(self) -> str:
        import psycopg

        self._n += 1
        name = f"editbatch_{os.getpid()}_{self._n}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=editbatch dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://editbatch@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            [*self._as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.tmp, ignore_errors=True)


class CeleryWorker:
    """A real `celery -A worker.app worker` process with its own environment."""

    def __init__(
        self, env: dict[str, str], log: Path, concurrency: int = 4, name: str = "w1"
    ) -> None:
        self.log = log
        self.fh = log.open("wb")
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--loglevel=INFO",
                "--concurrency",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO,
            env=full_env,
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(60)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited: {self.log.read_text()[-3000:]}")
            if b"ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"celery worker not ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group (no cleanup, like an OOM kill)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.fh.close()


def start_workers(
    env: dict[str, str], tmp: Path, count: int, threads: int = 4, prefix: str = "w"
) -> list[CeleryWorker]:
    """Start `count` celery worker processes at once (each takes seconds to import and connect),
    named `<prefix><i>`, logging to `tmp/worker<i>.log`; all stopped again if one fails."""
    workers: list[CeleryWorker | None] = [None] * count
    errors: list[BaseException] = []

    def boot(i: int) -> None:
        try:
            workers[i] = CeleryWorker(env, tmp / f"worker{i}.log", threads, name=f"{prefix}{i}")
        except BaseException as exc:
            errors.append(exc)

    boots = [threading.Thread(target=boot, args=(i,)) for i in range(count)]
    for t in boots:
        t.start()
    for t in boots:
        t.join()
    started = [w for w in workers if w is not None]
    if errors:
        for w in started:
            w.stop()
        raise errors[0]
    return started


class CeleryBeat:
    """A real `celery -A worker.app beat` process (the reaper, nightly runs, the batch route's
    tick); its log at `log`, its schedule file beside it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.fh = log.open("wb")
        schedule = log.parent / f"{log.stem}-schedule"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "beat",
                "--loglevel=INFO",
                "--schedule",
                str(schedule),
                "--max-interval",
                "1",
                "--pidfile=",
            ],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while b"beat: Starting" not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery beat did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.fh.close()


def wait_until(predicate: object, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    try:
        yield server
    finally:
        server.stop()
