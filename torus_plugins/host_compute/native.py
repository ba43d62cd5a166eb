"""The host placement's native int4, int8 and bf16 kernels (`host_linear.c`): built on first use, loaded with ctypes.

Why native: at one token PyTorch's packed int4/int8 CPU kernels are compute-bound (0.3-0.73 of the
host's memory read bandwidth on the 2-core machine this project is built on), its bf16 GEMV reaches
0.40-0.67, and a host-placed FFN's token costs its weight bytes read. `host_linear.c` says how its integer dot products reach the
memory limit and what its activation rounding costs (about fp16's).

Why built at run time rather than shipped compiled: the project travels as a pure-Python wheel
across torch builds; the C file needs only a C compiler with OpenMP (gcc's `-fopenmp`), no torch
headers, and compiles in under a second. The library is cached under
`$TORUS_SPARSE_CACHE/native` (else `$XDG_CACHE_HOME/torus-sparse/native`, else
`~/.cache/torus-sparse/native`), named by the hash of source, compiler and flags. Where it cannot be
built or loaded, `unavailable()` says why and the engine uses PyTorch's kernels (`host_kernel="auto"`)
or refuses (`host_kernel="native"`). ctypes releases the GIL during the call, so the host worker
and the calling thread can both compute.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ..cache_paths import cache_root

SOURCE = Path(__file__).with_name("host_linear.c")
#: -ffp-contract=off: the portable path must round exactly as the VNNI one (tests compare them bit for bit).
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
#: After the source: the fused FFN's activations call libm.
LIBS = ("-lm",)
#: Rows per block of the kernel's layout.
BLOCK_ROWS = 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_vnni = False


def cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return {
                line.split()[-1]
                for line in f
                if any(n in line for n in ("libgomp", "libiomp", "libomp.so")) and "/" in line
            }
    except OSError:
        return set()


def _build(cc: str, source: Path = SOURCE) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join((source.read_text(), version, " ".join(FLAGS + LIBS), platform.machine())).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent first uses never load a half-written file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(source), *LIBS, "-o", tmp], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise OSError(f"{cc} failed: {(res.stderr or res.stdout).strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_and_load(source: Path) -> ctypes.CDLL:
    """Compile `source` (once; cached by source, compiler and flags) and load it. Raises OSError
    saying why when there is no compiler, it does not compile, or it would bring a second OpenMP
    runtime beside torch's."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, cc or gcc): install gcc to build it")
    torch.ones(2).sum()  # torch's OpenMP runtime is loaded before ours resolves libgomp.so.1
    before = _openmp_runtimes()
    lib = ctypes.CDLL(str(_build(cc, source)))
    after = _openmp_runtimes()
    if before and len(after) > len(before):
        raise OSError(
            f"it would bring a second OpenMP runtime ({sorted(after - before)}) beside torch's "
            f"({sorted(before)}); two thread pools on the same cores spin against each other"
        )
    return lib


class Matrix(ctypes.Structure):
    """host_linear.c's `torus_mat`: one weight in the q4 or q8 layout (t0, t1, t2 as `q4_layout` /
    `q8_layout` return them) or bf16 as loaded (t0; `ld` its row stride). Holds raw pointers: keep
    the tensors alive while it is used."""

    _fields_ = [
        ("bits", ctypes.c_int),
        ("t0", ctypes.c_void_p),
        ("t1", ctypes.c_void_p),
        ("t2", ctypes.c_void_p),
        ("rows", ctypes.c_int),
        ("K", ctypes.c_int),
        ("group", ctypes.c_int),
        ("ld", ctypes.c_longlong),
    ]


def matrix(bits: int, tensors: tuple[torch.Tensor, ...], rows: int, cols: int, group: int) -> Matrix:
    """A `Matrix` over a weight laid out by `q4_layout` (bits 4) or `q8_layout` (bits 8), or a bf16
    weight as `bf16_linear` takes it (bits 16, `tensors` its one tensor)."""
    if bits == 16:
        (w,) = tensors
        check_bf16(w)
        return Matrix(16, w.data_ptr(), None, None, rows, cols, 0, w.stride(0))
    ptrs = [t.data_ptr() for t in tensors] + [None] * (3 - len(tensors))  # q8: (q + 128, scales)
    return Matrix(bits, *ptrs, rows, cols, group, cols)


def _load() -> ctypes.CDLL:
    lib = build_and_load(SOURCE)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.torus_q4_linear.argtypes = [p, p, p, i, i, i, p, i, p, i, i]
    lib.torus_q8_linear.argtypes = [p, p, i, i, i, p, i, p, i, i]
    for fn in (lib.torus_q4_linear, lib.torus_q8_linear):
        fn.restype = i
    lib.torus_bf16_linear.argtypes = [p, ctypes.c_longlong, i, i, p, i, p, i, i]
    lib.torus_bf16_linear.restype = i
    mat = ctypes.POINTER(Matrix)
    lib.torus_gated.argtypes = [mat, mat, mat, i, p, i, p, i, i, i]
    lib.torus_gated.restype = i
    lib.torus_has_vnni.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (see `unavailable`). Built once per process."""
    global _lib, _error, _vnni
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = _load()
                _vnni = bool(lib.torus_has_vnni())
                _lib = lib
            except OSError as exc:
                _error = f"the native int4/int8/bf16 kernels are unavailable: {exc}"
        return _lib


def unavailable() -> str | None:
    """None when the native kernel can run here, else why not."""
    return None if library() is not None else _error


def has_vnni() -> bool:
    """Whether this CPU runs the AVX-512 (VNNI) paths (else the portable C path, same results)."""
    return library() is not None and _vnni


def q4_layout(
    codes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout of an int4 weight (`quant.int4_parts`: codes uint8 [rows, cols] in 0..15;
    d, dmin float32 [rows]; sc, mn [rows, groups] in 0..63): (packed codes, sc | mn bytes per
    (block, group), d | dmin per block), rows padded to blocks of 16 with zeros."""
    rows, cols = codes.shape
    groups = sc.shape[1]
    blocks = -(-rows // BLOCK_ROWS)
    padded = blocks * BLOCK_ROWS
    c = codes.new_zeros(padded, cols)
    c[:rows] = codes
    c = c.view(blocks, BLOCK_ROWS, cols // 8, 8)
    packed = (c[..., :4] | (c[..., 4:] << 4)).permute(0, 2, 1, 3).contiguous()
    scmn = torch.zeros(padded, groups, 2, dtype=torch.uint8)
    scmn[:rows, :, 0], scmn[:rows, :, 1] = sc, mn
    scmn = scmn.view(blocks, BLOCK_ROWS, groups, 2).permute(0, 2, 3, 1).contiguous()  # [block][group][2][16]
    dd = torch.zeros(padded, 2, dtype=torch.float32)
    dd[:rows, 0], dd[:rows, 1] = d, dmin
    dd = dd.view(blocks, BLOCK_ROWS, 2).permute(0, 2, 1).contiguous()  # [block][2][16]
    return packed, scmn, dd


def q8_group(cols: int) -> int | None:
    """The activations' group for an int8 weight of `cols` columns (None: the layout needs cols % 4 == 0)."""
    return next((g for g in (32, 16, 8, 4) if cols % g == 0), None)


def q8_layout(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's layout of an int8 weight (q int8 [rows, cols], scale float32 [rows]):
    (blocked q + 128 as uint8, scales), rows padded to blocks of 16. Unsigned because vpdpbusd
    multiplies unsigned by signed bytes: the kernel takes 128 * sum(activations) off again, so
    no per-row sums travel with the weights."""
    rows, cols = q.shape
    assert q8_group(cols) is not None
    blocks = -(-rows // BLOCK_ROWS)
    padded = blocks * BLOCK_ROWS
    full = torch.full((padded, cols), 128, dtype=torch.uint8)
    full[:rows] = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = full.view(blocks, BLOCK_ROWS, cols // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = scale.new_zeros(padded, dtype=torch.float32)
    scales[:rows] = scale
    return packed, scales


def _call(
    fn: Any, x: torch.Tensor, tensors: tuple, rows: int, group: int, threads: int | None, vnni: bool | None
) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    tokens, cols = x.shape
    y = torch.empty(tokens, rows, dtype=torch.float32)
    use_vnni = _vnni if vnni is None else (vnni and _vnni)
    rc = fn(
        *(t.data_ptr() for t in tensors),
        rows,
        cols,
        group,
        x.data_ptr(),
        tokens,
        y.data_ptr(),
        threads or torch.get_num_threads(),
        int(use_vnni),
    )
    if rc != 0:
        raise MemoryError(f"the native kernel could not allocate scratch for {tokens} tokens")
    return y


def q8_linear(
    x: torch.Tensor,
    tensors: tuple[torch.Tensor, torch.Tensor],
    rows: int,
    group: int,
    threads: int | None = None,
    vnni: bool | None = None,
) -> torch.Tensor:
    """x [tokens, cols] @ W^T -> float32 [tokens, rows], W in `q8_layout` (`group`: `q8_group(cols)`);
    as `q4_linear`."""
    lib = _lib or library()
    if lib is None:
        raise OSError(_error)
    return _call(lib.torus_q8_linear, x, tensors, rows, group, threads, vnni)


def q4_linear(
    x: torch.Tensor,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows: int,
    group: int,
    threads: int | None = None,
    vnni: bool | None = None,
) -> torch.Tensor:
    """x [tokens, cols] (any float dtype) @ W^T -> float32 [tokens, rows], W in `q4_layout`.
    `vnni=False` forces the portable path (tests); `threads` defaults to torch's."""
    lib = _lib or library()
    if lib is None:
        raise OSError(_error)
    return _call(lib.torus_q4_linear, x, tensors, rows, group, threads, vnni)


def check_bf16(w: torch.Tensor) -> None:
    """`bf16_linear` reads a 2-D bf16 CPU matrix whose rows may be apart (a column share's view)
    but whose columns are adjacent."""
    if w.dtype != torch.bfloat16 or w.dim() != 2 or w.device.type != "cpu" or (w.shape[1] > 1 and w.stride(1) != 1):
        raise ValueError(
            f"the native bf16 kernel takes a 2-D bf16 CPU matrix with adjacent columns, got {w.dtype} "
            f"{tuple(w.shape)} strides {w.stride()} on {w.device}"
        )


def bf16_linear(x: torch.Tensor, w: torch.Tensor, threads: int | None = None, vnni: bool | None = None) -> torch.Tensor:
    """x [tokens, cols] @ w^T -> float32 [tokens, rows], w bf16 [rows, cols] as loaded (`check_bf16`).
    Products of bf16 values are exact in fp32: this differs from PyTorch's bf16 linear only by the
    order of the fp32 sum (and by rounding to bf16 after it, which the caller does)."""
    lib = _lib or library()
    if lib is None:
        raise OSError(_error)
    check_bf16(w)
    x = x.to(torch.float32).contiguous()
    tokens = x.shape[0]
    y = torch.empty(tokens, w.shape[0], dtype=torch.float32)
    use_vnni = _vnni if vnni is None else (vnni and _vnni)
    rc = lib.torus_bf16_linear(
        w.data_ptr(),
        w.stride(0),
        w.shape[0],
        w.shape[1],
        x.data_ptr(),
        tokens,
        y.data_ptr(),
        threads or torch.get_num_threads(),
        int(use_vnni),
    )
    if rc != 0:
        raise MemoryError(f"the native kernel could not allocate scratch for {tokens} tokens")
    return y


#: The activations `gated` can apply, by the code host_linear.c's `activate` takes.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def bound_gated(
    gate: Matrix, up: Matrix, down: Matrix, act: str, round_bf16: bool = False, vnni: bool | None = None
) -> Callable[..., torch.Tensor]:
    """`gated` with its matrices and settings bound once, as a host layer calls it on every token:
    at one token the Python around a call (argument conversion, lookups, checks) took a fifth of a
    small FFN's time (~10 µs of ~60 at SmolLM2's shapes), so per call only what depends on x is
    done. The result is `call(x, threads=None)`; threads default to torch's, read on each call
    (they may change between calls)."""
    lib = _lib or library()
    if lib is None:
        raise OSError(_error)
    fn = lib.torus_gated
    refs = (ctypes.byref(gate), ctypes.byref(up), ctypes.byref(down))  # byref keeps the structures alive
    use_vnni = _vnni if vnni is None else (vnni and _vnni)
    code, rows, flags = ACTIVATIONS[act], down.rows, (int(use_vnni), int(round_bf16))

    def call(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        tokens = x.shape[0]
        y = torch.empty(tokens, rows, dtype=torch.float32)
        if fn(*refs, code, x.data_ptr(), tokens, y.data_ptr(), threads or torch.get_num_threads(), *flags) != 0:
            raise MemoryError(f"the native kernel could not allocate scratch for {tokens} tokens")
        return y

    return call


def gated(
    x: torch.Tensor,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    act: str,
    threads: int | None = None,
    vnni: bool | None = None,
    round_bf16: bool = False,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) in one native call: x [tokens, hidden] -> float32 [tokens, down.rows].
    Each matrix rounds as its own `q4_linear` / `q8_linear` / `bf16_linear` would; `act` is one of
    `ACTIVATIONS`. `round_bf16`: round gate's and up's outputs, the activation and the product to
    bf16, as a bf16 model's forward does between its ops. `vnni=False` forces the portable path."""
    return bound_gated(gate, up, down, act, round_bf16, vnni)(x, threads)


__all__ = [
    "ACTIVATIONS",
    "Matrix",
    "bound_gated",
    "gated",
    "matrix",
    "BLOCK_ROWS",
    "bf16_linear",
    "check_bf16",
    "cache_dir",
    "has_vnni",
    "library",
    "q4_layout",
    "q4_linear",
    "q8_group",
    "q8_layout",
    "q8_linear",
    "unavailable",
]
