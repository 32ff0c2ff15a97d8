"""Batches: the one submit, the controls a person uses, status, nightly runs."""
