"""Review decisions on outputs: approved or rejected, with a note (the dashboard's gallery).

A decision belongs to one output and replaces the one before; clearing it makes the output
unreviewed again. A job counts as rejected when any of its outputs is:
`pipeline.batch.controls.rerun_rejected` makes new jobs for those rows, and
`pipeline.output.export` copies the approved outputs out. Triggers keep the per-batch counts
(`batch_review_counts`, read by `pipeline.batch.status.review_counts`).
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pipeline.db.models import Job, Output, Review, utcnow
from pipeline.errors import EditbatchError, NotFoundError
from pipeline.states import ReviewDecision

MAX_NOTE_CHARS = 2000


def decide(
    session: Session,
    batch_id: int,
    output_ids: Collection[int],
    decision: ReviewDecision | str | None,
    note: str | None = None,
) -> int:
    """Record `decision` (approved | rejected; None: unreviewed again) for outputs of the batch.

    A new decision replaces the earlier one. Every id must be an output of this batch
    (NotFoundError otherwise, and nothing changes). Returns how many outputs were decided.
    """
    if decision is not None and decision not in tuple(ReviewDecision):
        raise EditbatchError(
            f"decision {decision!r}: use {' or '.join(d.value for d in ReviewDecision)}"
        )
    ids = sorted(set(output_ids))
    if not ids:
        return 0
    found = dict(
        session.execute(
            select(Output.id, Output.job_id)
            .join(Job, Job.id == Output.job_id)
            .where(Job.batch_id == batch_id, Output.id.in_(ids))
        ).all()
    )
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFoundError(f"batch {batch_id} has no outputs {missing}")
    note = (note or "").strip()[:MAX_NOTE_CHARS] or None
    if decision is None:
        session.execute(delete(Review).where(Review.output_id.in_(ids)))
        session.commit()
        return len(ids)
    chosen = ReviewDecision(decision)
    existing = {
        r.output_id: r for r in session.scalars(select(Review).where(Review.output_id.in_(ids)))
    }
    now = utcnow()
    for output_id in ids:
        review = existing.get(output_id)
        if review is None:
            session.add(
                Review(
                    output_id=output_id,
                    batch_id=batch_id,
                    job_id=found[output_id],
                    decision=chosen,
                    note=note,
                    decided_at=now,
                )
            )
        else:
            review.decision, review.note, review.decided_at = chosen, note, now
    session.commit()
    return len(ids)
