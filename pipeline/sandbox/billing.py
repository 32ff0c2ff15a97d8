"""The JSONL billing log: one line per billed answer (sync request or batch line), appended under
one lock."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any


class BillingLog:
    """Appends billing records to whichever path the config names at the time of the write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def append(
        self,
        path: str | None,
        *,
        request_id: str,
        model: str,
        size: str,
        quality: str,
        n: int,
        usage: dict[str, Any] | None,
        cost_usd: Decimal,
        route: str,
        delivered: bool,
        batch_id: str | None = None,
        custom_id: str | None = None,
        provider: str = "openai",
        deployment: str | None = None,
    ) -> None:
        """`route`: "sync" or "batch"; `delivered`: the answer reached the client (sync) or the
        output file (batch); `provider`: "openai" or "azure" (with the Azure `deployment`)."""
        if path is None:
            return
        record: dict[str, Any] = {
            "request_id": request_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "route": route,
            "model": model,
            "size": size,
            "quality": quality,
            "n": n,
            "usage": usage,
            "cost_usd": str(cost_usd),
            "delivered": delivered,
            "provider": provider,
        }
        if batch_id is not None:
            record["batch_id"] = batch_id
            record["custom_id"] = custom_id
        if deployment is not None:
            record["deployment"] = deployment
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock, open(path, "a", encoding="utf-8") as log:
            log.write(line)
            log.flush()
