"""A host-placed gated FFN computed in one native call, when its forward is proven to be one.

At one token a host layer's three kernels take less time than the Python around them: the twin's
module calls, `HostLinearMode`'s dispatch of every op, three ctypes calls and the elementwise ops
between them (SmolLM2's shapes, cold caches: ~210 µs through the twin, ~120 µs for the three
kernels and torch's silu * up, ~100 µs for `native.gated`, the whole FFN in one call).

Which modules qualify is not decided by their class name: `recognize` runs the twin once under a
recording mode and accepts exactly the dataflow `down(act(gate(x)) * up(x))` — three `linear`
calls on host weights with no bias, the input feeding gate and up, one supported activation
(`F.silu`, `F.gelu` with or without the tanh approximation) on gate's output, their product feeding
down, down's output returned. Any other op, order of data or keyword makes it None and the layer
keeps the twin path (still correct, only slower).

float32 and bf16 models (fp16 ones keep the twin path): a bf16 model's twin rounds gate's and up's
outputs, the activation's and the product to bf16, and so does the fused call (`round_bf16`). Bound:
gate, up and down round exactly as the unfused kernels; the activation is libm's, not PyTorch's
vector code, a few fp32 ulps apart — in fp32 that stays a few ulps; in bf16 it can flip the rounding
of an intermediate or an output by one bf16 ulp. `FUSED_BOUND` is what `recognize` checks on two
random inputs against the twin (relative to the largest output): a layer over it is not fused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .kernels import HostLinearMode, HostWeight

#: Fused vs the twin path, relative to the largest output, by the model's dtype. fp32: a few ulps of
#: the activation carried through down's input rounding (measured ~1e-7 on SmolLM2's layers). bf16:
#: an output one bf16 ulp (2^-8 of itself) off where the activation's ulps flip a rounding.
FUSED_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}

_BITS = {"int4native": 4, "int8native": 8, "bf16native": 16}


@dataclass
class GatedFFN:
    """One host layer's FFN as `native.gated` computes it."""

    gate: HostWeight
    up: HostWeight
    down: HostWeight
    act: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        # Built once: the structures hold the weights' pointers (the HostWeights keep them alive).
        self._mats = tuple(
            native.matrix(_BITS[w.kernel], w.tensors, w.shape[0], w.shape[1], w.group)
            for w in (self.gate, self.up, self.down)
        )
        self._call = native.bound_gated(*self._mats, self.act, round_bf16=self.dtype == torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._call(x.reshape(-1, x.shape[-1]))
        if self.dtype != torch.float32:
            y = y.to(self.dtype)
        return y.view(*x.shape[:-1], self.down.shape[0])


class _Recorder(HostLinearMode):
    """HostLinearMode that also writes down each op: (kind, input ids, output id)."""

    def __init__(self, weights: dict[int, HostWeight]) -> None:
        super().__init__(weights)
        self.ops: list[tuple[str, tuple[int, ...], int, Any]] = []
        self.keep: list[Any] = []  # ids stay unique while the record is read

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = super().__torch_function__(func, types, args, kwargs)
        kwargs = kwargs or {}
        self.keep += [out, *args]
        ids = tuple(id(a) for a in args if isinstance(a, torch.Tensor))
        if func is F.linear or func is torch._C._nn.linear:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            ok = bias is None and id(w) in self.weights and len(args) >= 2 and set(kwargs) <= {"bias"}
            self.ops.append(("linear" if ok else "other", (id(args[0]),), id(out), self.weights.get(id(w))))
        elif func is F.silu and not kwargs.get("inplace", False) and len(args) == 1:
            self.ops.append(("silu", ids, id(out), None))
        elif func in (F.gelu, torch._C._nn.gelu) and len(args) == 1 and set(kwargs) <= {"approximate"}:
            approx = kwargs.get("approximate", "none")
            name = {"tanh": "gelu_tanh", "none": "gelu"}.get(approx, "other")
            self.ops.append((name, ids, id(out), None))
        elif func in (torch.Tensor.mul, torch.Tensor.__mul__, torch.mul) and len(ids) == 2 and not kwargs:
            self.ops.append(("mul", ids, id(out), None))
        else:
            self.ops.append(("other", ids, id(out), getattr(func, "__name__", str(func))))
        return out


def _match(ops: list, x_id: int, out_id: int) -> tuple[HostWeight, HostWeight, HostWeight, str] | None:
    if len(ops) != 5 or any(kind == "other" for kind, *_ in ops):
        return None
    linears = [(ins[0], out, w) for kind, ins, out, w in ops if kind == "linear"]
    acts = [(kind, ins, out) for kind, ins, out, _ in ops if kind in native.ACTIVATIONS]
    muls = [ins for kind, ins, out, _ in ops if kind == "mul"]
    if len(linears) != 3 or len(acts) != 1 or len(muls) != 1:
        return None
    act, (act_in,), act_out = acts[0]
    by_out = {out: (inp, w) for inp, out, w in linears}
    mul_out = next(out for kind, ins, out, _ in ops if kind == "mul")
    down = next(((inp, w) for inp, out, w in linears if out == out_id), None)
    a, b = muls[0]
    if down is None or down[0] != mul_out or act_in not in by_out or act_out not in (a, b) or a == b:
        return None
    up_out = b if a == act_out else a
    if up_out not in by_out:
        return None
    gate_in, gate = by_out[act_in]
    up_in, up = by_out[up_out]
    if gate_in != x_id or up_in != x_id or len({id(gate), id(up), id(down[1])}) != 3:
        return None
    return gate, up, down[1], act


def recognize(twin: nn.Module, mode: HostLinearMode | None, hidden: int, dtype: torch.dtype) -> GatedFFN | None:
    """The twin's FFN as one native call, or None when its forward is not provably
    down(act(gate(x)) * up(x)) on native int4/int8 weights, or the fused result strays past
    `FUSED_BOUND`."""
    if mode is None or dtype not in FUSED_BOUND or native.unavailable() is not None:
        return None
    if any(w.kernel not in _BITS or w.dtype != dtype for w in mode.weights.values()):
        return None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    rec = _Recorder(mode.weights)
    try:
        with torch.no_grad(), rec:
            ref = twin(x)
    except Exception:
        return None  # the twin path will raise its own, clearer error where it is used
    if not isinstance(ref, torch.Tensor):
        return None
    found = _match(rec.ops, id(x), id(ref))
    rec.keep.clear()
    if found is None:
        return None
    gate, up, down, act = found
    if gate.shape != up.shape or down.shape[1] != gate.shape[0] or gate.shape[1] != hidden:
        return None
    if gate.kernel != up.kernel:  # one call computes the same rows of both: their work items must match
        return None
    fused = GatedFFN(gate, up, down, act, dtype)
    for tokens in (1, 3):
        x = torch.randn(tokens, hidden, generator=gen).to(dtype)
        with torch.no_grad(), mode:
            ref = twin(x)
        got = fused(x)
        scale = ref.abs().max().item() or 1.0
        if not (got.float() - ref.float()).abs().max().item() / scale <= FUSED_BOUND[dtype]:
            return None
    return fused
