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
