"""The model catalogue: built-in facts, size rules and user overrides."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pipeline import clock
from pipeline.errors import ConfigError
from pipeline.intake.catalog import (
    Catalog,
    Lifecycle,
    ModelInfo,
    load_catalog,
    parse_size,
    shutdown_notices,
)

CURRENT = (
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
)
SHUTTING_DOWN = ("gpt-image-1.5", "gpt-image-1-mini", "chatgpt-image-latest")  # on 2026-12-01
NOV_30, DEC_1 = dt.date(2026, 11, 30), dt.date(2026, 12, 1)
FREE_SIZE = tuple(m for m in CURRENT if m.startswith("gpt-image-2"))
TWO_FIVE = tuple(m for m in CURRENT if m.startswith("gpt-image-2.5"))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def model(catalog: Catalog, name: str) -> ModelInfo:
    info = catalog.get(name)
    assert info is not None, name
    return info


def test_every_model_of_the_api_facts_is_there(catalog: Catalog) -> None:
    """Today's facts (API-FACTS, 2026-11-30): three models shut down tomorrow."""
    assert catalog.as_of == "2026-11-30"
    assert set(catalog.names()) == {*CURRENT, *SHUTTING_DOWN, "gpt-image-1", "dall-e-2", "dall-e-3"}
    for name in CURRENT:
        assert model(catalog, name).state_on(NOV_30) == Lifecycle.CURRENT
    for name in SHUTTING_DOWN:
        info = model(catalog, name)
        assert info.shutdown_on == DEC_1 and info.deprecated_on == dt.date(2026, 6, 2)
        assert info.replacement in ("gpt-image-2.5-sunburst", "gpt-image-2.5-flare")
        assert info.state_on(NOV_30) == Lifecycle.DEPRECATED
    assert set(catalog.current(NOV_30)) == set(CURRENT)
    assert set(catalog.usable(NOV_30)) == {*CURRENT, *SHUTTING_DOWN}


def test_states_are_computed_from_dates_not_labels(catalog: Catalog) -> None:
    """The same catalogue says current / deprecated / gone by the day it is asked on."""
    info = model(catalog, "gpt-image-1.5")
    assert info.state_on(dt.date(2026, 6, 1)) == Lifecycle.CURRENT
    assert info.state_on(dt.date(2026, 6, 2)) == Lifecycle.DEPRECATED
    assert info.state_on(NOV_30) == Lifecycle.DEPRECATED
    assert info.state_on(DEC_1) == Lifecycle.GONE
    assert set(catalog.usable(DEC_1)) == set(CURRENT)
    with clock.frozen(DEC_1):  # the one clock: `state` and `usable()` follow it
        assert info.state == Lifecycle.GONE
        assert "gpt-image-1.5" not in catalog.usable()
    with clock.frozen(NOV_30):
        assert info.state == Lifecycle.DEPRECATED


def test_shutdown_notices_name_date_replacement_and_straddling(catalog: Catalog) -> None:
    rows = {"gpt-image-1.5": 7, "gpt-image-2.5-flare": 3}
    (soon,) = shutdown_notices(catalog, rows, warn_days=30, today=NOV_30)
    assert (soon.model, soon.rows, soon.days_left, soon.straddles) == ("gpt-image-1.5", 7, 1, False)
    text = soon.text(batch_id=9)
    assert "2026-12-01 (tomorrow)" in text and "gpt-image-2.5-sunburst" in text
    assert "--model-map gpt-image-1.5=gpt-image-2.5-sunburst" in text
    assert "editbatch resume 9 --model-map" in text
    # Far from the shutdown: quiet, unless the batch would still run on the day.
    early = dt.date(2026, 10, 1)
    assert shutdown_notices(catalog, rows, warn_days=30, today=early) == []
    finish = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)
    (late,) = shutdown_notices(catalog, rows, warn_days=30, today=early, finish=finish)
    assert late.straddles and "straddle the shutdown" in late.text()
    # Gone models are preflight's business (rows refused), not a warning.
    assert shutdown_notices(catalog, rows, warn_days=30, today=DEC_1) == []


def test_every_model_names_its_source(catalog: Catalog) -> None:
    for info in catalog:
        assert info.source and info.source != "built-in catalogue", info.name


@pytest.mark.parametrize(
    ("name", "day", "replacement_prefix"),
    [
        ("gpt-image-1", dt.date(2026, 10, 23), "gpt-image-2.5-"),
        ("dall-e-2", dt.date(2026, 5, 12), "gpt-image-"),
        ("dall-e-3", dt.date(2026, 5, 12), "gpt-image-"),
    ],
)
def test_gone_models(catalog: Catalog, name: str, day: dt.date, replacement_prefix: str) -> None:
    info = model(catalog, name)
    assert info.state_on(NOV_30) == Lifecycle.GONE and info.shutdown_on == day
    assert info.replacement is not None and info.replacement.startswith(replacement_prefix)
    assert info.replacement in catalog.current(NOV_30)
    assert f"shut down on {day}" in info.gone_reason()


def test_common_limits(catalog: Catalog) -> None:
    for name in catalog.usable(NOV_30):
        info = model(catalog, name)
        assert (info.max_images, info.max_prompt_chars, info.max_n) == (16, 32_000, 10)
        assert info.output_formats == ("png", "webp", "jpeg")
        assert info.mask
        assert "auto" in info.sizes


def test_input_fidelity(catalog: Catalog) -> None:
    assert model(catalog, "gpt-image-1.5").input_fidelity == ("high", "low")
    assert model(catalog, "gpt-image-1-mini").input_fidelity == ("low",)
    assert model(catalog, "gpt-image-2").input_fidelity == ()
    assert model(catalog, "gpt-image-2-2026-04-21").input_fidelity == ()


def test_qualities_and_markup_on_25_models_only(catalog: Catalog) -> None:
    for name in catalog.usable(NOV_30):
        info = model(catalog, name)
        extra = {"xhigh", "max"} <= set(info.qualities)
        assert extra == (name in TWO_FIVE), name
        assert info.markup == (name in TWO_FIVE), name
    assert set(catalog.with_markup()) == set(TWO_FIVE)


def test_transparent_background(catalog: Catalog) -> None:
    assert model(catalog, "gpt-image-1.5").transparent_background == "supported"
    assert model(catalog, "gpt-image-2").transparent_background == "preview"


def test_fixed_sizes(catalog: Catalog) -> None:
    info = model(catalog, "gpt-image-1.5")
    for size in ("1024x1024", "1536x1024", "1024x1536", "auto"):
        assert info.check_size(size) is None
    reason = info.check_size("1536x864")
    assert reason is not None and "use one of 1024x1024, 1536x1024, 1024x1536, auto" in reason


@pytest.mark.parametrize("name", FREE_SIZE)
@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("auto", None),
        ("1024x1024", None),
        ("1536x864", None),
        ("3840x2160", None),
        ("2160x3840", None),
        ("3072x1024", None),  # exactly 3:1
        ("1008x1000", "divisible by 16 (nearest: 1008x1008)"),
        ("4096x1024", "aspect ratio 4:1"),
        ("1024x4096", "aspect ratio 1:4"),
        ("3856x2160", "larger than the maximum 3840x2160"),
        ("2176x2176", "larger than the maximum"),
        ("0x1024", "zero"),
        ("wide", "give WIDTHxHEIGHT"),
    ],
)
def test_free_size_rule(catalog: Catalog, name: str, size: str, fragment: str | None) -> None:
    reason = model(catalog, name).check_size(size)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason and name in reason


def test_experimental_sizes_are_noted(catalog: Catalog) -> None:
    info = model(catalog, "gpt-image-2")
    assert info.size_note("2560x1440") is None
    assert info.size_note("1024x1024") is None
    note = info.size_note("3840x2160")
    assert note is not None and "experimental" in note
    assert info.size_note("4096x1024") is None  # refused, not experimental


def test_parse_size() -> None:
    assert parse_size("1536x864") == (1536, 864)
    assert parse_size(" 1024X1024 ") == (1024, 1024)
    assert parse_size("auto") is None
    assert parse_size("12x") is None


def test_default_catalogue_is_built_once() -> None:
    assert load_catalog() is load_catalog()


def test_override_merges_per_model_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        'as_of = "2026-12-01"\n'
        'source = "our account manager"\n'
        '[models."gpt-image-1.5"]\n'
        'qualities = ["low", "high"]\n'
        'source = "tested 2026-12-01"\n'
        '[models."gpt-image-2"]\n'
        "size_rule = { max_long_side = 4096 }\n"
        '[models."gpt-image-3"]\n'
        "markup = true\n"
        'source = "preview invite"\n'
    )
    catalog = load_catalog(path)
    assert catalog.as_of.startswith("2026-12-01")
    changed = model(catalog, "gpt-image-1.5")
    assert changed.qualities == ("low", "high")
    assert changed.input_fidelity == ("high", "low")  # untouched keys stay
    assert changed.source == "tested 2026-12-01"
    assert model(catalog, "gpt-image-2").check_size("4096x2160") is None
    assert model(catalog, "gpt-image-2").check_size("1000x1000") is not None
    new = model(catalog, "gpt-image-3")
    assert new.markup and new.max_n == 10 and new.state_on(NOV_30) == Lifecycle.CURRENT
    assert load_catalog().get("gpt-image-3") is None  # the built-in one is not touched


def test_override_can_date_a_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        '[models."gpt-image-2"]\n'
        "deprecated_on = 2027-01-01\nshutdown_on = 2027-01-31\n"
        'replacement = "gpt-image-2.5-flare"\n'
    )
    info = model(load_catalog(path), "gpt-image-2")
    assert info.state_on(NOV_30) == Lifecycle.CURRENT
    assert info.state_on(dt.date(2027, 1, 31)) == Lifecycle.GONE


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models."x"]\nqualites = ["low"]\n', "unknown key(s) qualites"),
        ('[models."x"]\nlifecycle = "retired"\n', "shutdown_on = YYYY-MM-DD"),
        ('[models."x"]\nshutdown_on = "soon"\n', "a date (YYYY-MM-DD)"),
        ('[models."x"]\ndeprecated_on = 2027-02-01\nshutdown_on = 2027-01-01\n', "is after"),
        ('[models."x"]\nmax_n = "ten"\n', "max_n"),
        ('[models."x"]\nsizes = ["big"]\n', "sizes"),
        ('[models."x"]\nsize_rule = { multipel = 16 }\n', "unknown size_rule key"),
        ("[defaults]\nmax_n = 4\n", "[defaults]"),
        ("modles = 1\n", "unknown top-level key"),
        ("not toml at all = = =\n", "not valid TOML"),
    ],
)
def test_bad_override_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="catalogue file not found"):
        load_catalog(tmp_path / "nope.toml")
