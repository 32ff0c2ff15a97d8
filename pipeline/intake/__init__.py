"""Intake: from a manifest to validated EditSpecs (no database here)."""
