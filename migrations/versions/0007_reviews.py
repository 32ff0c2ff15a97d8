"""Review decisions, re-runs of rejected rows, and what the dashboard filters on

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

    reviews        one decision per output (approved | rejected, with a note)
    batch_review_counts   outputs per (batch, decision), kept by triggers on reviews
    jobs.rerun_of_job_id   the rejected job a re-run was made from (unique: one re-run each)
    job_metadata   (batch_id, key, value, job_id): the row's metadata columns, copied from
                   jobs.spec by an INSERT trigger, so "category = shoes" is an index range
                   instead of parsing the JSON of a million specs. Keys are cut to 100
                   characters and values to 200 (an index entry has a size limit on
                   PostgreSQL; a long description column must not make a submit fail).

Indexes for the jobs table of the dashboard (keyset pagination in id order, which is row
order): (batch_id, state, id) replaces (batch_id, state), whose prefix it is; (batch_id,
model, id); (batch_id, last_error_code, id) for jobs with an error; (batch_id,
external_key); (batch_id, finished_at) for the recent finishing rate (ETA); and a partial
(batch_id, state, last_error_code) over failed and rejected jobs for the failure groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_CHARS = 100
VALUE_CHARS = 200

INDEXES = (
    "CREATE INDEX ix_jobs_batch_state_id ON jobs (batch_id, state, id)",
    "CREATE INDEX ix_jobs_batch_model ON jobs (batch_id, model, id)",
    "CREATE INDEX ix_jobs_batch_code ON jobs (batch_id, last_error_code, id) "
    "WHERE last_error_code IS NOT NULL",
    "CREATE INDEX ix_jobs_batch_key ON jobs (batch_id, external_key)",
    "CREATE INDEX ix_jobs_batch_finished ON jobs (batch_id, finished_at)",
    "CREATE UNIQUE INDEX ix_jobs_rerun_of ON jobs (rerun_of_job_id)",
    # Failures grouped by error code on the batch page: an index-only scan of the few.
    "CREATE INDEX ix_jobs_failures ON jobs (batch_id, state, last_error_code) "
    "WHERE state IN ('failed', 'rejected')",
)
INDEX_NAMES = (
    "ix_jobs_batch_state_id",
    "ix_jobs_batch_model",
    "ix_jobs_batch_code",
    "ix_jobs_batch_key",
    "ix_jobs_batch_finished",
    "ix_jobs_rerun_of",
    "ix_jobs_failures",
)

# Review counts per batch and decision, kept by triggers, so status never counts the reviews
# of a batch. SQLite: row triggers (counter rows are updated in place).
# (The foreign key is table-level: SQLAlchemy reads ON DELETE back from SQLite only there, and
# `alembic check` compares it with the model.)
REVIEW_COUNTS = """CREATE TABLE batch_review_counts (
  batch_id INTEGER NOT NULL, decision VARCHAR(10) NOT NULL, outputs BIGINT NOT NULL,
  PRIMARY KEY (batch_id, decision),
  FOREIGN KEY (batch_id) REFERENCES batches (id) ON DELETE CASCADE)"""
_PLUS = """INSERT INTO batch_review_counts (batch_id, decision, outputs)
  VALUES (NEW.batch_id, NEW.decision, 1)
  ON CONFLICT (batch_id, decision) DO UPDATE SET outputs = batch_review_counts.outputs + 1;"""
_MINUS = """UPDATE batch_review_counts SET outputs = outputs - 1
  WHERE batch_id = OLD.batch_id AND decision = OLD.decision;"""
SQLITE_REVIEW_TRIGGERS = (
    f"CREATE TRIGGER reviews_count_ins AFTER INSERT ON reviews BEGIN {_PLUS} END",
    f"CREATE TRIGGER reviews_count_del AFTER DELETE ON reviews BEGIN {_MINUS} END",
    "CREATE TRIGGER reviews_count_upd AFTER UPDATE OF decision, batch_id ON reviews "
    f"BEGIN {_MINUS} {_PLUS} END",
)
# PostgreSQL: statement-level over transition tables (a row-level upsert of one counter row
# per review took 1 ms a row on a bulk insert: every version of the row stays in the chain
# until the transaction ends). Transition tables allow no column list: a note-only UPDATE
# nets to zero and writes nothing.
_PG_REVIEW_DELTA = {
    "ins": ("INSERT", "NEW TABLE AS new_rows", "SELECT batch_id, decision, 1 AS d FROM new_rows"),
    "del": ("DELETE", "OLD TABLE AS old_rows", "SELECT batch_id, decision, -1 AS d FROM old_rows"),
    "upd": (
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "SELECT batch_id, decision, -1 AS d FROM old_rows "
        "UNION ALL SELECT batch_id, decision, 1 FROM new_rows",
    ),
}
_PG_UPSERT = """INSERT INTO batch_review_counts AS t (batch_id, decision, outputs)
  SELECT batch_id, decision, sum(d) FROM ({rows}) ch
  GROUP BY batch_id, decision HAVING sum(d) <> 0 ORDER BY batch_id, decision
  ON CONFLICT (batch_id, decision) DO UPDATE SET outputs = t.outputs + excluded.outputs;"""
# Deletes only decrement existing rows: a deleted batch's counters went first (cascade).
_PG_DECREMENT = """UPDATE batch_review_counts AS t SET outputs = t.outputs + ch.n
  FROM (SELECT batch_id, decision, sum(d) AS n FROM ({rows}) u GROUP BY batch_id, decision) ch
  WHERE t.batch_id = ch.batch_id AND t.decision = ch.decision;"""
PG_REVIEW_TRIGGER = tuple(
    ddl
    for kind, (event, referencing, rows) in _PG_REVIEW_DELTA.items()
    for ddl in (
        f"""CREATE FUNCTION reviews_count_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {(_PG_DECREMENT if kind == "del" else _PG_UPSERT).format(rows=rows)}
  RETURN NULL;
END $$""",
        f"CREATE TRIGGER reviews_count_{kind} AFTER {event} ON reviews REFERENCING {referencing} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION reviews_count_{kind}()",
    )
)


def _metadata_select(pg: bool, rows: str) -> str:
    """(batch_id, key, value, job_id) of every metadata column of the jobs in `rows`."""
    if pg:
        # Only our own JSON reaches jobs.spec (EditSpec.to_json, or "{}" for rejected rows).
        # Parsed once per row, as json (not jsonb): +35% on an INSERT of 100,000 jobs, where
        # jsonb twice cost +65% (bench/dashboard.py).
        return f"""SELECT r.batch_id, left(m.key, {KEY_CHARS}), left(m.value, {VALUE_CHARS}), r.id
FROM (SELECT batch_id, id, spec::json -> 'metadata' AS meta FROM {rows} WHERE spec <> '{{}}') r
CROSS JOIN LATERAL json_each_text(
  CASE WHEN json_typeof(r.meta) = 'object' THEN r.meta ELSE '{{}}'::json END) m"""
    return f"""SELECT r.batch_id, substr(m.key, 1, {KEY_CHARS}),
  substr(CAST(m.value AS TEXT), 1, {VALUE_CHARS}), r.id
FROM {rows} r, json_each(r.spec, '$.metadata') m
WHERE json_valid(r.spec) AND json_type(r.spec, '$.metadata') = 'object'"""


def _insert(pg: bool, rows: str) -> str:
    """Copy the metadata of `rows`; two keys equal in their first 100 characters keep one."""
    columns = "job_metadata (batch_id, key, value, job_id)"
    if pg:
        return f"INSERT INTO {columns} {_metadata_select(True, rows)} ON CONFLICT DO NOTHING"
    return f"INSERT OR IGNORE INTO {columns} {_metadata_select(False, rows)}"


def _sqlite_trigger() -> str:
    new = "(SELECT NEW.batch_id AS batch_id, NEW.spec AS spec, NEW.id AS id)"
    return f"CREATE TRIGGER jobs_metadata_ins AFTER INSERT ON jobs BEGIN {_insert(False, new)}; END"


def _pg_trigger() -> list[str]:
    return [
        "CREATE FUNCTION jobs_metadata_ins() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
        f"  {_insert(True, 'new_rows')};\n  RETURN NULL;\nEND $$",
        "CREATE TRIGGER jobs_metadata_ins AFTER INSERT ON jobs "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION jobs_metadata_ins()",
    ]


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    # Plain ALTER TABLE, not batch mode: recreating `jobs` on SQLite would drop its triggers.
    op.add_column("jobs", sa.Column("rerun_of_job_id", sa.Integer(), nullable=True))
    op.create_table(
        "reviews",
        sa.Column(
            "output_id",
            sa.Integer(),
            sa.ForeignKey("outputs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "batch_id",
            sa.Integer(),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_reviews_batch_decision", "reviews", ["batch_id", "decision", "job_id", "output_id"]
    )
    op.create_table(
        "job_metadata",
        sa.Column(
            "batch_id",
            sa.Integer(),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("key", sa.String(length=KEY_CHARS), nullable=False),
        sa.Column("value", sa.String(length=VALUE_CHARS), nullable=False),
        # No foreign key to jobs: a cascade from each deleted job would scan this table
        # (jobs go with their batch, which the batch_id key cascades).
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "key", "value", "job_id"),
    )
    op.execute("DROP INDEX ix_jobs_batch_state")
    for ddl in INDEXES:
        op.execute(ddl)
    op.execute(REVIEW_COUNTS)  # reviews is new and empty: nothing to count yet
    if pg:
        op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        for ddl in (*_pg_trigger(), *PG_REVIEW_TRIGGER):
            op.execute(ddl)
    else:
        for ddl in (_sqlite_trigger(), *SQLITE_REVIEW_TRIGGERS):
            op.execute(ddl)
    op.execute(_insert(pg, "jobs"))


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP TRIGGER IF EXISTS jobs_metadata_ins" + (" ON jobs" if pg else ""))
    if pg:
        op.execute("DROP FUNCTION IF EXISTS jobs_metadata_ins()")
    for kind in _PG_REVIEW_DELTA:
        op.execute(f"DROP TRIGGER IF EXISTS reviews_count_{kind}" + (" ON reviews" if pg else ""))
        if pg:
            op.execute(f"DROP FUNCTION IF EXISTS reviews_count_{kind}()")
    op.execute("DROP TABLE IF EXISTS batch_review_counts")
    for name in INDEX_NAMES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.execute("CREATE INDEX ix_jobs_batch_state ON jobs (batch_id, state)")
    op.drop_table("job_metadata")
    op.drop_index("ix_reviews_batch_decision", table_name="reviews")
    op.drop_table("reviews")
    op.drop_column("jobs", "rerun_of_job_id")
