"""Alembic migrations of editbatch (applied on first use and by `editbatch db upgrade`)."""

# The newest revision: lets a process see that the schema is current without importing alembic.
# tests/unit/test_migrations_head.py checks it against the revision files.
HEAD = "0011"
