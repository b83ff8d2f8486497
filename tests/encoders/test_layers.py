"""--layers: reading the choice, and how a store records it."""

import pytest

from ser_cache.encoders.layers import (
    LayersError,
    describe,
    has_layer_axis,
    layer_setting,
    parse_layers,
    stored_layers,
)


@pytest.mark.parametrize(("spec", "n", "expected"), [
    ("all", 4, (0, 1, 2, 3)),
    ("last", 25, (24,)),
    ("6,12,18,24", 25, (6, 12, 18, 24)),
    ("8-10", 25, (8, 9, 10)),
    (" 0, 4-5 ,4 ", 7, (0, 4, 5)),
    ("ALL", 2, (0, 1)),
])
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize(("spec", "needle"), [
    ("25", "0-24"),
    ("3-x", "not a layer index"),
    ("9-4", "runs backwards"),
    ("", "not a layer index"),
    ("-1", "not a layer index"),
])
def test_parse_layers_refuses(spec, needle):
    with pytest.raises(LayersError, match=needle) as err:
        parse_layers(spec, 25, option="--layers")
    assert "--layers" in str(err.value)


def test_setting_round_trip():
    assert layer_setting([24], 25) == "last"
    assert layer_setting(range(25), 25) == "all"
    assert layer_setting([12], 25) == 12
    assert layer_setting([18, 6, 12, 6], 25) == [6, 12, 18]
    for setting, axis in (("last", False), (12, False), ("all", True), ([6, 12], True)):
        assert has_layer_axis(setting) is axis
    assert stored_layers("all", axis_length=3) == (0, 1, 2)
    assert stored_layers([6, 12], 25) == (6, 12)
    assert stored_layers("last", 25) is None and stored_layers(12, 25) is None
    assert describe("all", 25) == "all 25" and describe([6, 12]) == "6,12" and describe(7) == "7"
