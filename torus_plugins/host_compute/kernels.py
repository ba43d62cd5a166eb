"""Host weights and the `linear` they compute: as loaded, int8 or int4 in PyTorch's packed CPU layouts, or our own kernels.

A host-placed unit never dequantizes a whole matrix per token (that reads and writes it several
times): int8 weights go to `aten._weight_int8pack_mm` (per-row scales, the host store's own int8
bytes), int4 weights to `aten._weight_int4pack_mm_for_cpu` (a second, packed layout of the same codes,
built once at attach), or to our own kernels (`native`: integer dot products, memory-bound at a few
tokens where PyTorch's are compute-bound; one more layout of the same codes). bf16 weights as loaded
may go to `native.bf16_linear` (the stored bytes themselves, no second layout), which reads them at
the memory limit where PyTorch's bf16 GEMV reached 0.40-0.67 of it. PyTorch's kernels
take activations in the scales' dtype; on a CPU without native fp32 paths for them the bf16 one is
an order of magnitude faster, so the kernel and activation dtype are a choice the probe makes by
timing (`probe.probe_host`) and the accuracy bound covers.

Modules reach these kernels through `HostLinearMode`: inside it, `F.linear(x, w)` with `w` one of
the registered parameters computes with the host weight; any other use of such a parameter raises
(its tensor is a memory-free placeholder, so computing with it would be wrong text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import quant as quantization
from ..errors import TorusError
from . import native

#: The kernels a host weight can use, by weight format.
KERNELS = ("raw", "bf16native", "int8pack", "int8native", "int4pack", "int4native", "dequantize")


class HostComputeError(TorusError, RuntimeError):
    """A host-placed unit was used in a way its host weights cannot compute."""


@dataclass
class HostWeight:
    """One 2-D weight on the host, ready for `linear`.

    kernel: "raw" (the weight as loaded), "bf16native" (the same bf16 tensor through `native`), "int8pack", "int4pack", "int8native" / "int4native" (`native`)
        or "dequantize" (dequantize into a scratch matrix, then matmul: the fallback for shapes the
        packed kernels refuse); its tensors are (q, scale) for int8 and (codes, step, offset) for int4.
    act_dtype: the dtype activations are cast to for the packed kernels (None: the input's).
    """

    kernel: str
    shape: tuple[int, int]
    dtype: torch.dtype
    tensors: tuple[torch.Tensor, ...]
    act_dtype: torch.dtype | None = None
    group: int = 0
    mode: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "raw":
            return F.linear(x, self.tensors[0], bias)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.kernel == "bf16native":
            y = native.bf16_linear(x2, self.tensors[0])
        elif self.kernel == "int8pack":
            q, scales = self.tensors
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.act_dtype), q, scales)
        elif self.kernel == "int4pack":
            packed, scale_zeros = self.tensors
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.act_dtype), packed, self.group, scale_zeros)
        elif self.kernel == "int8native":
            y = native.q8_linear(x2, self.tensors, self.shape[0], self.group)  # type: ignore[arg-type]
        elif self.kernel == "int4native":
            y = native.q4_linear(x2, self.tensors, self.shape[0], self.group)  # type: ignore[arg-type]
        elif self.mode == "int8":
            q, scale = self.tensors
            w = (q.to(torch.float32) * scale[:, None]).to(self.dtype)
            y = F.linear(x2.to(self.dtype), w)
        else:
            codes, step, offset = self.tensors
            rows, cols = self.shape
            w = codes.view(rows, -1, self.group).to(torch.float32) * step[..., None] - offset[..., None]
            y = F.linear(x2.to(self.dtype), w.view(rows, cols).to(self.dtype))
        y = y.to(x.dtype).view(*lead, self.shape[0])
        return y if bias is None else y + bias


def in_place_weight(t: torch.Tensor, kernel: str) -> HostWeight | None:
    """`t`, a weight as loaded, through the native bf16 kernel reading it in place, when that is
    the host kernel and `t` is a 2-D bf16 matrix it takes; None: PyTorch's linear on `t` as it is."""
    if kernel != "bf16native" or t.dtype != torch.bfloat16 or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    return raw_weight(t, "bf16native")


def stand_in(hw: HostWeight, dtype: torch.dtype) -> torch.Tensor:
    """A memory-free tensor of `hw`'s shape for a module to hold where its weight was: registered
    with `HostLinearMode`, linear on it computes as `hw`."""
    return torch.zeros((), dtype=dtype).expand(hw.shape)


def raw_weight(w: torch.Tensor, kernel: str = "raw") -> HostWeight:
    """A host weight as loaded: PyTorch's linear ("raw"), or for a bf16 weight "bf16native" (the
    same tensor through `native.bf16_linear`)."""
    if kernel == "bf16native":
        native.check_bf16(w)
        return HostWeight("bf16native", tuple(w.shape), w.dtype, (w,))  # type: ignore[arg-type]
    return HostWeight("raw", tuple(w.shape), w.dtype, (w,))  # type: ignore[arg-type]


def quantized_weight(
    w: torch.Tensor, mode: str, group_size: int, kernel: str, act_dtype: torch.dtype | None, refine: bool = True
) -> HostWeight:
    """A host weight for `w` quantized as the streamed path quantizes it (`quant.quantize`)."""
    q, scale = quantization.quantize(w, mode, group_size, refine=refine)
    return stored_weight(q, scale, mode, kernel, act_dtype, w.dtype)


def stored_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    mode: str,
    kernel: str,
    act_dtype: torch.dtype | None,
    dtype: torch.dtype,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> HostWeight:
    """A host weight from the host store's quantized bytes (`quant`'s layouts), or a block of it
    (`rows` / `cols`: a split layer's host share; int4 columns cut on group boundaries), holding
    exactly the codes the streamed layer dequantizes. int8 keeps the stored integers; int4 is
    repacked once into the CPU kernel's layout (same codes, scales and minimums)."""
    if mode == "int8":
        qs, ss = q[rows, cols].contiguous(), scale[rows]
        shape = (qs.shape[0], qs.shape[1])
        group = native.q8_group(shape[1])
        if kernel == "int8native" and group is not None:
            return HostWeight("int8native", shape, dtype, native.q8_layout(qs, ss), group=group, mode=mode)
        if kernel == "int8pack":
            act = act_dtype or dtype
            return HostWeight("int8pack", shape, dtype, (qs, ss.to(act)), act, mode=mode)
        return HostWeight("dequantize", shape, dtype, (qs, ss), mode=mode)
    nib, d, dmin, sc, mn = quantization.int4_parts(q, scale)
    g = nib.shape[1] // sc.shape[1]
    start = cols.start or 0
    stop = nib.shape[1] if cols.stop is None else cols.stop
    if start % g or stop % g:
        raise HostComputeError(f"an int4 weight's host share must start and end on a {g}-column group boundary")
    gcols = slice(start // g, stop // g)
    if kernel == "int4native" and g % 8 == 0:
        # The kernel forms step = d * sc and offset = dmin * mn itself (exactly int4_codes' values).
        share = nib[rows, cols]
        layout = native.q4_layout(share, d[rows], dmin[rows], sc[rows, gcols], mn[rows, gcols])
        return HostWeight("int4native", (share.shape[0], share.shape[1]), dtype, layout, group=g, mode=mode)
    codes = nib.to(torch.int32)
    step, offset = d[:, None] * sc.to(torch.float32), dmin[:, None] * mn.to(torch.float32)
    codes, step, offset = codes[rows, cols], step[rows, gcols], offset[rows, gcols]
    shape = (codes.shape[0], codes.shape[1])
    if kernel == "int4pack" and shape[0] % 16 == 0 and g in (32, 64, 128, 256):
        act = act_dtype or dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        # The kernel computes w = (code - 8) * scale + zero per group: scale = step, zero = 8 step - offset.
        scale_zeros = torch.stack((step, 8 * step - offset), dim=-1).transpose(0, 1).contiguous().to(act)
        return HostWeight("int4pack", shape, dtype, (packed, scale_zeros), act, group=g, mode=mode)
    return HostWeight(
        "dequantize",
        shape,
        dtype,
        (codes.to(torch.uint8).contiguous(), step.contiguous(), offset.contiguous()),
        group=g,
        mode=mode,
    )


class HostLinearMode(TorchFunctionMode):
    """Routes `linear` calls on registered parameters to their `HostWeight`s (thread-local: enter it
    on the thread that computes)."""

    def __init__(self, weights: dict[int, HostWeight]) -> None:
        super().__init__()
        self.weights = weights

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            hw = self.weights.get(id(w))
            if hw is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return hw.linear(args[0], bias)
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) in self.weights:
                name = getattr(func, "__name__", str(func))
                raise HostComputeError(
                    f"a host-placed weight was used by {name}, not by linear: its host kernel computes "
                    f"only linear(x, weight); run this model with host_compute='off' or without weight_quant"
                )
        return func(*args, **kwargs)
