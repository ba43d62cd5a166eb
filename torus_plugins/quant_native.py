"""The native quantizers (`quant_kernels.c`): quant.py's int8 and int4 codes, bit for bit, fast;
and the int4 dequantizer that lands those codes on the CPU in one call (`dequantize_int4`).

quant.py's PyTorch path builds each int4 code search out of whole-tensor ops: nine candidate
passes, each a few fp32 temporaries the size of the weight, about 0.1 GB/s of bf16 input on two
cores. The C file does the same arithmetic row by row in cache, vectorized over 16 groups and
threaded over rows (see its header for why the results are identical). Built and loaded like the
host kernels (`host_compute.native.build_and_load`); where it cannot be, `quant.quantize` keeps
the PyTorch path and `unavailable()` says why.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("quant_kernels.c")
#: Input dtypes the C file reads directly (others are converted to fp32 first).
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def library() -> ctypes.CDLL | None:
    """The loaded quantizer library, or None (see `unavailable`). Built once per process."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            from .host_compute.native import build_and_load

            try:
                lib = build_and_load(SOURCE)
            except OSError as exc:
                _error = f"the native quantizers are unavailable: {exc}"
                return None
            p, i, long_ = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
            lib.torus_quantize_int8.argtypes = [p, i, long_, long_, p, p, i]
            lib.torus_quantize_int4.argtypes = [p, i, long_, i, i, i, p, p, long_, i]
            lib.torus_dequantize_int4.argtypes = [p, long_, p, long_, long_, i, i, p, i, long_, long_, i]
            lib.torus_quantize_int8.restype = lib.torus_quantize_int4.restype = i
            lib.torus_dequantize_int4.restype = i
            _lib = lib
        return _lib


def unavailable() -> str | None:
    """None when the native quantizers run here, else why not."""
    return None if library() is not None else _error


def _source(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    src = t.detach()
    if src.dtype not in _DTYPES:
        src = src.to(torch.float32)
    return src.contiguous(), _DTYPES[src.dtype]


def quantize_int8(t: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize(t, "int8", ...) for a CPU tensor: (int8 [rows, cols], fp32 scale [rows])."""
    lib = library()
    assert lib is not None, unavailable()
    src, dtype = _source(t)
    rows, cols = src.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    if lib.torus_quantize_int8(src.data_ptr(), dtype, rows, cols, q.data_ptr(), scale.data_ptr(), threads):
        raise MemoryError(f"the native int8 quantizer could not allocate a row of {cols} floats")
    return q, scale


def quantize_int4(
    t: torch.Tensor, group: int, meta_bytes: int, refine: bool, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize(t, "int4", ...) for a CPU tensor whose rows split into groups of `group`
    (quant.group_size_for already applied): (uint8 codes [rows, cols / 2], uint8 meta [rows, meta_bytes])."""
    lib = library()
    assert lib is not None, unavailable()
    src, dtype = _source(t)
    rows, cols = src.shape
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    meta = torch.empty(rows, meta_bytes, dtype=torch.uint8)
    rc = lib.torus_quantize_int4(
        src.data_ptr(), dtype, rows, cols, group, int(refine), packed.data_ptr(), meta.data_ptr(), meta_bytes, threads
    )
    if rc == 2:
        raise MemoryError(f"the native int4 quantizer could not allocate a row's work space ({cols} columns)")
    if rc:
        raise ValueError(f"the native int4 quantizer refused group {group} for {cols} columns")
    return packed, meta


def dequantize_int4(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor, threads: int) -> None:
    """quant.dequantize_into(dst, q, meta, "int4") for CPU tensors, in one call: the same bits
    (see the C file). `dst`: fp32, bf16 or fp16, any 2-D strides; `q` and `meta` rows may be
    strided but each row contiguous (the views a slot or the host store hands over are)."""
    lib = library()
    assert lib is not None, unavailable()
    rows, half = q.shape
    groups = 2 * (meta.shape[1] - 4) // 3
    if dst.dtype not in _DTYPES or q.stride(1) != 1 or meta.stride(1) != 1 or tuple(dst.shape) != (rows, 2 * half):
        raise ValueError(
            f"the native int4 dequantizer cannot write {dst.dtype} {tuple(dst.shape)} from {tuple(q.shape)} codes"
        )
    rc = lib.torus_dequantize_int4(
        q.data_ptr(), q.stride(0), meta.data_ptr(), meta.stride(0), rows, 2 * half, groups,
        dst.data_ptr(), _DTYPES[dst.dtype], dst.stride(0), dst.stride(1), threads,
    )  # fmt: skip
    if rc == 2:
        raise MemoryError(f"the native int4 dequantizer could not allocate a row of {2 * half} floats")
    if rc:
        raise ValueError(f"the native int4 dequantizer refused {groups} groups for {2 * half} columns")
