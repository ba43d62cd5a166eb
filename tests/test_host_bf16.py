"""bf16 weights on the host: the native bf16 kernel (`native.bf16_linear`) against PyTorch's bf16
linear and exact arithmetic, the fused bf16 FFN against its twin path, and bf16 models whose FFN
layers compute on the host against the unwrapped model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, decode_logits, greedy, relative, wide_llama

import torus_plugins as tp
from torus_plugins.config import TorusConfig
from torus_plugins.host_compute import native
from torus_plugins.host_compute.fused import FUSED_BOUND, GatedFFN
from torus_plugins.host_compute.kernels import raw_weight, stored_weight
from torus_plugins.host_compute.placement import choose_kernel, tolerance
from torus_plugins.host_compute.probe import candidates
from torus_plugins.quant import quantize

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=str(native.unavailable()))


def sum_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fp32 sum's rounding bound: lane sums of K/16 multiply-adds, then a 4-level tree."""
    terms = -(-w.shape[1] // 16) + 4
    return terms * 2.0**-24 * (x.double().abs() @ w.double().abs().T)


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value (8 significant bits)."""
    exp = torch.floor(torch.log2(v.double().abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exp - 7)


# (rows, cols): rows not a multiple of 4 or 16 (the kernel's row groups and work items), columns not
# a multiple of 16 (the masked tail), and SmolLM2's gate shape
SHAPES = [(1536, 576), (37, 100), (5, 7), (16, 16), (64, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_kernel_is_pytorchs_arithmetic_up_to_the_order_of_the_sum(shape: tuple[int, int]) -> None:
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w = (torch.randn(rows, cols, generator=gen) / cols**0.5).bfloat16()
    scale = torch.tensor([1e-3, 1.0, 30.0])[:, None]
    x = (torch.randn(3, cols, generator=gen) * scale).bfloat16()
    got = native.bf16_linear(x, w)
    exact = x.double() @ w.double().T  # bf16 products are exact: only the sum rounds
    assert got.dtype == torch.float32 and got.shape == (3, rows)
    assert ((got.double() - exact).abs() <= sum_bound(x, w)).all()
    # rounded to bf16 as the model's linear rounds it: PyTorch's result, or one bf16 ulp beside it
    # where the two fp32 sums fall on either side of a rounding boundary
    ref = F.linear(x, w)
    assert ((got.bfloat16().double() - ref.double()).abs() <= bf16_ulp(ref) + 2 * sum_bound(x, w)).all()
    # the portable C path sums in the same order as the AVX-512 one, whatever the thread count
    assert torch.equal(native.bf16_linear(x, w, vnni=False), got)
    assert torch.equal(native.bf16_linear(x, w, threads=1), got)
    assert torch.equal(native.bf16_linear(x[1:2], w), got[1:2])  # a token of a batch is that token alone


def test_bf16_kernel_reads_a_column_share_in_place() -> None:
    """A split layer's down projection keeps its last columns: a view with the stored row stride."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 96, generator=gen).bfloat16()
    view = w[:, 32:]
    x = torch.randn(2, 64, generator=gen).bfloat16()
    hw = raw_weight(view, "bf16native")
    assert hw.kernel == "bf16native" and hw.tensors[0].data_ptr() == view.data_ptr()  # no copy
    assert torch.equal(native.bf16_linear(x, view), native.bf16_linear(x, view.contiguous()))
    assert torch.equal(hw.linear(x), native.bf16_linear(x, view).bfloat16())


def test_bf16_kernel_refuses_what_it_cannot_read() -> None:
    x = torch.randn(1, 8)
    for bad in (torch.randn(4, 8), torch.randn(8, 4).bfloat16().T, torch.randn(8).bfloat16()):
        with pytest.raises(ValueError, match="2-D bf16 CPU matrix with adjacent columns"):
            native.bf16_linear(x, bad)
        with pytest.raises(ValueError, match="2-D bf16 CPU matrix"):
            raw_weight(bad, "bf16native")


def bf16_weights(hidden: int, inter: int, kernel: str) -> list:
    gen = torch.Generator().manual_seed(7)
    ws = [
        (torch.randn(s, generator=gen) / s[1] ** 0.5).bfloat16()
        for s in ((inter, hidden), (inter, hidden), (hidden, inter))
    ]
    if kernel == "bf16native":
        return [raw_weight(w, "bf16native") for w in ws]
    quant = kernel.removesuffix("native")
    out = []
    for w in ws:
        q, meta = quantize(w.float(), quant, 32)
        out.append(stored_weight(q, meta, quant, kernel, None, torch.bfloat16))
    return out


TORCH_ACT = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "gelu": F.gelu}


@pytest.mark.parametrize("kernel", ["bf16native", "int4native", "int8native"])
@pytest.mark.parametrize("act", sorted(native.ACTIVATIONS))
def test_fused_bf16_ffn_rounds_between_ops_as_the_model_does(kernel: str, act: str) -> None:
    hidden, inter = 96, 64
    g, u, d = bf16_weights(hidden, inter, kernel)
    fused = GatedFFN(g, u, d, act, torch.bfloat16)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(5)) * torch.tensor([1e-2, 1.0, 8.0])[:, None]
    x = x.bfloat16()
    got = fused(x)
    # the twin path: each linear's output rounded to bf16, the activation and the product in bf16
    want = d.linear(TORCH_ACT[act](g.linear(x)) * u.linear(x))
    assert got.dtype == want.dtype == torch.bfloat16
    for a, b in zip(got, want):  # only the activation's libm vs vector-code ulps differ
        assert relative(a, b) <= FUSED_BOUND[torch.bfloat16]
    # without the rounding between ops the result is not the model's: the flag is what matches it
    unrounded = native.gated(x.float(), *fused._mats, act).bfloat16()
    assert not torch.equal(unrounded, want)
    assert torch.equal(native.gated(x, *fused._mats, act, vnni=False, round_bf16=True).bfloat16(), got)
    assert torch.equal(native.gated(x, *fused._mats, act, threads=1, round_bf16=True).bfloat16(), got)


def test_bf16_models_choose_the_native_kernel_by_config_and_probe() -> None:
    assert [k for k, _ in candidates(torch.bfloat16, None)] == ["bf16native", "raw"]
    assert [k for k, _ in candidates(torch.float32, None)] == ["raw"]
    native_cfg = TorusConfig(host_compute="all", host_kernel="native")
    assert choose_kernel(native_cfg, None, torch.bfloat16) == ("bf16native", None)
    assert choose_kernel(native_cfg, None, torch.float32) == ("raw", None)  # fp32 GEMV: PyTorch's
    assert choose_kernel(TorusConfig(host_compute="all", host_kernel="packed"), None, torch.bfloat16) == ("raw", None)


@pytest.mark.parametrize("split", [False, True])
def test_bf16_model_on_the_host_matches_the_unwrapped_model(split: bool) -> None:
    model = wide_llama().to(torch.bfloat16)
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    layout = dict(host_compute="auto", host_share=0.5) if split else dict(host_compute="all")
    engine = tp.attach(model, transport="copy", resident_layers=0, host_max_tokens=1, host_kernel="native", **layout)
    assert engine.host_plan.kernel == "bf16native"
    assert engine.host.fused == sorted(engine.host.layers) and not engine.host.refused
    logits = decode_logits(model)
    engine.reset_stats()
    assert torch.equal(greedy(model), ref_tokens)
    assert engine.stats().host_calls > 0
    # bf16 roundings of sums taken in another order (and, split, the two shares' sum)
    assert relative(logits, ref_logits) < tolerance(torch.bfloat16, None)
    tp.detach(model)


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "mixtral", "olmoe"])
def test_bf16_architectures_on_the_host(arch: str) -> None:
    """Other gated FFNs (Qwen2's, Gemma's tanh GELU) and MoE experts missing from the device cache
    (each expert's weights read in place by the bf16 kernel) in bf16, every FFN on the host."""
    model = build_tiny(arch).to(torch.bfloat16)
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    moe = arch in ("mixtral", "olmoe")
    extra = {"moe_cache_experts": 8} if moe else {"resident_layers": 0}
    engine = tp.attach(model, transport="copy", host_compute="all", host_max_tokens=1, host_kernel="native", **extra)
    assert engine.host_plan.kernel == "bf16native"
    if moe:
        assert engine.experts._host_mode is not None  # the experts' weights compute through the kernel
        assert all(w.kernel == "bf16native" for w in engine.experts._host_mode.weights.values())
    assert relative(decode_logits(model), ref_logits) < tolerance(torch.bfloat16, None)
    assert torch.equal(greedy(model), ref_tokens)
    s = engine.stats()
    assert s.host_calls > 0
    if moe:
        assert sum(layer.host_computed for layer in s.experts.layers) > 0
    tp.detach(model)
