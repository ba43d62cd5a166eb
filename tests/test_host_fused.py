"""Host FFN layers in one native call (`host_compute.fused`): the kernel against the three kernels it
replaces, which forwards are recognized as gated FFNs (and which are not), and the engine's decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import decode_logits, greedy, relative, wide_llama
from torch import nn

import torus_plugins as tp
from torus_plugins.host_compute import native
from torus_plugins.host_compute.fused import FUSED_BOUND, GatedFFN, recognize
from torus_plugins.host_compute.kernels import HostLinearMode, HostWeight, stored_weight
from torus_plugins.host_compute.twin import host_twin
from torus_plugins.quant import quantize

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=str(native.unavailable()))

TORCH_ACT = {
    "silu": F.silu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "gelu": F.gelu,
}


def host_weight(shape: tuple[int, int], quant: str, seed: int) -> HostWeight:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5
    q, meta = quantize(w, quant, 32)
    hw = stored_weight(q, meta, quant, f"{quant}native", None, torch.float32)
    assert hw.kernel == f"{quant}native"
    return hw


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("act", sorted(native.ACTIVATIONS))
def test_one_call_equals_the_three_kernels_and_torch_activation(quant: str, act: str) -> None:
    # inter 40: two q4 work items, the last with one (padded) block; hidden 96 and 40 columns
    # give q8 activation groups of 32 and 8
    hidden, inter = 96, 40 if quant == "int8" else 48
    g, u = host_weight((inter, hidden), quant, 0), host_weight((inter, hidden), quant, 1)
    d = host_weight((hidden, inter), quant, 2)
    fused = GatedFFN(g, u, d, act, torch.float32)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(5)) * torch.tensor([1e-3, 1.0, 30.0])[:, None]
    got = fused(x)
    want = d.linear(TORCH_ACT[act](g.linear(x)) * u.linear(x))
    for a, b in zip(got, want):  # only the activation's libm vs vector-code ulps differ
        assert relative(a, b) < FUSED_BOUND[torch.float32]
    mats = fused._mats
    # the portable C path rounds as the VNNI one, whatever the thread count
    assert torch.equal(native.gated(x, *mats, act, vnni=False), got)
    assert torch.equal(native.gated(x, *mats, act, threads=1), got)
    # one token of a batch is that token alone (scratch and work items are per call)
    assert torch.equal(fused(x[1:2]), got[1:2])


class Gated(nn.Module):
    """A gated FFN whose forward each case below writes differently."""

    def __init__(self, forward, hidden: int = 64, inter: int = 96, bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=bias)
        self.up = nn.Linear(hidden, inter, bias=bias)
        self.down = nn.Linear(inter, hidden, bias=bias)
        self._fwd = forward

    def forward(self, x):
        return self._fwd(self, x)


def host_copy(module: nn.Module, quant: str = "int4", hidden: int = 64):
    """The engine's set-up for one host layer: a twin whose weights compute through native kernels."""
    params = [module.gate.weight, module.up.weight, module.down.weight]
    twin, fresh = host_twin(module, params)
    weights = {}
    for p, f in zip(params, fresh):
        q, meta = quantize(p.detach(), quant, 32)
        hw = stored_weight(q, meta, quant, f"{quant}native", None, torch.float32)
        f.data = torch.zeros(()).expand(hw.shape)
        weights[id(f)] = hw
    for name in ("gate", "up", "down"):  # biases (when any) as loaded
        b = getattr(module, name).bias
        if b is not None:
            getattr(twin, name).bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return twin, HostLinearMode(weights)


GATED_FORWARDS = {
    "silu": (lambda m, x: m.down(F.silu(m.gate(x)) * m.up(x)), "silu"),
    "up first, product reversed": (lambda m, x: m.down(m.up(x) * F.silu(m.gate(x))), "silu"),
    "gelu tanh": (lambda m, x: m.down(F.gelu(m.gate(x), approximate="tanh") * m.up(x)), "gelu_tanh"),
    "gelu": (lambda m, x: m.down(F.gelu(m.gate(x)) * m.up(x)), "gelu"),
}
NOT_GATED = {
    "no activation": lambda m, x: m.down(m.gate(x) * m.up(x)),
    "relu": lambda m, x: m.down(F.relu(m.gate(x)) * m.up(x)),
    "a sum, not a product": lambda m, x: m.down(F.silu(m.gate(x)) + m.up(x)),
    "scaled output": lambda m, x: m.down(F.silu(m.gate(x)) * m.up(x)) * 2,
    "scaled input": lambda m, x: m.down(F.silu(m.gate(x * 2)) * m.up(x)),
    "activation on up too": lambda m, x: m.down(F.silu(m.gate(x)) * F.silu(m.up(x))),
    "gate squared": lambda m, x: m.down(F.silu(m.gate(x)) * m.gate(x)),
    "in place activation": lambda m, x: m.down(F.silu(m.gate(x), inplace=True) * m.up(x)),
}


@pytest.mark.parametrize("case", sorted(GATED_FORWARDS))
def test_gated_forwards_are_recognized_and_fused_within_the_bound(case: str) -> None:
    torch.manual_seed(0)
    fwd, act = GATED_FORWARDS[case]
    twin, mode = host_copy(Gated(fwd))
    fused = recognize(twin, mode, 64, torch.float32)
    assert fused is not None and fused.act == act
    x = torch.randn(2, 64)
    with torch.no_grad(), mode:
        want = twin(x)
    assert relative(fused(x), want) < FUSED_BOUND[torch.float32]


@pytest.mark.parametrize("case", sorted(NOT_GATED))
def test_other_forwards_keep_the_twin_path(case: str) -> None:
    torch.manual_seed(0)
    twin, mode = host_copy(Gated(NOT_GATED[case]))
    assert recognize(twin, mode, 64, torch.float32) is None


def test_biases_fp16_models_and_pytorch_kernels_keep_the_twin_path() -> None:
    torch.manual_seed(0)
    fwd = GATED_FORWARDS["silu"][0]
    twin, mode = host_copy(Gated(fwd, bias=True))
    assert recognize(twin, mode, 64, torch.float32) is None
    twin, mode = host_copy(Gated(fwd))
    assert recognize(twin, mode, 64, torch.bfloat16) is None  # fp32 host weights in a bf16 model: not its FFN
    assert recognize(twin, mode, 64, torch.float16) is None  # fp16 models keep the twin path
    assert recognize(twin, None, 64, torch.float32) is None  # weights as loaded: no native kernel


def test_transformers_mlps_are_recognized() -> None:
    from transformers import GemmaConfig, LlamaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cases = [
        (LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="silu")), "silu"),
        (
            GemmaMLP(GemmaConfig(hidden_size=64, intermediate_size=96, hidden_activation="gelu_pytorch_tanh")),
            "gelu_tanh",
        ),
    ]
    for mlp, act in cases:
        mlp.gate, mlp.up, mlp.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        twin, mode = host_copy(mlp)
        fused = recognize(twin, mode, 64, torch.float32)
        assert fused is not None and fused.act == act, type(mlp).__name__


# fp32 weights as loaded have no native kernel (PyTorch's fp32 GEMV is memory-bound): nothing fuses
FUSED_MODELS = [("int4", torch.float32), ("int8", torch.float32), ("int4", torch.bfloat16), (None, torch.bfloat16)]


@pytest.mark.parametrize(("quant", "dtype"), FUSED_MODELS)
def test_fused_decode_matches_the_twin_path(quant: str | None, dtype: torch.dtype) -> None:
    """A whole model's decode through the fused layers against the same engine with each layer's
    fusion taken away (its twin path): logits within the bound, the same greedy tokens."""
    model = wide_llama().to(dtype)
    engine = tp.attach(
        model,
        transport="copy",
        resident_layers=0,
        weight_quant=quant,
        host_compute="auto",
        host_share=0.5,  # split layers: the host share is the last neurons of each layer
        host_max_tokens=1,
        host_kernel="native",
    )
    host = engine.host
    assert host.fused == sorted(host.layers) and host.fused
    tokens, logits = greedy(model), decode_logits(model)
    assert engine.stats().host_calls > 0
    saved = {i: hl.fused for i, hl in host.layers.items()}
    for hl in host.layers.values():
        hl.fused = None
    try:
        ref_tokens, ref_logits = greedy(model), decode_logits(model)
    finally:
        for i, hl in host.layers.items():
            hl.fused = saved[i]
    assert torch.equal(tokens, ref_tokens)
    assert relative(logits, ref_logits) <= FUSED_BOUND[dtype]
    tp.detach(model)
