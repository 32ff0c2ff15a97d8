"""The output location cannot be written: the edits are not lost and not bought again.

Jobs still succeed (the API call is done and paid for); the raw images wait in the spool with
the reason on each output row, nothing half-written appears under a final name, and once the
location is fixed `editbatch collect BATCH` writes them, then the report.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sqlalchemy import select

from pipeline.db.models import Job, Output
from tests.factories import write_manifest
from tests.integration.test_crash_safety import (
    Stack,
    audit,
    sha256_file,
    small_rows,
    stack,
)

NO_REDIS = "redis://127.0.0.1:1/0"  # `editbatch run` needs no broker


def _outputs(st: Stack, batch_id: int) -> list[Output]:
    with st.db.session() as s:
        return list(
            s.scalars(
                select(Output)
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Output.job_id, Output.index)
            )
        )


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def _check_collected(st: Stack, batch_id: int, raw_sha: dict[int, str]) -> None:
    """Every output is at its final name with the bytes the API sent; the spool is empty."""
    for out in _outputs(st, batch_id):
        assert out.collected_at is not None and out.collect_error is None, out.collect_error
        final = Path(str(out.uri))
        assert final.is_file() and final.is_relative_to(st.out)
        assert sha256_file(final) == out.sha256 == raw_sha[out.id]
        assert final.stat().st_size == out.bytes
        assert not Path(str(out.spool_path)).exists()
    result = audit(st.db, batch_id, st.out, st.billing_log)
    result.assert_clean()
    with (st.out / f"report-{batch_id}.csv").open(newline="") as fh:
        report = list(csv.DictReader(fh))
    shas = {row["id"]: row["sha256"].split("|") for row in report}
    with st.db.session() as s:
        keys = {
            job_id: key
            for job_id, key in s.execute(
                select(Job.id, Job.external_key).where(Job.batch_id == batch_id)
            )
        }
    expected: dict[str, list[str]] = {}
    for out in _outputs(st, batch_id):
        expected.setdefault(str(keys[out.job_id]), []).append(str(out.sha256))
    assert shas == expected
    summary = json.loads((st.out / f"report-{batch_id}.json").read_text())["summary"]
    assert summary["outputs_uncollected"] == 0


def test_output_root_is_a_file_then_fixed_and_collected(tmp_path: Path) -> None:
    rows = small_rows(tmp_path / "in", 4)
    rows[1]["n"] = 2
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    with stack(tmp_path, NO_REDIS, f"sqlite:///{tmp_path / 'editbatch.db'}") as st:
        blocker = b"a file where the output folder should be\n"
        st.out.write_bytes(blocker)
        proc = st.cli("run", str(manifest), "--output", str(st.out), "--json")
        assert proc.stdout.strip(), proc.stderr
        status = json.loads(proc.stdout.strip().splitlines()[-1])
        batch_id = int(status["batch_id"])
        # The edits are done and paid for; only the writing failed, and it says so.
        assert status["counts"]["succeeded"] == 4
        assert status["outputs"] == status["outputs_uncollected"] == 5
        outputs = _outputs(st, batch_id)
        assert len(outputs) == 5
        raw_sha = {}
        for out in outputs:
            assert out.uri is None and out.collected_at is None and out.sha256 is None
            assert out.collect_error and str(st.out) in out.collect_error, out.collect_error
            spooled = Path(str(out.spool_path))
            assert spooled.is_file()
            raw_sha[out.id] = sha256_file(spooled)
        assert st.out.read_bytes() == blocker  # nothing written over or beside it
        assert _temp_files(tmp_path) == []
        partial = audit(st.db, batch_id, st.out, st.billing_log)
        assert partial.ledger_usd == partial.billed_usd and partial.billed_calls == 4
        assert not (st.out.parent / f"report-{batch_id}.csv").exists()

        st.out.unlink()  # a person fixes the location
        proc = st.cli("collect", str(batch_id))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "collected 5 outputs; 0 still waiting" in proc.stdout
        _check_collected(st, batch_id, raw_sha)
        assert audit(st.db, batch_id, st.out, st.billing_log).billed_calls == 4  # not bought again


def test_celery_worker_with_blocked_folders_collects_the_rest_then_all(
    tmp_path: Path, redis_url: str
) -> None:
    """Part of the output tree is unwritable: a folder name taken by a file, and a final name
    taken by a folder (the write gets as far as its temporary file). The other outputs land;
    no partial file is left anywhere; after the fix `editbatch collect` writes the rest."""
    rows = small_rows(tmp_path / "in", 6, output="{group}/{id}_{index}.{ext}")
    for i, row in enumerate(rows):
        row["group"] = "blocked" if i % 2 else "open"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    with stack(tmp_path, redis_url, f"sqlite:///{tmp_path / 'editbatch.db'}") as st:
        (st.out / "open" / "SKU0002_1.png").mkdir(parents=True)  # a folder at a final name
        (st.out / "blocked").write_bytes(b"not a folder\n")  # a file at a folder name
        st.worker("w1", concurrency=3)
        batch_id = st.submit(manifest)
        st.wait_finished(batch_id, 60)

        outputs = _outputs(st, batch_id)
        with st.db.session() as s:
            assert set(s.scalars(select(Job.state).where(Job.batch_id == batch_id))) == {
                "succeeded"
            }
        failed = {o.id: o for o in outputs if o.collected_at is None}
        names = {Path(str(o.spool_path)).parent.name: o for o in outputs}
        assert len(failed) == 4, [o.collect_error for o in outputs]
        raw_sha = {}
        for out in outputs:
            if out.id in failed:
                assert out.collect_error and out.uri is None
                raw_sha[out.id] = sha256_file(Path(str(out.spool_path)))
            else:
                raw_sha[out.id] = str(out.sha256)
        assert _temp_files(tmp_path) == []
        squatter = st.out / "open" / "SKU0002_1.png"
        assert squatter.is_dir() and list(squatter.iterdir()) == []
        assert (st.out / "blocked").read_bytes() == b"not a folder\n"
        assert sorted(p.name for p in (st.out / "open").iterdir()) == [
            "SKU0000_1.png",
            "SKU0002_1.png",
            "SKU0004_1.png",
        ]
        assert names  # every output came from a spool folder named after its job
        # The report is written at the (writable) root and shows what is missing.
        report = json.loads((st.out / f"report-{batch_id}.json").read_text())
        assert report["summary"]["outputs_uncollected"] == 4

        squatter.rmdir()
        (st.out / "blocked").unlink()
        proc = st.cli("collect", str(batch_id))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "collected 4 outputs; 0 still waiting" in proc.stdout
        _check_collected(st, batch_id, raw_sha)
        assert audit(st.db, batch_id, st.out, st.billing_log).billed_calls == 6


def test_run_with_unwritable_output_says_what_to_do_and_crashes_no_job(tmp_path: Path) -> None:
    """The report cannot be written either: that is not a job crash (the jobs succeeded), and
    the person is told how to finish once the location is fixed."""
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", 2))
    with stack(tmp_path, NO_REDIS, f"sqlite:///{tmp_path / 'editbatch.db'}") as st:
        st.out.write_bytes(b"not a folder\n")
        proc = st.cli("run", str(manifest), "--output", str(st.out))
        assert "crashed" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "editbatch collect 1" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert proc.returncode != 0  # a script must not take "outputs missing" for success


def test_outputs_are_written_with_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    """The temporary file of an atomic write is private (0600); the final output must not be,
    or the web server, the sync job or the colleague reading the folder cannot open it."""
    import os

    from pipeline.output.storage import Storage

    umask = os.umask(0o022)
    try:
        uri = Storage(str(tmp_path / "out")).write("a/b.png", b"\x89PNG not really")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(umask)
    assert Path(uri).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
