"""What every step of the batch route shares: the executor's per-process dependencies, the
Files/Batches API, the batch prices, and where jobs sent back to the sync route go."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, update

from pipeline.cost.pricing import PriceTable
from pipeline.db.jobs import rowcount
from pipeline.db.models import ProviderBatch, utcnow
from pipeline.errors import LeaseLost
from pipeline.run.batchroute.api import BatchAPI, RemoteBatch
from pipeline.run.executor import Deps
from pipeline.states import ProviderBatchState

SendSync = Callable[[list[int]], None]


@dataclass
class RouteContext:
    """Built once per process (a Celery worker, `editbatch run`) from the executor's Deps."""

    deps: Deps
    api: BatchAPI
    # Job ids moved to the sync route (`--fallback sync`) go here once committed: the Celery
    # `edit` task in a worker, the in-process pool in `editbatch run`.
    send_sync: SendSync | None = None
    # A finished provider batch is collected here (inline), or handed to another task.
    collect_async: Callable[[int], None] | None = None
    holder: str = field(default_factory=lambda: secrets.token_hex(8))

    @classmethod
    def build(cls, deps: Deps, send_sync: SendSync | None = None) -> RouteContext:
        return cls(deps, BatchAPI(deps.gateway.client, deps.gateway.redact), send_sync)

    @property
    def prices(self) -> PriceTable:
        """What the batch route pays: the sync prices times the [batch] factor."""
        return self.deps.prices.for_route("batch")

    def lease(self) -> datetime:
        """Until when a provider batch being prepared or collected is ours (renewed as we go)."""
        return utcnow() + timedelta(seconds=self.deps.settings.lease_seconds)


def remote_values(remote: RemoteBatch) -> dict[str, Any]:
    """The columns of `provider_batches` that mirror what the provider says of a batch."""
    return {
        "provider_id": remote.id,
        "provider_status": remote.status,
        "output_file_id": remote.output_file_id,
        "error_file_id": remote.error_file_id,
        "completed": remote.completed,
        "failed": remote.failed,
        "expires_at": None
        if remote.expires_at is None
        else datetime.fromtimestamp(remote.expires_at, UTC),
        "error": "; ".join(remote.errors)[:4000] if remote.errors else None,
        "refreshed_at": utcnow(),
    }


def keep_lease(ctx: RouteContext, pb_id: int) -> None:
    """Renew our lease on a provider batch; LeaseLost if another process has taken it."""
    with ctx.deps.db.session() as session:
        result = session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb_id, ProviderBatch.lease_token == ctx.holder)
            .values(lease_until=ctx.lease())
            .execution_options(synchronize_session=False)
        )
        session.commit()
    if rowcount(result) != 1:
        raise LeaseLost(f"provider batch {pb_id} was taken over by another process")


def take_lease(
    ctx: RouteContext, pb_id: int, states: Collection[ProviderBatchState]
) -> ProviderBatch | None:
    """Take provider batch `pb_id` for this process if it is in one of `states` and nobody
    holds it (no lease, or an expired one); the row, or None."""
    now = utcnow()
    with ctx.deps.db.session() as session:
        result = session.execute(
            update(ProviderBatch)
            .where(
                ProviderBatch.id == pb_id,
                ProviderBatch.state.in_(list(states)),
                or_(ProviderBatch.lease_until.is_(None), ProviderBatch.lease_until < now),
            )
            .values(lease_until=ctx.lease(), lease_token=ctx.holder)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if rowcount(result) != 1:
            return None
        pb = session.get(ProviderBatch, pb_id)
        if pb is not None:
            session.expunge(pb)
        return pb


def release_lease(ctx: RouteContext, pb_id: int) -> None:
    """Give up our lease now (a transient failure: the next tick tries again at once)."""
    with ctx.deps.db.session() as session:
        session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb_id, ProviderBatch.lease_token == ctx.holder)
            .values(lease_until=None, lease_token=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
