"""The residency plan: what stays on the device, what streams, the ring size, and the minimum."""

from __future__ import annotations

import pytest
import torch

import torus_plugins
from torus_plugins import BudgetTooSmallError, ConfigError, TorusConfig
from torus_plugins.planning.residency import ResidencyPlan, plan_residency, spread
from torus_plugins.plugins import build_plugin_manager

NON_FFN = 1_000
KV = 50
UNIFORM = [100] * 8
MIXED = [100, 300, 120, 80, 250, 90, 60, 200, 150]


def _total(plan: ResidencyPlan, layer_bytes: list[int]) -> int:
    return plan.device_bytes(layer_bytes) + plan.kv_reserve_bytes


def _fits(plan: ResidencyPlan, layer_bytes: list[int], budget: int) -> bool:
    return _total(plan, layer_bytes) <= budget


def _minimum(layer_bytes: list[int], lookahead: int, non_ffn: int = NON_FFN, kv: int = KV) -> int:
    """Stream everything: non-FFN + KV reserve + ring of min(lookahead+1, n) × largest layer."""
    return non_ffn + kv + min(lookahead + 1, len(layer_bytes)) * max(layer_bytes)


def _check_shape(plan: ResidencyPlan, layer_bytes: list[int], lookahead: int) -> None:
    n = len(layer_bytes)
    assert set(plan.resident) | set(plan.streamed) == set(range(n))
    assert not set(plan.resident) & set(plan.streamed)
    assert list(plan.streamed) == sorted(plan.streamed)
    assert plan.resident == spread(len(plan.resident), n)
    assert plan.n_slots == min(lookahead + 1, len(plan.streamed))
    assert plan.slot_bytes == max((layer_bytes[i] for i in plan.streamed), default=0)
    assert plan.ring_bytes == plan.n_slots * plan.slot_bytes


# ---------------------------------------------------------------- the easy cases
@pytest.mark.parametrize("layer_bytes", [UNIFORM, MIXED, [7]])
def test_no_budget_keeps_everything_resident(layer_bytes):
    plan = plan_residency(layer_bytes, NON_FFN, KV, None, lookahead=2)
    assert plan.resident == tuple(range(len(layer_bytes)))
    assert plan.streamed == ()
    assert plan.n_slots == 0 and plan.slot_bytes == 0 and plan.ring_bytes == 0
    assert plan.budget_bytes is None
    assert plan.device_bytes(layer_bytes) == NON_FFN + sum(layer_bytes)


@pytest.mark.parametrize("layer_bytes", [UNIFORM, MIXED])
@pytest.mark.parametrize("slack", [0, 1, 10**9])
def test_a_budget_that_fits_everything_keeps_everything_resident(layer_bytes, slack):
    budget = NON_FFN + KV + sum(layer_bytes) + slack
    plan = plan_residency(layer_bytes, NON_FFN, KV, budget, lookahead=2)
    assert plan.resident == tuple(range(len(layer_bytes)))
    assert plan.streamed == () and plan.n_slots == 0
    assert _total(plan, layer_bytes) == NON_FFN + KV + sum(layer_bytes)


# ---------------------------------------------------------------- budgets that force streaming
def _smallest_plan(layer_bytes: list[int], lookahead: int) -> int:
    """Device bytes (KV included) of the smallest plan any resident count gives."""
    return min(
        _total(plan_residency(layer_bytes, NON_FFN, KV, None, lookahead, resident_layers=k), layer_bytes)
        for k in range(len(layer_bytes) + 1)
    )


def _budgets(layer_bytes: list[int], lookahead: int) -> list[int]:
    """Budgets from the smallest workable one up to one byte short of full residency."""
    lo = _smallest_plan(layer_bytes, lookahead)
    hi = NON_FFN + KV + sum(layer_bytes)
    assert lo < hi
    return sorted({lo, lo + 1, lo + (hi - lo) // 3, lo + (hi - lo) // 2, lo + 2 * (hi - lo) // 3, hi - 1})


@pytest.mark.parametrize(
    "layer_bytes, lookahead",
    [(UNIFORM, 1), (UNIFORM, 2), (UNIFORM, 4), (MIXED, 1), (MIXED, 2)],
    ids=["uniform-1", "uniform-2", "uniform-4", "mixed-1", "mixed-2"],
)
def test_streaming_plan_is_the_largest_that_fits(layer_bytes, lookahead):
    n = len(layer_bytes)
    saw_streaming = False
    for budget in _budgets(layer_bytes, lookahead):
        plan = plan_residency(layer_bytes, NON_FFN, KV, budget, lookahead)
        _check_shape(plan, layer_bytes, lookahead)
        assert _fits(plan, layer_bytes, budget), budget
        assert plan.budget_bytes == budget and plan.kv_reserve_bytes == KV and plan.non_ffn_bytes == NON_FFN
        saw_streaming |= bool(plan.streamed)
        k = len(plan.resident)
        # Maximal: no plan keeping more layers resident fits this budget.
        for more in range(k + 1, n + 1):
            bigger = plan_residency(layer_bytes, NON_FFN, KV, budget, lookahead, resident_layers=more)
            assert not _fits(bigger, layer_bytes, budget), (budget, k, more)
    assert saw_streaming


def test_worked_example_mixed_sizes():
    # 9 layers, lookahead 2. Budget 1000 + 50 + 4 resident + a 3-slot ring.
    layer_bytes = MIXED
    budget = 2_100
    plan = plan_residency(layer_bytes, NON_FFN, KV, budget, lookahead=2)
    # spread(k, 9) picks these layers; the rest stream and the ring is sized for the largest.
    assert plan.resident == spread(len(plan.resident), 9)
    streamed_max = max(layer_bytes[i] for i in plan.streamed)
    assert plan.slot_bytes == streamed_max
    assert plan.n_slots == 3
    assert _total(plan, layer_bytes) <= budget
    one_more = plan_residency(layer_bytes, NON_FFN, KV, budget, 2, resident_layers=len(plan.resident) + 1)
    assert _total(one_more, layer_bytes) > budget


def test_ring_is_capped_by_the_number_of_streamed_layers():
    # 8 layers, 7 resident: a single streamed layer needs a single slot whatever the lookahead.
    plan = plan_residency(UNIFORM, NON_FFN, KV, None, lookahead=4, resident_layers=7)
    assert len(plan.streamed) == 1 and plan.n_slots == 1
    plan = plan_residency(UNIFORM, NON_FFN, KV, None, lookahead=4, resident_layers=6)
    assert len(plan.streamed) == 2 and plan.n_slots == 2
    plan = plan_residency(UNIFORM, NON_FFN, KV, None, lookahead=4, resident_layers=0)
    assert len(plan.streamed) == 8 and plan.n_slots == 5


def test_a_large_layer_that_streams_sizes_every_slot():
    layer_bytes = [10, 10, 10, 500, 10, 10]
    plan = plan_residency(layer_bytes, 0, 0, None, lookahead=1, resident_layers=0)
    assert plan.slot_bytes == 500 and plan.ring_bytes == 1_000


# ---------------------------------------------------------------- resident_layers override
@pytest.mark.parametrize("k", [0, 1, 3, 7, 8])
def test_resident_layers_overrides_the_budget(k):
    # A budget far too small (and no budget at all) are both ignored by the override.
    for budget in (1, None, 10**12):
        plan = plan_residency(UNIFORM, NON_FFN, KV, budget, lookahead=2, resident_layers=k)
        assert plan.resident == spread(k, 8)
        assert len(plan.streamed) == 8 - k
        _check_shape(plan, UNIFORM, 2)


def test_resident_layers_above_the_layer_count_is_a_config_error():
    with pytest.raises(ConfigError, match="resident_layers=9.*only 8 FFN layers"):
        plan_residency(UNIFORM, NON_FFN, KV, None, lookahead=2, resident_layers=9)


# ---------------------------------------------------------------- too small
@pytest.mark.parametrize(
    "layer_bytes, lookahead",
    [
        (UNIFORM, 1),
        (UNIFORM, 2),
        (UNIFORM, 5),
        (UNIFORM, 20),
        (MIXED, 1),
        (MIXED, 2),
        ([4096], 1),
        ([4096], 5),
    ],
)
def test_too_small_budget_names_the_exact_minimum(layer_bytes, lookahead):
    minimum = _minimum(layer_bytes, lookahead)

    with pytest.raises(BudgetTooSmallError) as info:
        plan_residency(layer_bytes, NON_FFN, KV, minimum - 1, lookahead)
    err = info.value
    assert err.minimum_bytes == minimum
    message = str(err)
    assert f"({minimum} bytes)" in message
    assert f"{min(lookahead + 1, len(layer_bytes))} ×" in message
    for hint in ("vram_budget", "lookahead", "kv_reserve_tokens"):
        assert hint in message
    assert isinstance(err, ValueError)

    plan = plan_residency(layer_bytes, NON_FFN, KV, minimum, lookahead)  # exactly the minimum is enough
    assert _fits(plan, layer_bytes, minimum)
    _check_shape(plan, layer_bytes, lookahead)


def test_reported_minimum_is_the_smallest_accepted_budget_for_uneven_layers():
    layer_bytes, lookahead = MIXED, 5
    assert _smallest_plan(layer_bytes, lookahead) == 2_400
    with pytest.raises(BudgetTooSmallError) as info:
        plan_residency(layer_bytes, NON_FFN, KV, 2_000, lookahead)
    minimum = info.value.minimum_bytes
    plan_residency(layer_bytes, NON_FFN, KV, minimum, lookahead)  # accepted
    with pytest.raises(BudgetTooSmallError):
        plan_residency(layer_bytes, NON_FFN, KV, minimum - 1, lookahead)  # ...and one byte less is not


def test_budget_of_zero_is_too_small_not_unlimited():
    with pytest.raises(BudgetTooSmallError):
        plan_residency(UNIFORM, NON_FFN, KV, 0, lookahead=2)


# ---------------------------------------------------------------- spread
@pytest.mark.parametrize("n", range(1, 21))
def test_spread_properties(n):
    assert spread(0, n) == ()
    assert spread(-3, n) == ()
    assert spread(n, n) == tuple(range(n))
    assert spread(n + 5, n) == tuple(range(n))
    for k in range(1, n):
        picked = spread(k, n)
        assert len(picked) == k
        assert list(picked) == sorted(set(picked))
        assert all(0 <= i < n for i in picked)
        # Evenly spaced: consecutive gaps differ by at most one.
        gaps = [b - a for a, b in zip(picked, picked[1:])]
        if gaps:
            assert max(gaps) - min(gaps) <= 1
            assert n // k <= min(gaps) and max(gaps) <= -(-n // k)
    if n % 2 == 0:
        # Half resident: resident and streamed layers alternate.
        assert spread(n // 2, n) == tuple(range(1, n, 2))


# ---------------------------------------------------------------- end to end through attach
def _expected_minimum(model, kv_tokens: int, lookahead: int) -> int:
    cfg = model.config
    ffn = {id(p) for layer in model.model.layers for p in layer.mlp.parameters()}
    non_ffn, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in ffn or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        non_ffn += t.numel() * t.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32 K and V
    layer = sum(p.numel() * 4 for p in model.model.layers[0].mlp.parameters())
    assert layer == 3 * cfg.hidden_size * cfg.intermediate_size * 4
    return non_ffn + kv_per_token * kv_tokens + min(lookahead + 1, cfg.num_hidden_layers) * layer


def test_attach_with_a_too_small_budget_fails_and_leaves_the_model_unchanged(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
    snap = {n: (p, p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    minimum = _expected_minimum(model, kv_tokens=16, lookahead=1)
    config = TorusConfig(device="cpu", transport="copy", vram_budget=minimum - 1, kv_reserve_tokens=16, lookahead=1)

    with pytest.raises(BudgetTooSmallError) as info:
        torus_plugins.attach(model, config, plugin_manager=build_plugin_manager(autoload=False))

    assert info.value.minimum_bytes == minimum
    assert f"({minimum} bytes)" in str(info.value)
    assert not torus_plugins.is_attached(model)
    for name, p in model.named_parameters():
        orig, values, ptr = snap[name]
        assert p is orig and p.data_ptr() == ptr and torch.equal(p.detach(), values), name
    for mod in model.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)

    # Exactly the minimum is accepted, and everything that streams streams bit-exactly.
    engine = torus_plugins.attach(
        model, config.replace(vram_budget=minimum), plugin_manager=build_plugin_manager(autoload=False)
    )
    try:
        assert engine.plan.streamed
        assert engine.plan.device_bytes(engine.layer_bytes) + engine.plan.kv_reserve_bytes <= minimum
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    finally:
        torus_plugins.detach(model)
