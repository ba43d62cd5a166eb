"""`parse_bytes` and `TorusConfig`: every accepted form, every rejected one, and `replace`."""

from __future__ import annotations

import dataclasses

import pytest

from torus_plugins import ConfigError, TorusConfig, parse_bytes
from torus_plugins.config import format_bytes


@pytest.mark.parametrize(
    "value, expected",
    [
        ("6GB", 6 * 10**9),
        ("6GiB", 6 * 2**30),
        ("6gb", 6 * 10**9),
        ("6 gib", 6 * 2**30),
        ("512 MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("  2 TB  ", 2 * 10**12),
        ("1TiB", 2**40),
        ("4KiB", 4096),
        ("4kb", 4000),
        ("100B", 100),
        ("2000000000", 2_000_000_000),
        ("0", 0),
        (0, 0),
        (6_000_000_000, 6_000_000_000),
        (123, 123),
    ],
)
def test_parse_bytes_accepted_forms(value, expected):
    result = parse_bytes(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value", ["6XB", "abc", -1, True, False, "", "   ", "-1GB", "1.5.5GB", "GB", "6 G B", None, [6]]
)
def test_parse_bytes_rejects_malformed_values_showing_accepted_forms(value):
    with pytest.raises(ConfigError) as info:
        parse_bytes(value, "vram_budget")
    message = str(info.value)
    assert message.startswith("vram_budget: ")
    assert repr(value) in message
    for form in ("'6GB'", "'6GiB'", "'512MiB'", "'2000000000'"):
        assert form in message


def test_config_error_is_a_value_error():
    # Callers that catch ValueError (argparse-style code) still see configuration mistakes.
    with pytest.raises(ValueError):
        parse_bytes("6XB")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_parse_bytes_rejects_non_finite_floats_with_config_error(value):
    try:
        parse_bytes(value)
    except ConfigError:
        return
    pytest.fail(f"parse_bytes({value!r}) was accepted")


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (6 * 2**30, "6.0 GiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# ---------------------------------------------------------------- TorusConfig
def test_defaults_are_valid():
    cfg = TorusConfig()
    assert cfg.vram_budget is None and cfg.budget_bytes is None
    assert cfg.lookahead >= 1
    assert cfg.transport == "auto" and cfg.prefetch == "sequential"


@pytest.mark.parametrize(
    "budget, expected",
    [("2GB", 2 * 10**9), ("2GiB", 2 * 2**30), ("512 MiB", 512 * 2**20), (12345, 12345), ("0", 0)],
)
def test_vram_budget_is_normalised_to_bytes(budget, expected):
    cfg = TorusConfig(vram_budget=budget)
    assert cfg.budget_bytes == expected
    assert cfg.vram_budget == expected  # readers of the field see bytes too


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"lookahead": 0}, "lookahead"),
        ({"lookahead": -1}, "lookahead"),
        ({"lookahead": 1.5}, "lookahead"),
        ({"lookahead": True}, "lookahead"),
        ({"lookahead": "2"}, "lookahead"),
        ({"resident_layers": -1}, "resident_layers"),
        ({"resident_layers": 2.0}, "resident_layers"),
        ({"kv_reserve_tokens": -1}, "kv_reserve_tokens"),
        ({"kv_reserve_tokens": 1.5}, "kv_reserve_tokens"),
        ({"transfer_timeout_s": 0}, "transfer_timeout_s"),
        ({"transfer_timeout_s": -3.0}, "transfer_timeout_s"),
        ({"transfer_timeout_s": "30"}, "transfer_timeout_s"),
        ({"transport": ""}, "transport"),
        ({"transport": None}, "transport"),
        ({"vram_budget": "6XB"}, "vram_budget"),
        ({"vram_budget": -5}, "vram_budget"),
        ({"vram_budget": True}, "vram_budget"),
    ],
)
def test_invalid_config_values_raise_config_error_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TorusConfig(**kwargs)


@pytest.mark.parametrize("field", ["resident_layers", "kv_reserve_tokens", "transfer_timeout_s"])
def test_bools_are_rejected_like_for_lookahead(field):
    with pytest.raises(ConfigError, match=field):
        TorusConfig(**{field: True})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lookahead": 1},
        {"resident_layers": 0},
        {"resident_layers": None},
        {"kv_reserve_tokens": 0},
        {"transfer_timeout_s": 0.001},
        {"transport": "my-plugin-transport"},
        {"device": "cpu", "pin_memory": False, "options": {"x": 1}},
    ],
)
def test_valid_edge_values_are_accepted(kwargs):
    cfg = TorusConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(cfg, key) == value


def test_config_is_frozen():
    cfg = TorusConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lookahead = 5  # type: ignore[misc]


def test_replace_returns_a_changed_copy_and_leaves_the_original():
    cfg = TorusConfig(vram_budget="2GB", lookahead=3, options={"a": 1})
    new = cfg.replace(lookahead=1, transport="copy")

    assert new is not cfg
    assert (new.lookahead, new.transport) == (1, "copy")
    assert new.budget_bytes == 2 * 10**9  # untouched fields carry over, still in bytes
    assert new.options == {"a": 1}
    assert (cfg.lookahead, cfg.transport) == (3, "auto")

    new.options["b"] = 2  # the copy's options dict is its own
    assert cfg.options == {"a": 1}


def test_replace_parses_and_validates_like_a_new_config():
    cfg = TorusConfig()
    assert cfg.replace(vram_budget="1.5GiB").budget_bytes == 3 * 2**29
    with pytest.raises(ConfigError, match="lookahead"):
        cfg.replace(lookahead=0)
    with pytest.raises(ConfigError, match="vram_budget"):
        cfg.replace(vram_budget="lots")
    with pytest.raises(TypeError):
        cfg.replace(no_such_field=1)


HUGE = ["1" + "0" * 400, "9" * 400 + "GB", 10**400, 2**61, 1e300]


@pytest.mark.parametrize("value", HUGE, ids=["digits", "digits-GB", "int", "2^61", "float"])
def test_absurdly_large_sizes_and_bandwidths_are_config_errors(value):
    from torus_plugins.config import parse_bandwidth

    with pytest.raises(ConfigError) as err:
        TorusConfig(vram_budget=value)
    assert len(str(err.value)) < 400  # the message never echoes megabytes of input
    with pytest.raises(ConfigError):
        parse_bandwidth(value if not isinstance(value, str) else value + "/s")


@pytest.mark.parametrize("value", [True, False, None, [1], {"a": 1}])
def test_bandwidth_rejects_non_numbers(value):
    from torus_plugins.config import parse_bandwidth

    with pytest.raises(ConfigError, match="bandwidth"):
        parse_bandwidth(value)


@pytest.mark.parametrize("options", [None, [1, 2], "x", {1: "a"}])
def test_options_must_be_a_dict_by_name(options):
    with pytest.raises(ConfigError, match="options must be a dict"):
        TorusConfig(options=options)
