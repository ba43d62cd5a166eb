"""Weight quantization for streaming: fewer bytes over the link, dequantized on the device.

- int8: per-output-channel (per row) symmetric, q in [-127, 127], one fp32 scale per row.
- int4: group-wise asymmetric along the input dimension: per (row, group) a scale and a
  minimum (fp16), q in [0, 15] stored as two nibbles per byte (low nibble = even column),
  w = q * scale + minimum. Asymmetric because weight groups are rarely centred on zero: on the
  embedded SmolLM2 it halves the perplexity cost of symmetric int4 at group 128 (see
  benchmarks/results/quant_quality.json), and at group 32 it reproduces a Q4_1 GGUF exactly.

Only 2-D floating-point weights are quantized; biases and anything else travel as they are.
The host store keeps the quantized bytes; a slot receives them and `dequantize_into` writes the
weights in their original dtype and layout into the slot's compute buffer.
"""

from __future__ import annotations

import torch

MODES = ("int8", "int4")


def eligible(t: torch.Tensor) -> bool:
    """Whether a weight is quantized: 2-D floating point with an even number of columns."""
    return t.dim() == 2 and t.is_floating_point() and t.shape[1] % 2 == 0 and t.numel() >= 64


def group_size_for(columns: int, requested: int) -> int:
    """The int4 group size actually used: the requested one when it divides the row, else the
    largest even divisor of `columns` not above it (a tiny model's 32-wide rows, say)."""
    if columns % requested == 0:
        return requested
    for g in range(min(requested, columns), 1, -1):
        if columns % g == 0 and g % 2 == 0:
            return g
    return columns


def quantize(t: torch.Tensor, mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed integers as uint8/int8, fp32 scales) for a 2-D weight."""
    w = t.detach().to(torch.float32)
    rows, cols = w.shape
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    g = group_size_for(cols, group_size)
    wg = w.view(rows, cols // g, g)
    # Scale and minimum are rounded to fp16 first, so the codes are chosen for the values the
    # dequantizer will really use.
    low = wg.amin(dim=2).to(torch.float16).to(torch.float32)
    scale = ((wg.amax(dim=2) - low) / 15.0).clamp_min(1e-7).to(torch.float16).to(torch.float32)
    q = torch.round((wg - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int16).view(rows, cols)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, torch.stack((scale, low), dim=-1).to(torch.float16)


def dequantize_into(dst: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mode: str) -> None:
    """Write the dequantized weight into `dst` (original dtype, shape and strides)."""
    if mode == "int8":
        w = q.to(torch.float32) * scale[:, None]
    else:
        rows, half = q.shape
        cols = half * 2
        groups = scale.shape[1]
        meta = scale.to(torch.float32)  # [rows, groups, (scale, minimum)]
        nib = torch.stack((q & 0xF, q >> 4), dim=-1).view(rows, cols).to(torch.float32)
        w = (nib.view(rows, groups, cols // groups) * meta[..., 0:1] + meta[..., 1:2]).view(rows, cols)
    dst.copy_(w)


def packed_specs(
    shape: tuple[int, ...], mode: str, group_size: int
) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype]]:
    """((shape, dtype) of the integers, (shape, dtype) of the scales) for a weight of `shape`:
    what `quantize` returns, known without quantizing (for planning from shapes alone)."""
    rows, cols = shape
    if mode == "int8":
        return ((rows, cols), torch.int8), ((rows,), torch.float32)
    return ((rows, cols // 2), torch.uint8), ((rows, cols // group_size_for(cols, group_size), 2), torch.float16)
