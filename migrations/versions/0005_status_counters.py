"""Per-batch status counters kept by triggers: `editbatch status` reads a few rows, not millions

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

Three tables hold, per batch, what `pipeline.batch.status.batch_status` used to aggregate over jobs,
attempts and outputs at every call (2.5 s on a 1,000,000-job batch):

    batch_job_counts      (batch_id, model, quality, state): jobs, cost, estimates, kept
    batch_attempt_counts  (batch_id, outcome): attempts, unpriced, estimated, cost
    batch_output_counts   (batch_id): outputs, uncollected, drift count / sum / max

Money is counted in integer micro-dollars (exact on SQLite too, whose NUMERIC is a float).
`model`/`quality` NULL are stored as '' (a key column cannot be NULL). `kept_micros` is the
cost of the `ok` attempts of the group's jobs when the group is `succeeded` (retry waste =
attempt cost - kept). `drift_max` is the largest drift ever recorded (outputs' drift is
written once).

SQLite: row-level triggers (counter rows are updated in place). PostgreSQL: statement-level
triggers over transition tables, one upsert per counter row per statement (row-level took
75 s for a 100,000-job insert; see docs/performance.md section 3). Lock order on PostgreSQL:
attempt counters, then job counters, then output counters, as the executor writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    """CREATE TABLE batch_job_counts (
  batch_id INTEGER NOT NULL, model VARCHAR(100) NOT NULL, quality VARCHAR(20) NOT NULL,
  state VARCHAR(16) NOT NULL, jobs BIGINT NOT NULL, cost_micros BIGINT NOT NULL,
  estimated_micros BIGINT NOT NULL, unestimated BIGINT NOT NULL, kept_micros BIGINT NOT NULL,
  PRIMARY KEY (batch_id, model, quality, state))""",
    """CREATE TABLE batch_attempt_counts (
  batch_id INTEGER NOT NULL, outcome VARCHAR(16) NOT NULL, attempts BIGINT NOT NULL,
  unpriced BIGINT NOT NULL, estimated BIGINT NOT NULL, cost_micros BIGINT NOT NULL,
  PRIMARY KEY (batch_id, outcome))""",
    """CREATE TABLE batch_output_counts (
  batch_id INTEGER NOT NULL PRIMARY KEY, outputs BIGINT NOT NULL, uncollected BIGINT NOT NULL,
  drift_n BIGINT NOT NULL, drift_sum FLOAT NOT NULL, drift_max FLOAT)""",
    # Jobs reused from a twin are few: `reused`/`saved` join just those to their donors.
    "CREATE INDEX ix_jobs_reused ON jobs (batch_id, reused_from_job_id) "
    "WHERE reused_from_job_id IS NOT NULL",
)

COUNTER_TABLES = ("batch_job_counts", "batch_attempt_counts", "batch_output_counts")


def _micros(expr: str, pg: bool) -> str:
    if pg:
        return f"round(coalesce({expr}, 0) * 1000000)::bigint"
    return f"CAST(round(coalesce({expr}, 0) * 1000000) AS INTEGER)"


def _int(expr: str, pg: bool) -> str:
    return f"({expr})::int" if pg else f"({expr})"


def _ok_cost(job: str, pg: bool) -> str:
    """Cost of job `job`'s ok attempts (micro-dollars)."""
    return (
        f"(SELECT coalesce(sum({_micros('a.cost_usd', pg)}), 0) FROM attempts a "
        f"WHERE a.job_id = {job} AND a.outcome = 'ok')"
    )


def _backfill(pg: bool) -> list[str]:
    return [
        f"""INSERT INTO batch_job_counts
SELECT j.batch_id, coalesce(j.model, ''), coalesce(j.quality, ''), j.state, count(*),
       coalesce(sum({_micros("j.cost_usd", pg)}), 0),
       coalesce(sum({_micros("j.estimated_usd", pg)}), 0),
       count(*) - count(j.estimated_usd),
       coalesce(sum(CASE WHEN j.state = 'succeeded' THEN k.kept ELSE 0 END), 0)
FROM jobs j LEFT JOIN (SELECT job_id, sum({_micros("cost_usd", pg)}) AS kept FROM attempts
                       WHERE outcome = 'ok' GROUP BY job_id) k ON k.job_id = j.id
GROUP BY j.batch_id, coalesce(j.model, ''), coalesce(j.quality, ''), j.state""",
        f"""INSERT INTO batch_attempt_counts
SELECT j.batch_id, a.outcome, count(*),
       sum(CASE WHEN a.priced IS FALSE THEN 1 ELSE 0 END),
       sum(CASE WHEN a.cost_estimated IS TRUE THEN 1 ELSE 0 END),
       coalesce(sum({_micros("a.cost_usd", pg)}), 0)
FROM attempts a JOIN jobs j ON j.id = a.job_id GROUP BY j.batch_id, a.outcome""",
        """INSERT INTO batch_output_counts
SELECT j.batch_id, count(*), count(*) - count(o.collected_at), count(o.drift),
       coalesce(sum(o.drift), 0), max(o.drift)
FROM outputs o JOIN jobs j ON j.id = o.job_id GROUP BY j.batch_id""",
    ]


# -- SQLite: row-level triggers --------------------------------------------------------------


def _sqlite_job_plus(row: str, kept: str) -> str:
    return f"""INSERT INTO batch_job_counts VALUES ({row}.batch_id, coalesce({row}.model, ''),
  coalesce({row}.quality, ''), {row}.state, 1, {_micros(f"{row}.cost_usd", False)},
  {_micros(f"{row}.estimated_usd", False)}, ({row}.estimated_usd IS NULL), {kept})
ON CONFLICT (batch_id, model, quality, state) DO UPDATE SET jobs = jobs + 1,
  cost_micros = cost_micros + excluded.cost_micros,
  estimated_micros = estimated_micros + excluded.estimated_micros,
  unestimated = unestimated + excluded.unestimated,
  kept_micros = kept_micros + excluded.kept_micros;"""


def _sqlite_job_minus(row: str) -> str:
    kept = f"CASE WHEN {row}.state = 'succeeded' THEN {_ok_cost(f'{row}.id', False)} ELSE 0 END"
    return f"""UPDATE batch_job_counts SET jobs = jobs - 1,
  cost_micros = cost_micros - {_micros(f"{row}.cost_usd", False)},
  estimated_micros = estimated_micros - {_micros(f"{row}.estimated_usd", False)},
  unestimated = unestimated - ({row}.estimated_usd IS NULL),
  kept_micros = kept_micros - {kept}
WHERE batch_id = {row}.batch_id AND model = coalesce({row}.model, '')
  AND quality = coalesce({row}.quality, '') AND state = {row}.state;"""


def _sqlite_kept(delta: str, job_id: str) -> str:
    """Add `delta` to the kept cost of the job's group, if the job is succeeded."""
    return f"""UPDATE batch_job_counts SET kept_micros = kept_micros + ({delta})
WHERE state = 'succeeded' AND (batch_id, model, quality, state) = (
  SELECT batch_id, coalesce(model, ''), coalesce(quality, ''), state FROM jobs
  WHERE id = {job_id});"""


def _sqlite_attempt_plus(row: str) -> str:
    return f"""INSERT INTO batch_attempt_counts VALUES (
  (SELECT batch_id FROM jobs WHERE id = {row}.job_id), {row}.outcome, 1,
  ({row}.priced IS FALSE), ({row}.cost_estimated IS TRUE), {_micros(f"{row}.cost_usd", False)})
ON CONFLICT (batch_id, outcome) DO UPDATE SET attempts = attempts + 1,
  unpriced = unpriced + excluded.unpriced, estimated = estimated + excluded.estimated,
  cost_micros = cost_micros + excluded.cost_micros;"""


def _sqlite_attempt_minus(row: str) -> str:
    return f"""UPDATE batch_attempt_counts SET attempts = attempts - 1,
  unpriced = unpriced - ({row}.priced IS FALSE),
  estimated = estimated - ({row}.cost_estimated IS TRUE),
  cost_micros = cost_micros - {_micros(f"{row}.cost_usd", False)}
WHERE batch_id = (SELECT batch_id FROM jobs WHERE id = {row}.job_id)
  AND outcome = {row}.outcome;"""


def _ok_micros(row: str, pg: bool) -> str:
    return f"CASE WHEN {row}.outcome = 'ok' THEN {_micros(f'{row}.cost_usd', pg)} ELSE 0 END"


def _sqlite_output_plus(row: str) -> str:
    top = (
        "max(coalesce(batch_output_counts.drift_max, excluded.drift_max), "
        "coalesce(excluded.drift_max, batch_output_counts.drift_max))"
    )
    return f"""INSERT INTO batch_output_counts VALUES (
  (SELECT batch_id FROM jobs WHERE id = {row}.job_id), 1, ({row}.collected_at IS NULL),
  ({row}.drift IS NOT NULL), coalesce({row}.drift, 0), {row}.drift)
ON CONFLICT (batch_id) DO UPDATE SET outputs = outputs + 1,
  uncollected = uncollected + excluded.uncollected, drift_n = drift_n + excluded.drift_n,
  drift_sum = drift_sum + excluded.drift_sum, drift_max = {top};"""


def _sqlite_output_minus(row: str) -> str:
    return f"""UPDATE batch_output_counts SET outputs = outputs - 1,
  uncollected = uncollected - ({row}.collected_at IS NULL),
  drift_n = drift_n - ({row}.drift IS NOT NULL), drift_sum = drift_sum - coalesce({row}.drift, 0)
WHERE batch_id = (SELECT batch_id FROM jobs WHERE id = {row}.job_id);"""


def _sqlite_triggers() -> list[str]:
    def changed(columns: tuple[str, ...]) -> str:
        return " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in columns)

    job_cols = ("state", "model", "quality", "cost_usd", "estimated_usd", "batch_id")
    att_cols = ("outcome", "priced", "cost_estimated", "cost_usd", "job_id")
    out_cols = ("collected_at", "drift", "job_id")
    new_kept = f"CASE WHEN NEW.state = 'succeeded' THEN {_ok_cost('NEW.id', False)} ELSE 0 END"
    return [
        # A new job has no attempts yet: nothing kept.
        f"CREATE TRIGGER jobs_count_ins AFTER INSERT ON jobs BEGIN "
        f"{_sqlite_job_plus('NEW', '0')} END",
        f"CREATE TRIGGER jobs_count_upd AFTER UPDATE OF {', '.join(job_cols)} ON jobs "
        f"WHEN {changed(job_cols)} BEGIN {_sqlite_job_minus('OLD')} "
        f"{_sqlite_job_plus('NEW', new_kept)} END",
        f"CREATE TRIGGER jobs_count_del AFTER DELETE ON jobs BEGIN {_sqlite_job_minus('OLD')} END",
        f"CREATE TRIGGER attempts_count_ins AFTER INSERT ON attempts BEGIN "
        f"{_sqlite_attempt_plus('NEW')} {_sqlite_kept(_ok_micros('NEW', False), 'NEW.job_id')} "
        f"END",
        f"CREATE TRIGGER attempts_count_upd AFTER UPDATE OF {', '.join(att_cols)} ON attempts "
        f"WHEN {changed(att_cols)} BEGIN {_sqlite_attempt_minus('OLD')} "
        f"{_sqlite_kept('-' + _ok_micros('OLD', False), 'OLD.job_id')} "
        f"{_sqlite_attempt_plus('NEW')} {_sqlite_kept(_ok_micros('NEW', False), 'NEW.job_id')} "
        f"END",
        f"CREATE TRIGGER attempts_count_del AFTER DELETE ON attempts BEGIN "
        f"{_sqlite_attempt_minus('OLD')} "
        f"{_sqlite_kept('-' + _ok_micros('OLD', False), 'OLD.job_id')} END",
        f"CREATE TRIGGER outputs_count_ins AFTER INSERT ON outputs BEGIN "
        f"{_sqlite_output_plus('NEW')} END",
        f"CREATE TRIGGER outputs_count_upd AFTER UPDATE OF {', '.join(out_cols)} ON outputs "
        f"WHEN {changed(out_cols)} BEGIN {_sqlite_output_minus('OLD')} "
        f"{_sqlite_output_plus('NEW')} END",
        f"CREATE TRIGGER outputs_count_del AFTER DELETE ON outputs BEGIN "
        f"{_sqlite_output_minus('OLD')} END",
        "CREATE TRIGGER batches_count_del AFTER DELETE ON batches BEGIN "
        + " ".join(f"DELETE FROM {t} WHERE batch_id = OLD.id;" for t in COUNTER_TABLES)
        + " END",
    ]


SQLITE_TRIGGERS = (
    "jobs_count_ins",
    "jobs_count_upd",
    "jobs_count_del",
    "attempts_count_ins",
    "attempts_count_upd",
    "attempts_count_del",
    "outputs_count_ins",
    "outputs_count_upd",
    "outputs_count_del",
    "batches_count_del",
)


# -- PostgreSQL: statement-level triggers over transition tables -----------------------------

# table -> (counter table, key, SELECT of (key, d, values) from {rows} with sign {d}, sums)
PG_COUNTED: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "jobs": (
        "batch_job_counts",
        "batch_id, model, quality, state",
        "r.batch_id, coalesce(r.model, '') AS model, coalesce(r.quality, '') AS quality, "
        "r.state, {d} AS d, "
        + _micros("r.cost_usd", True)
        + " AS cost, "
        + _micros("r.estimated_usd", True)
        + " AS est, (r.estimated_usd IS NULL)::int AS unest, {kept} AS kept FROM {rows} r",
        {
            "jobs": "sum(d)",
            "cost_micros": "sum(d * cost)",
            "estimated_micros": "sum(d * est)",
            "unestimated": "sum(d * unest)",
            "kept_micros": "sum(d * kept)",
        },
    ),
    "attempts": (
        "batch_attempt_counts",
        "batch_id, outcome",
        "j.batch_id, r.outcome, {d} AS d, (r.priced IS FALSE)::int AS unpriced, "
        "(r.cost_estimated IS TRUE)::int AS est, "
        + _micros("r.cost_usd", True)
        + " AS cost FROM {rows} r JOIN jobs j ON j.id = r.job_id",
        {
            "attempts": "sum(d)",
            "unpriced": "sum(d * unpriced)",
            "estimated": "sum(d * est)",
            "cost_micros": "sum(d * cost)",
        },
    ),
    "outputs": (
        "batch_output_counts",
        "batch_id",
        "j.batch_id, {d} AS d, (r.collected_at IS NULL)::int AS uncollected, r.drift "
        "FROM {rows} r JOIN jobs j ON j.id = r.job_id",
        {
            "outputs": "sum(d)",
            "uncollected": "sum(d * uncollected)",
            "drift_n": "sum(d * (drift IS NOT NULL)::int)",
            "drift_sum": "sum(d * coalesce(drift, 0))",
            "drift_max": "max(CASE WHEN d = 1 THEN drift END)",  # never comes down
        },
    ),
}

PG_OPS = {
    "ins": ("INSERT", "NEW TABLE AS new_rows", (("1", "new_rows"),)),
    "upd": (
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        (("-1", "old_rows"), ("1", "new_rows")),
    ),
    "del": ("DELETE", "OLD TABLE AS old_rows", (("-1", "old_rows"),)),
}


def _pg_kept_of_attempts(union: str) -> str:
    """Attempts changed: their ok cost moves the kept cost of their succeeded jobs' groups."""
    return f"""
  INSERT INTO batch_job_counts AS t (batch_id, model, quality, state, jobs, cost_micros,
                                     estimated_micros, unestimated, kept_micros)
  SELECT j.batch_id, coalesce(j.model, ''), coalesce(j.quality, ''), j.state, 0, 0, 0, 0,
         sum(ch.d * ch.ok)
  FROM ({union}) ch JOIN jobs j ON j.id = ch.job_id
  WHERE j.state = 'succeeded'
  GROUP BY 1, 2, 3, 4 HAVING sum(ch.d * ch.ok) <> 0
  ORDER BY 1, 2, 3, 4
  ON CONFLICT (batch_id, model, quality, state)
  DO UPDATE SET kept_micros = t.kept_micros + excluded.kept_micros;"""


def _pg_function(table: str, kind: str) -> str:
    counts, key, select, sums = PG_COUNTED[table]
    _event, _referencing, sources = PG_OPS[kind]
    columns = ", ".join(sums)
    aggregates = ", ".join(sums.values())

    def kept(rows: str) -> str:
        if kind == "ins" or table != "jobs":
            return "0"  # a new job has no attempts yet
        return f"CASE WHEN r.state = 'succeeded' THEN {_ok_cost('r.id', True)} ELSE 0 END"

    union = " UNION ALL ".join(
        "SELECT " + select.format(d=d, rows=rows, kept=kept(rows)) for d, rows in sources
    )
    # An update that changes no counted column nets to zero: write nothing then.
    changed = " OR ".join(f"{e} <> 0" for c, e in sums.items() if c != "drift_max")
    if kind == "del":
        # Only ever decrement existing rows (a whole batch going takes its counters with it).
        kept_sums = {c: e for c, e in sums.items() if c != "drift_max"}
        named = ", ".join(f"{e} AS {c}" for c, e in kept_sums.items())
        sets = ", ".join(f"{c} = t.{c} + ch.{c}" for c in kept_sums)
        where = " AND ".join(f"t.{k} = ch.{k}" for k in key.split(", "))
        body = f"""
  UPDATE {counts} AS t SET {sets}
  FROM (SELECT {key}, {named} FROM ({union}) u GROUP BY {key}) ch
  WHERE {where};"""
    else:
        merge = ", ".join(
            f"{c} = GREATEST(t.{c}, excluded.{c})"
            if c == "drift_max"
            else f"{c} = t.{c} + excluded.{c}"
            for c in sums
        )
        body = f"""
  INSERT INTO {counts} AS t ({key}, {columns})
  SELECT {key}, {aggregates} FROM ({union}) ch
  GROUP BY {key} HAVING {changed}
  ORDER BY {key}  -- counter rows locked in key order: no deadlock between two workers
  ON CONFLICT ({key}) DO UPDATE SET {merge};"""
    if table == "attempts":
        ok_union = " UNION ALL ".join(
            f"SELECT r.job_id, {d} AS d, {_ok_micros('r', True)} AS ok FROM {rows} r"
            for d, rows in sources
        )
        body += _pg_kept_of_attempts(ok_union)
    return f"""CREATE FUNCTION {table}_count_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{body}
  RETURN NULL;
END $$"""


def _pg_triggers() -> list[str]:
    ddl = []
    for table in PG_COUNTED:
        for kind, (event, referencing, _sources) in PG_OPS.items():
            ddl.append(_pg_function(table, kind))
            ddl.append(
                f"CREATE TRIGGER {table}_count_{kind} AFTER {event} ON {table} "
                f"REFERENCING {referencing} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION {table}_count_{kind}()"
            )
    clear = " ".join(
        f"DELETE FROM {t} WHERE batch_id IN (SELECT id FROM old_rows);" for t in COUNTER_TABLES
    )
    ddl.append(
        "CREATE FUNCTION batches_count_del() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN {clear} RETURN NULL; END $$"
    )
    ddl.append(
        "CREATE TRIGGER batches_count_del AFTER DELETE ON batches "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION batches_count_del()"
    )
    return ddl


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    for ddl in TABLES:
        op.execute(ddl)
    if pg:
        # Triggers first, then counts of what is there: the lock keeps writers out in between.
        op.execute("LOCK TABLE jobs, attempts, outputs IN SHARE ROW EXCLUSIVE MODE")
        for ddl in _pg_triggers():
            op.execute(ddl)
        for sql in _backfill(pg):
            op.execute(sql)
    else:
        # The first INSERT takes SQLite's write lock (held to the end of the migration), so no
        # writer comes between the counts and the triggers.
        for sql in _backfill(pg):
            op.execute(sql)
        for ddl in _sqlite_triggers():
            op.execute(ddl)


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        for table in PG_COUNTED:
            for op_name in PG_OPS:
                op.execute(f"DROP TRIGGER IF EXISTS {table}_count_{op_name} ON {table}")
                op.execute(f"DROP FUNCTION IF EXISTS {table}_count_{op_name}()")
        op.execute("DROP TRIGGER IF EXISTS batches_count_del ON batches")
        op.execute("DROP FUNCTION IF EXISTS batches_count_del()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DROP INDEX IF EXISTS ix_jobs_reused")
    for table in COUNTER_TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table}")
