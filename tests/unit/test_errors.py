"""pipeline.errors: one exception tree. Every exception class the package defines (outside the
independent sandbox) is under EditbatchError, and every public one is drawn in the tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pipeline
from pipeline import errors
from pipeline.errors import EditbatchError


def defined_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if info.name.startswith(("pipeline.sandbox", "pipeline.cli.__main__")):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.append(cls)
    return found


def test_every_exception_is_under_the_root() -> None:
    classes = defined_exceptions()
    assert len(classes) >= 12  # the walk found the package's modules
    stray = [
        f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, EditbatchError)
    ]
    assert not stray, f"not under EditbatchError: {stray}"


def test_every_public_exception_is_drawn_in_the_tree() -> None:
    doc = errors.__doc__ or ""
    public = [c for c in defined_exceptions() if not c.__name__.startswith("_")]
    missing = [
        c.__name__ for c in public if f"── {c.__name__} " not in doc and c is not EditbatchError
    ]
    assert not missing, f"pipeline/errors.py's tree lacks: {missing}"
    private = [c for c in defined_exceptions() if c.__name__.startswith("_")]
    for cls in private:  # named in the docstring as control flow that never leaves its module
        assert f"{cls.__module__}.{cls.__name__}" in doc


def test_public_exceptions_live_in_errors_py() -> None:
    """One home: public exception classes are defined in pipeline/errors.py."""
    elsewhere = [
        f"{c.__module__}.{c.__name__}"
        for c in defined_exceptions()
        if not c.__name__.startswith("_") and c.__module__ != "pipeline.errors"
    ]
    assert not elsewhere, elsewhere
