"""Output: spool, post-processing, atomic writes to storage, reports."""
