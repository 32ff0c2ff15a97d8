"""The daily spend ledger: one row per UTC day, shared by every batch (see pipeline.cost.budget)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from sqlalchemy import Date, text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.db.models import Base, Money

__all__ = ["DailySpend"]


class DailySpend(Base):
    """Committed spend plus in-flight reservations of one UTC day, across all batches."""

    __tablename__ = "daily_spend"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    reserved_usd: Mapped[Decimal] = mapped_column(
        Money, default=Decimal(0), server_default=text("0")
    )
