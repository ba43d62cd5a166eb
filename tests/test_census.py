"""The decode hot path by count (benchmarks/census.py): host syncs and dispatched ops per layer per
decode token are pinned here, so a change that adds a sync or a launch to the hot path fails CI.

Counts are exact on the CPU (the census counts dispatched ops and host reads, not time)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def census():
    sys.path.insert(0, str(BENCHMARKS))
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from harness import census

        yield census
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHMARKS))


MOE = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss")
#: MoE layers per model (DeepSeek-V3's first layer is dense)
MOE_LAYERS = {"deepseek_v3": 3}


@pytest.mark.parametrize("arch", MOE)
def test_moe_decode_syncs_once_per_layer_and_matches_plain(census, arch: str) -> None:
    """Streamed MoE at batch-1 decode: one host sync per MoE layer (the routed ids, with the
    predicted ones in the same read), ops within 1.3x the unwrapped grouped_mm model (1.15x without
    a predictor), logits equal to it bit for bit."""
    plain = census.measure(arch, "plain", repeats=1)
    assert plain.syncs == 0
    moe_layers = MOE_LAYERS.get(arch, 4)
    for mode, ratio in (("streamed", 1.15), ("streamed+pred", 1.3)):
        c = census.measure(arch, mode, repeats=1)
        assert c.syncs == moe_layers, (mode, c.sync_kinds)
        assert c.sync_kinds == {"Tensor.tolist": moe_layers}, mode
        assert c.ops <= ratio * plain.ops, (mode, c.ops, plain.ops)
        assert c.logits_equal_plain, (mode, c.max_abs_diff_plain)
        assert c.expert_misses > 0  # half the experts cached: the step loaded some


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_streamed_decode_has_no_sync(census, arch: str) -> None:
    plain = census.measure(arch, "plain", repeats=1)
    c = census.measure(arch, "streamed", repeats=1)
    assert c.syncs == 0 and plain.syncs == 0
    assert c.ops <= 1.2 * plain.ops
    assert c.logits_equal_plain


@pytest.mark.parametrize("mode", ["split", "host"])
def test_dense_host_layers_sync_once_per_layer(census, mode: str) -> None:
    """A split or whole host layer: its input reaches the host with one named wait
    (`staging.wait_host`), its result goes back without one; logits within the split's bound."""
    plain = census.measure("llama", "plain", repeats=1)
    c = census.measure("llama", mode, repeats=1)
    assert c.sync_kinds == {"staging.wait_host": 4}, c.sync_kinds
    assert c.ops <= 1.1 * plain.ops
    assert c.max_abs_diff_plain <= 1e-6


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3"])
def test_moe_host_placement_syncs_once_per_layer(census, arch: str) -> None:
    """Missed experts computed on the host: still one sync per MoE layer (the ids read, which also
    completes the host inputs' staged copies); the device share is one grouped call with the host
    experts left out; logits within the split's bound of plain grouped_mm."""
    plain = census.measure(arch, "plain", repeats=1)
    c = census.measure(arch, "host", repeats=1)
    moe_layers = MOE_LAYERS.get(arch, 4)
    assert c.sync_kinds == {"Tensor.tolist": moe_layers}, c.sync_kinds
    assert c.ops <= 1.3 * plain.ops, (c.ops, plain.ops)
    assert c.max_abs_diff_plain <= 1e-6


def test_quantized_landing_ops(census) -> None:
    """int8 lands in two ops (a view and one multiply into the compute buffer); int4 in one, the
    `torus::dequantize_int4_` kernel (the native dequantizer here); without the native library
    int4 takes the portable torch ops, 15 kernels plus views: pinned so neither creeps."""
    from torus_plugins import quant_native

    int8, int4 = census.landing_ops("int8"), census.landing_ops("int4")
    assert int8["ops"] == 2
    if quant_native.unavailable() is None:
        assert int4["ops_by_name"] == {"dequantize_int4_": 1}
    else:
        assert int4["kernels"] <= 15 and int4["ops"] <= 37


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_moe_decode_syncs_once_per_layer(census, quant: str) -> None:
    """Quantized experts: one sync per MoE layer, and ops within 1.15x plain grouped_mm (each
    missed expert's matrices land in one op for int4, two for int8; its slot's views are
    shared by every expert of that layout, not rebuilt per landing)."""
    plain = census.measure("olmoe", "plain", repeats=1)
    c = census.measure("olmoe", quant, repeats=1)
    assert c.syncs == 4, c.sync_kinds
    assert c.expert_misses > 0
    assert c.ops <= 1.15 * plain.ops, (c.ops, plain.ops)
