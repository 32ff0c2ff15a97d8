from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.cost.pricing import Usage, load_prices
from pipeline.errors import ConfigError


def test_cost_exact_decimal() -> None:
    table = load_prices()
    usage = Usage(text_input=13, image_input=323, image_output=1056)
    # gpt-image-1.5: 5 / 8 / 32 USD per 1M tokens
    expected = (Decimal(13 * 5) + Decimal(323 * 8) + Decimal(1056 * 32)) / Decimal(1_000_000)
    assert table.cost("gpt-image-1.5", usage) == expected.quantize(Decimal("0.000001"))


def test_sum_has_no_float_drift() -> None:
    table = load_prices()
    usage = Usage(text_input=7, image_input=65, image_output=272)
    one = table.cost("gpt-image-1-mini", usage)
    assert one is not None
    assert sum([one] * 100_000, Decimal(0)) == one * 100_000


def test_cached_tokens_use_cached_price() -> None:
    table = load_prices()
    full = table.cost("gpt-image-2.6-sunburst", Usage(image_input=1000))
    cached = table.cost("gpt-image-2.6-sunburst", Usage(image_input=1000, cached_image_input=1000))
    assert full == Decimal("0.008000")
    assert cached == Decimal("0.002000")


def test_unknown_model_is_unpriced_not_zero() -> None:
    assert load_prices().cost("gpt-image-9", Usage(image_output=100)) is None


def test_override_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(
        'as_of = "2027-01-01"\n[models."gpt-image-9"]\n'
        'text_input = "1"\nimage_input = "2"\nimage_output = "3"\n'
    )
    table = load_prices(f)
    assert table.cost("gpt-image-9", Usage(image_output=1_000_000)) == Decimal("3.000000")
    assert table.get("gpt-image-1.5") is not None
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."m"]\ntext_input = "x"\nimage_input = "1"\nimage_output = "1"\n')
    with pytest.raises(ConfigError, match="not a number"):
        load_prices(bad)


def test_batch_prices_are_the_sync_prices_times_the_dated_factor() -> None:
    """The [batch] table of prices.toml: 0.5, with its date and source, beside the sync prices."""
    from pipeline.cost.pricing import load_prices

    sync = load_prices()
    batch = sync.for_route("batch")
    assert sync.batch.factor == Decimal("0.5") and sync.batch.as_of == "2026-11-30"
    assert "Batch API" in sync.batch.source
    assert sync.for_route("sync") is sync and batch.for_route("batch") is batch
    for name, price in sync.models.items():
        assert batch.models[name].image_output == price.image_output / 2
        assert "Batch API" in batch.models[name].source


def test_a_line_at_batch_prices_is_kept_exactly_and_sums_to_the_bill() -> None:
    """tokens x half a price can have 9 decimal places: exact_cost keeps them, so 50,000 lines
    add up to what the provider bills; rounding each line would drift by up to $0.025."""
    from pipeline.cost.pricing import Usage, load_prices

    batch = load_prices().for_route("batch")
    usage = Usage(text_input=3, image_input=1, image_output=0)  # mini: 3 x 1.00 + 1 x 1.25
    exact = batch.exact_cost("gpt-image-1-mini", usage)
    assert exact == Decimal("0.00000425")
    assert exact * 50_000 == Decimal("0.2125")
    assert batch.cost("gpt-image-1-mini", usage) == Decimal("0.000004")  # rounded: display


def test_a_price_file_can_change_the_batch_factor(tmp_path: Path) -> None:
    from pipeline.cost.pricing import load_prices

    path = tmp_path / "p.toml"
    path.write_text('[batch]\nfactor = "0.4"\nas_of = "2027-01-01"\nsource = "contract"\n')
    table = load_prices(path)
    assert (table.batch.factor, table.batch.as_of) == (Decimal("0.4"), "2027-01-01")
    bad = tmp_path / "bad.toml"
    bad.write_text('[batch]\nfactor = "1.5"\n')
    with pytest.raises(ConfigError, match="factor"):
        load_prices(bad)
