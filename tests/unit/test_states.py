"""pipeline.states: the tables are the one description of the state machines, and nothing
moves a job or a batch along a line the tables do not have."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline import states
from pipeline.db import jobs
from pipeline.db.models import Batch, Job
from pipeline.db.session import Database
from pipeline.errors import InvalidTransition
from pipeline.states import BatchState, JobState
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch


def test_docstring_diagrams_are_the_tables() -> None:
    """The diagrams a newcomer reads in pipeline/states.py are rendered from the tables."""
    doc = states.__doc__ or ""
    for line in states.job_diagram().splitlines() + states.batch_diagram().splitlines():
        assert f"    {line}\n" in doc, f"states.py docstring lacks: {line}"


def test_every_state_has_a_row_and_terminal_states_do_not_move() -> None:
    assert set(states.JOB_MOVES) == set(JobState)
    assert set(states.BATCH_MOVES) == set(BatchState)
    for state in (JobState.SUCCEEDED, JobState.REJECTED, JobState.CANCELLED):
        assert not states.JOB_MOVES[state]
    assert not states.BATCH_MOVES[BatchState.CANCELLED]


@pytest.mark.parametrize(
    ("sources", "target"),
    [
        ([JobState.SUCCEEDED], JobState.QUEUED),
        ([JobState.REJECTED], JobState.QUEUED),
        ([JobState.HELD], JobState.SUCCEEDED),
        ([JobState.QUEUED, JobState.CANCELLED], JobState.RUNNING),
    ],
)
def test_a_job_move_not_in_the_table_raises(sources: list[JobState], target: JobState) -> None:
    with pytest.raises(InvalidTransition, match=f"to {target}"):
        states.check_job_move(sources, target)


def test_a_batch_move_not_in_the_table_raises() -> None:
    with pytest.raises(InvalidTransition, match="from cancelled to running"):
        states.check_batch_move([BatchState.CANCELLED], BatchState.RUNNING)


def test_writers_refuse_before_touching_the_database(tmp_path: Path, db: Database) -> None:
    """move_jobs / move_batch / set_state check the table first: a refused move changes no row."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 2))
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id
    with db.session() as s:
        with pytest.raises(InvalidTransition):
            jobs.move_jobs(s, JobState.SUCCEEDED, Job.batch_id == batch_id, sources=[JobState.HELD])
        with pytest.raises(InvalidTransition):
            jobs.set_state(s, 1, "token", JobState.REJECTED)
        with pytest.raises(InvalidTransition):
            jobs.move_batch(s, batch_id, BatchState.RUNNING, sources=[BatchState.CANCELLED])
        s.rollback()
        assert set(s.scalars(select(Job.state).where(Job.batch_id == batch_id))) == {"queued"}
        assert s.scalar(select(Batch.state).where(Batch.id == batch_id)) == "running"


def test_a_move_only_happens_from_its_sources(tmp_path: Path, db: Database) -> None:
    """The sources are in the WHERE clause: jobs in other states are left alone."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 3))
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id
    with db.session() as s:
        first = s.scalar(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id))
        assert jobs.move_jobs(s, JobState.HELD, Job.id == first, sources=[JobState.QUEUED]) == 1
        s.commit()
        assert jobs.release_held_jobs(s, batch_id) == 1  # only the held one moves
        assert jobs.cancel_unstarted(s, batch_id) == 3
        s.commit()
        assert jobs.release_held_jobs(s, batch_id) == 0  # cancelled is terminal
        assert jobs.cancel_batch(s, batch_id)
        assert not jobs.reopen_batch(s, batch_id)  # a cancelled batch never runs again


def test_jobs_are_created_only_in_their_initial_states(tmp_path: Path, db: Database) -> None:
    """insert_jobs creates queued or rejected jobs (ids in row order) and refuses any other
    state before writing: nothing is born running, succeeded or held."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 1))
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id

    def row(number: int, state: JobState) -> dict[str, object]:
        return {"batch_id": batch_id, "row_number": number, "spec": "{}", "state": state}

    assert {JobState.QUEUED, JobState.REJECTED} == states.JOB_INITIAL
    with db.session() as s:
        for state in set(JobState) - states.JOB_INITIAL:
            with pytest.raises(InvalidTransition, match=f"cannot be created {state}"):
                jobs.insert_jobs(s, [row(2, JobState.QUEUED), row(3, state)])
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        ids = jobs.insert_jobs(
            s, [row(5, JobState.REJECTED), row(4, JobState.QUEUED)], return_ids=True
        )
        s.commit()
        created = {j.id: (j.row_number, j.state) for j in s.scalars(select(Job))}
    assert [created[i] for i in ids] == [(5, "rejected"), (4, "queued")]


def test_provider_batch_diagram_is_the_table_and_final_states_do_not_move() -> None:
    doc = states.__doc__ or ""
    for line in states.provider_batch_diagram().splitlines():
        assert f"    {line}\n" in doc, f"states.py docstring lacks: {line}"
    assert set(states.PROVIDER_BATCH_MOVES) == set(states.ProviderBatchState)
    for final in (states.ProviderBatchState.COLLECTED, states.ProviderBatchState.ABANDONED):
        assert not states.PROVIDER_BATCH_MOVES[final]
    with pytest.raises(InvalidTransition, match="provider batch"):
        states.check_provider_batch_move([states.ProviderBatchState.OPEN], "abandoned")  # type: ignore[list-item, arg-type]


def test_a_submitted_job_is_pending_and_leaves_only_by_its_line() -> None:
    """A job in a provider batch is not finished, is work to do, and moves when its line is
    booked: succeeded, failed, held, queued again, or cancelled."""
    assert JobState.SUBMITTED in states.JOB_PENDING and JobState.SUBMITTED in states.JOB_TO_RUN
    assert JobState.SUBMITTED not in states.JOB_CLAIMED
    assert states.JOB_MOVES[JobState.SUBMITTED] == {
        JobState.QUEUED,
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.HELD,
        JobState.CANCELLED,
    }
    with pytest.raises(InvalidTransition):
        states.check_job_move([JobState.SUBMITTED], JobState.RUNNING)
