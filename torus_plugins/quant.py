"""Weight quantization for streaming: fewer bytes over the link, dequantized on the device.

- int8: per-output-channel (per row) symmetric, q in [-127, 127], one fp32 scale per row.
- int4: group-wise symmetric along the input dimension, q in [-8, 7] stored as two unsigned
  nibbles per byte (low nibble = even column), one fp32 scale per (row, group).

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
    scale = wg.abs().amax(dim=2).clamp_min(1e-12) / 7.0
    q = torch.round(wg / scale[..., None]).clamp_(-8, 7).to(torch.int16).view(rows, cols) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale


def dequantize_into(dst: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mode: str) -> None:
    """Write the dequantized weight into `dst` (original dtype, shape and strides)."""
    if mode == "int8":
        w = q.to(torch.float32) * scale[:, None]
    else:
        rows, half = q.shape
        cols = half * 2
        groups = scale.shape[1]
        nib = torch.stack((q & 0xF, q >> 4), dim=-1).view(rows, cols).to(torch.float32) - 8.0
        w = (nib.view(rows, groups, cols // groups) * scale[..., None]).view(rows, cols)
    dst.copy_(w)


def packed_nbytes(shape: tuple[int, ...], mode: str, group_size: int) -> tuple[int, int]:
    """(bytes of the integers, bytes of the scales) for a weight of `shape`."""
    rows, cols = shape
    if mode == "int8":
        return rows * cols, rows * 4
    return rows * cols // 2, rows * (cols // group_size_for(cols, group_size)) * 4
