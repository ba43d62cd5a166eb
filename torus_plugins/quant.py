"""Weight quantization for streaming: fewer bytes over the link, dequantized on the device.

- int8: per-output-channel (per row) symmetric, q in [-127, 127], one fp32 scale per row.
- int4: group-wise asymmetric along the input dimension with double-quantized metadata (the
  "k-quant" layout of llama.cpp's Q4_K, with one super-scale pair per row instead of per 256
  weights). Per (row, group of G columns): q in [0, 15], two nibbles per byte (low nibble = even
  column), a 6-bit scale code `sc` and a 6-bit minimum code `mn`; per row: two fp16 super-scales
  `d` and `dmin`. w = q * (d * sc) - dmin * mn. As in Q4_K the group minimum is clamped to <= 0
  (-dmin * mn); on the embedded SmolLM2 no 32-column group has a positive minimum.

  Bits per weight: 4 + 12 / G + 32 / row length; at the default G = 32 about 4.4 (0.276 x bf16 on
  SmolLM2-135M's FFN), where an fp16 scale + fp16 minimum per group (this module's former int4
  format) cost 5. On the embedded SmolLM2 (a Q4_1 conversion), every FFN layer int4 at group 32:
  perplexity +0.3%, KL 0.006 nats/token (benchmarks/results/quant_quality.json).

  Encoding: per group, scale = (max - min(min, 0)) / 15 and offset = -min(min, 0); d = the row's
  largest scale / 63 and dmin = its largest offset / 63, each rounded up to fp16 (so code 63
  reaches the largest). Each group's sc and mn are rounded to the nearest, then each pair within
  +-1 of them is tried and the one whose nearest-code reconstruction has the smallest squared
  error is kept (on SmolLM2 this halves the weight error and the KL against plain rounding, at
  about twice the quantization time). The codes q are always chosen for the scale and minimum
  the dequantizer really uses.

  Metadata: one uint8 tensor, per row `4 + ceil(3 * groups / 2)` bytes: bytes 0..3 are the fp16
  pair (d, dmin) as stored by `Tensor.view(torch.float16)`; then every two groups' codes share
  3 bytes, as the 24-bit little-endian value sc0 | mn0 << 6 | sc1 << 12 | mn1 << 18 (an odd
  last group takes 2 bytes). The group count is recovered from that length.

Only 2-D floating-point weights are quantized; biases and anything else travel as they are.
The host store keeps the quantized bytes; a slot receives them and `dequantize_into` writes the
weights in their original dtype and layout into the slot's compute buffer: int8 in two dispatched
ops, int4 in one (`torus::dequantize_int4_`: the native C dequantizer on the CPU, a compiled
kernel on CUDA), or, where no such kernel exists or proves right, as plain torch ops. All write
the same bits (every product in the formula is exact; only its subtraction rounds, in fp32).
"""

from __future__ import annotations

import torch

MODES = ("int8", "int4")

_TINY = torch.finfo(torch.float32).tiny


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


def _meta_bytes(groups: int) -> int:
    """Metadata bytes per row: the fp16 (d, dmin) pair, then 12 bits of codes per group."""
    return 4 + (3 * groups + 1) // 2


def _super_scale(x: torch.Tensor) -> torch.Tensor:
    """fp16 super-scale (as float32) with 63 * scale >= x: rounded up, so the largest group's
    code fits in 6 bits."""
    want = x / 63.0
    h = want.to(torch.float16)
    short = h.to(torch.float32) < want
    # The next fp16 up (positive finite values only, which `want` is).
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(short, up, h).to(torch.float32)


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension strictly left to right (`Tensor.sum`'s order depends on the
    CPU's vector width): the native quantizer sums in this order, so both pick the same codes."""
    acc = x[..., 0].clone()
    for k in range(1, x.shape[-1]):
        acc.add_(x[..., k])
    return acc


def _fit(wg: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes in [0, 15] for w = q * step - offset (per group), and each group's squared error."""
    y = wg + offset[..., None]
    q = torch.round(y / step.clamp_min(_TINY)[..., None]).clamp_(0, 15)
    err = _ordered_sum((q * step[..., None]).sub_(y).square_())
    return q, err


def _refine(wg: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor) -> None:
    """Replace each group's (sc, mn), in place, by the pair within +-1 whose reconstruction has
    the smallest squared error (ties keep the earlier candidate, the rounded pair first)."""
    best = _fit(wg, d[:, None] * sc, dmin[:, None] * mn)[1]
    base_sc, base_mn = sc.clone(), mn.clone()
    for dsc in (-1, 0, 1):
        for dmn in (-1, 0, 1):
            if dsc == 0 and dmn == 0:
                continue
            csc = (base_sc + dsc).clamp_(0, 63)
            cmn = (base_mn + dmn).clamp_(0, 63)
            err = _fit(wg, d[:, None] * csc, dmin[:, None] * cmn)[1]
            better = err < best
            best = torch.where(better, err, best)
            sc.copy_(torch.where(better, csc, sc))
            mn.copy_(torch.where(better, cmn, mn))


def _quantize_int4(w: torch.Tensor, group_size: int, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    g = group_size_for(cols, group_size)
    groups = cols // g
    wg = w.view(rows, groups, g)
    low = wg.amin(dim=2).clamp(max=0.0)  # Q4_K: the minimum is never above zero
    scale = (wg.amax(dim=2) - low) / 15.0
    # + 0.0: a row whose largest is a zero stores +0 (amax may return -0.0), as the native path does.
    d = _super_scale(scale.amax(dim=1) + 0.0)
    dmin = _super_scale((-low).amax(dim=1) + 0.0)
    sc = torch.round(scale / d.clamp_min(_TINY)[:, None]).clamp_(0, 63)
    mn = torch.round(-low / dmin.clamp_min(_TINY)[:, None]).clamp_(0, 63)
    if refine:
        # Row chunks of about a million weights: the nine candidates then work in cache.
        chunk = max(1, (1 << 20) // cols)
        for r in range(0, rows, chunk):
            _refine(wg[r : r + chunk], d[r : r + chunk], dmin[r : r + chunk], sc[r : r + chunk], mn[r : r + chunk])
    q, _ = _fit(wg, d[:, None] * sc, dmin[:, None] * mn)
    q = q.to(torch.int16).view(rows, cols)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)

    sc_i, mn_i = sc.to(torch.int32), mn.to(torch.int32)
    if groups % 2:
        pad = sc_i.new_zeros(rows, 1)
        sc_i, mn_i = torch.cat((sc_i, pad), dim=1), torch.cat((mn_i, pad), dim=1)
    v = sc_i[:, 0::2] | (mn_i[:, 0::2] << 6) | (sc_i[:, 1::2] << 12) | (mn_i[:, 1::2] << 18)
    codes = torch.stack((v & 0xFF, (v >> 8) & 0xFF, v >> 16), dim=-1).to(torch.uint8).view(rows, -1)
    head = torch.stack((d, dmin), dim=1).to(torch.float16).view(torch.uint8)  # [rows, 4]
    meta = torch.cat((head, codes), dim=1)[:, : _meta_bytes(groups)].contiguous()
    return packed, meta


def quantize(
    t: torch.Tensor,
    mode: str,
    group_size: int,
    refine: bool = True,
    device: torch.device | str | None = None,
    row_block: int = 1 << 22,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed integers, metadata) for a 2-D weight: int8 -> (int8 [rows, cols], fp32
    scale per row); int4 -> (uint8 [rows, cols / 2], uint8 [rows, meta bytes], see the module
    docstring). `refine=False` skips int4's +-1 code search (for measuring what it buys).

    `device`: do the arithmetic there (a GPU quantizes a 7B model's FFN in seconds where a few CPU
    cores take minutes) and return the results on `t`'s device. Rows are independent in both
    formats, so the weight goes over in blocks of about `row_block` elements: the device holds
    one block's temporaries, never the whole matrix (the results equal the unblocked ones).

    `native`: use the C quantizers (`quant_native`, same codes, tens of times faster) for a CPU
    tensor; None picks them wherever they build, False forces the PyTorch path."""
    if device is None and t.device.type == "cpu" and native is not False:
        from . import quant_native

        if quant_native.library() is not None:
            threads = torch.get_num_threads()
            if mode == "int8":
                return quant_native.quantize_int8(t, threads)
            g = group_size_for(t.shape[1], group_size)
            if g <= 4096:  # the C file's largest group (a whole 8k-wide row still fits)
                return quant_native.quantize_int4(t, g, _meta_bytes(t.shape[1] // g), refine, threads)
        elif native:
            raise RuntimeError(quant_native.unavailable())
    if device is not None:
        rows = max(1, row_block // max(1, t.shape[1]))
        parts = [quantize(t[r : r + rows].to(device), mode, group_size, refine) for r in range(0, t.shape[0], rows)]
        home = t.device
        return torch.cat([q.to(home) for q, _ in parts]), torch.cat([m.to(home) for _, m in parts])
    w = t.detach().to(torch.float32)
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    return _quantize_int4(w, group_size, refine)


def int4_parts(
    q: torch.Tensor, meta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 layout unpacked, nothing multiplied: (codes uint8 [rows, cols] in 0..15, d and dmin
    float32 [rows] (fp16 values), sc and mn uint8 [rows, groups] in 0..63): step = d * sc and
    offset = dmin * mn, each exact in fp32 (an 11-bit by 6-bit product)."""
    rows, half = q.shape
    cols = half * 2
    groups = 2 * (meta.shape[1] - 4) // 3
    dd = meta[:, :4].contiguous().view(torch.float16).to(torch.float32)  # [rows, (d, dmin)]
    codes = meta[:, 4:]
    if groups % 2:
        codes = torch.cat((codes, codes.new_zeros(rows, 1)), dim=1)
    b = codes.reshape(rows, -1, 3).to(torch.int32)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    sc = torch.stack((v & 63, (v >> 12) & 63), dim=-1).view(rows, -1)[:, :groups]
    mn = torch.stack(((v >> 6) & 63, (v >> 18) & 63), dim=-1).view(rows, -1)[:, :groups]
    nib = torch.stack((q & 0xF, q >> 4), dim=-1).view(rows, cols)
    return nib, dd[:, 0].contiguous(), dd[:, 1].contiguous(), sc.to(torch.uint8), mn.to(torch.uint8)


def int4_codes(q: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 layout decoded: (codes uint8 [rows, cols] in 0..15, step and offset float32
    [rows, groups]), so that w = codes * step - offset within each group (see the module docstring).
    The streamed dequantizer and the host's kernel layouts all start from these (or `int4_parts`)."""
    nib, d, dmin, sc, mn = int4_parts(q, meta)
    return nib, d[:, None] * sc.to(torch.float32), dmin[:, None] * mn.to(torch.float32)


def dequantize_into(dst: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mode: str) -> None:
    """Write the dequantized weight into `dst` (original dtype, shape and strides).

    The arithmetic is fp32 (int8: q * scale; int4: codes * step - offset, step and offset exact),
    rounded once into `dst`'s dtype. int8 is two dispatched ops (a view of the scales, one
    multiply written straight into `dst`). int4 is one op, `torus::dequantize_int4_`, where a
    single kernel exists for the device (`int4_kernel`: the native C dequantizer on the CPU, a
    compiled kernel on CUDA, checked against the formula on its first matrix), else the formula
    as plain torch ops (`_dequantize_int4_ops`: 15 kernels, one fp32 temporary the size of the
    matrix). All three write the same bits."""
    if mode == "int8":
        torch.mul(q, scale.unsqueeze(1), out=dst)  # int8 x fp32 computes in fp32, rounds into dst
        return
    if int4_kernel(dst, q, scale) is not None:
        torch.ops.torus.dequantize_int4_(dst, q, scale)
    else:
        _dequantize_int4_ops(dst, q, scale)


def _dequantize_int4_ops(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> None:
    """The int4 landing as portable torch ops: both nibbles of every byte looked up in a 256-entry
    table, the metadata decoded in a few ops, multiply, subtract into `dst`."""
    rows, half = q.shape
    step, offset = _int4_steps(meta, rows)
    groups = step.shape[1]
    nib = torch.index_select(_nibbles(q.device), 0, q.reshape(-1).to(torch.int32))  # [rows * half, 2], exact
    w = nib.view(rows, groups, -1).mul_(step.unsqueeze(2))
    if dst.is_contiguous():
        torch.sub(w, offset.unsqueeze(2), out=dst.view(rows, groups, -1))
    else:
        dst.copy_(w.sub_(offset.unsqueeze(2)).view(rows, half * 2))


def _int4_values(q: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The int4 formula as one pointwise expression (what a compiler fuses into one kernel: no
    stack, no dtype view, no table): float32 [rows, cols], w = code * (d * sc) - dmin * mn. Every
    product is exact (4-bit code, 11-bit d, 6-bit sc), so any evaluation order rounds only the
    subtraction: the same bits as `_dequantize_int4_ops`."""
    rows, half = q.shape
    groups = 2 * (meta.shape[1] - 4) // 3
    b = meta[:, 4:].to(torch.int32)
    if groups % 2:
        b = torch.nn.functional.pad(b, (0, 1))
    b = b.view(rows, -1, 1, 3)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # [rows, pairs, 1]
    parity = torch.arange(2, device=q.device, dtype=torch.int32)  # the pair's first or second group
    sc = ((v >> (parity * 12)) & 63).view(rows, -1)[:, :groups].to(torch.float32)
    mn = ((v >> (parity * 12 + 6)) & 63).view(rows, -1)[:, :groups].to(torch.float32)
    h = meta[:, :4].to(torch.int32).view(rows, 2, 2)
    dd = _fp16_value(h[..., 0] | (h[..., 1] << 8))  # [rows, (d, dmin)]
    step, offset = dd[:, 0:1] * sc, dd[:, 1:2] * mn
    nib = ((q.to(torch.int32).unsqueeze(-1) >> (parity * 4)) & 15).to(torch.float32)  # low nibble first
    return (nib.view(rows, groups, -1) * step.unsqueeze(2) - offset.unsqueeze(2)).view(rows, 2 * half)


def _fp16_value(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of fp16 bit patterns (int32 tensor, 0..65535) in pointwise ops, bit for bit
    what `.view(torch.float16).to(torch.float32)` gives: a normal number's fp32 bits are assembled
    and bitcast, a subnormal is its mantissa * 2**-24."""
    e, m = (bits >> 10) & 31, bits & 1023
    inf_nan = e == 31
    m_nan = torch.where(inf_nan & (m != 0), m | 512, m)  # a NaN comes out quiet, as a conversion makes it
    big = torch.where(inf_nan, 255 << 23, (e + 112) << 23) | (m_nan << 13)  # normal, inf, NaN: fp32 bits
    mag = torch.where(e == 0, m.to(torch.float32) * 2.0**-24, big.view(torch.float32))
    return torch.where((bits >> 15) == 1, -mag, mag)


# ---------------------------------------------------------------------------------------------
# The one-op int4 landing: a custom op (`torus::dequantize_int4_`) kept apart from the model's
# graph (torch.compile sees one opaque op), with a kernel per device where one exists.

_LIB = torch.library.Library("torus", "FRAGMENT")
_LIB.define("dequantize_int4_(Tensor(a!) dst, Tensor q, Tensor meta) -> ()")
_LIB.impl("dequantize_int4_", lambda dst, q, meta: None, "Meta")


def _cpu_kernel(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> None:
    from . import quant_native

    quant_native.dequantize_int4(dst, q, meta, torch.get_num_threads())


_LIB.impl("dequantize_int4_", _cpu_kernel, "CPU")

#: Compiled kernels by device type, built on first use (torch.compile of `_int4_values` written
#: into dst: inductor fuses the decode, the multiply and the subtraction into one kernel).
_COMPILED: dict[str, object] = {}  # False: it failed after its proof (the torch ops from then on)


def _compiled_kernel(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> None:
    """The compiled kernel. A compile that fails after the first matrix proved it (a new shape or
    layout recompiles) lands this matrix and every later one with the torch ops instead: the same
    bits, more launches, one log line."""
    fn = _COMPILED.get(dst.device.type)
    if fn is None:

        def write(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> None:
            dst.copy_(_int4_values(q, meta))

        fn = _COMPILED[dst.device.type] = torch.compile(write, dynamic=True, fullgraph=True)
    if fn is False:
        _dequantize_int4_ops(dst, q, meta)
        return
    try:
        fn(dst, q, meta)  # type: ignore[operator]
    except Exception as exc:
        if (dst.device.type, dst.dtype, dst.is_contiguous()) not in _KERNEL:
            raise  # the first matrix's proof (`int4_kernel`): it reports the failure itself
        import logging

        logging.getLogger(__name__).warning("int4 landing on %s falls back to torch ops: %s", dst.device, exc)
        _COMPILED[dst.device.type] = False
        _dequantize_int4_ops(dst, q, meta)


_LIB.impl("dequantize_int4_", _compiled_kernel, "CUDA")

#: Per (device type, dst dtype, dst contiguous): "op" once the kernel has written its first
#: matrix with the formula's bits, None where it is unavailable or differed (the torch ops then).
_KERNEL: dict[tuple[str, torch.dtype, bool], str | None] = {}
#: Device types with a one-op kernel: the CPU's needs the native library, CUDA's torch.compile.
KERNEL_DEVICES = ("cpu", "cuda")


def int4_kernel(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> str | None:
    """The string "op" when `torus::dequantize_int4_` lands int4 codes into `dst` here, else None.

    Decided once per (device type, dtype, layout): the first matrix goes through the op and
    through the torch ops, and the op is kept only when their bits are equal (one host read, on
    that first landing only); a kernel that fails to build or differs is logged and never used
    again. On the CPU the native library is that kernel (the same C arithmetic the tests pin)."""
    key = (dst.device.type, dst.dtype, dst.is_contiguous())
    if key in _KERNEL:
        return _KERNEL[key]
    verdict: str | None = None
    if key[0] in KERNEL_DEVICES and dst.dtype in (torch.float32, torch.bfloat16, torch.float16):
        verdict = _prove(dst, q, meta)
    _KERNEL[key] = verdict
    return verdict


def _prove(dst: torch.Tensor, q: torch.Tensor, meta: torch.Tensor) -> str | None:
    import logging

    log = logging.getLogger(__name__)
    if dst.device.type == "cpu":
        from . import quant_native

        if quant_native.library() is None:
            return None
    try:
        with torch.inference_mode(False):
            got = torch.empty_strided(dst.shape, dst.stride(), dtype=dst.dtype, device=dst.device)
            want = torch.empty_like(got)
            torch.ops.torus.dequantize_int4_(got, q, meta)
            _dequantize_int4_ops(want, q, meta)
            # Bits, not values: equal NaNs are equal, -0.0 and +0.0 are not.
            same = bool(torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)))
    except Exception as exc:  # a kernel that cannot build here: the torch ops are always right
        log.warning("int4 landing on %s uses torch ops: its one-op kernel failed (%s)", dst.device, exc)
        return None
    if not same:
        log.warning("int4 landing on %s uses torch ops: its one-op kernel differed from the formula", dst.device)
        return None
    return "op"


_NIBBLES: dict[torch.device, torch.Tensor] = {}


def _nibbles(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the low and high nibble of every byte (the low one is the even column)."""
    t = _NIBBLES.get(device)
    if t is None:
        b = torch.arange(256, dtype=torch.int32)
        with torch.inference_mode(False):
            t = _NIBBLES[device] = torch.stack((b & 0xF, b >> 4), dim=-1).to(torch.float32).to(device)
    return t


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _int4_steps(meta: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, offset) float32 [rows, groups] from int4 metadata: d * sc and dmin * mn, each exact
    (`int4_parts` decodes the same fields one by one)."""
    groups = 2 * (meta.shape[1] - 4) // 3
    dd = meta[:, :4].contiguous().view(torch.float16).to(torch.float32)  # [rows, (d, dmin)]
    b = meta[:, 4:].to(torch.int32)
    if groups % 2:
        b = torch.nn.functional.pad(b, (0, 1))
    b = b.view(rows, -1, 3)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # sc0 | mn0 << 6 | sc1 << 12 | mn1 << 18
    shifts = _SHIFTS.get(meta.device)
    if shifts is None:
        with torch.inference_mode(False):
            shifts = _SHIFTS[meta.device] = torch.tensor([0, 6, 12, 18], dtype=torch.int32, device=meta.device)
    codes = ((v.unsqueeze(-1) >> shifts) & 63).to(torch.float32)  # [rows, pairs, (sc0, mn0, sc1, mn1)]
    both = codes.view(rows, -1, 2, 2) * dd.view(rows, 1, 1, 2)  # (d * sc, dmin * mn) per group
    return both[..., 0].reshape(rows, -1)[:, :groups], both[..., 1].reshape(rows, -1)[:, :groups]


def packed_specs(
    shape: tuple[int, ...], mode: str, group_size: int
) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype]]:
    """((shape, dtype) of the integers, (shape, dtype) of the metadata) for a weight of `shape`:
    what `quantize` returns, known without quantizing (for planning from shapes alone)."""
    rows, cols = shape
    if mode == "int8":
        return ((rows, cols), torch.int8), ((rows,), torch.float32)
    groups = cols // group_size_for(cols, group_size)
    return ((rows, cols // 2), torch.uint8), ((rows, _meta_bytes(groups)), torch.uint8)
