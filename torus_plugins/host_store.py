"""The host store: each FFN layer's weights packed into one contiguous byte buffer.

One buffer per layer makes a layer's transfer a single copy of contiguous bytes, and lets the
device slots reuse the same byte layout: a view built from a layout works on the host buffer, a
slot, or a resident device buffer alike.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import quant as quantization
from .config import DEFAULT_QUANT_GROUP_SIZE
from .disk_tier import DiskTier
from .errors import TorusError
from .os_memory import map_large_allocations
from .store_file import StoreFile, store_key

#: Tensors start on this byte boundary inside a buffer, so kernels see the same alignment
#: (and therefore take the same code paths) as they would for freshly allocated weights.
ALIGN = 256


class StoreWriteError(TorusError, OSError):
    """The disk tier could not write the host store's file (it holds the only copy of the units)."""


@dataclass(frozen=True)
class TensorLayout:
    """Where one weight lives inside a layer buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # bytes from the start of the buffer
    nbytes: int  # bytes spanned by the tensor's storage


@dataclass(frozen=True)
class LayerLayout:
    """The byte layout shared by a layer's host buffer and any device buffer that holds it."""

    tensors: tuple[TensorLayout, ...]
    nbytes: int

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of `buffer` (uint8, at least `nbytes` long), one per tensor, in order."""
        out = []
        for t in self.tensors:
            flat = buffer[t.offset : t.offset + t.nbytes].view(t.dtype)
            out.append(flat.as_strided(t.shape, t.stride))
        return out


def _storage_span(t: torch.Tensor) -> int | None:
    """Elements spanned by a dense, non-overlapping tensor, or None when it has holes/overlaps."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return span if span == t.numel() else None


def plan_layout(tensors: list[tuple[str, torch.Tensor]]) -> LayerLayout:
    """Lay tensors out back to back, each aligned to `ALIGN` bytes, keeping their strides.

    Keeping strides (a transposed weight stays transposed) keeps the math bit-identical to the
    unwrapped model; a tensor with gaps or overlaps is stored contiguous instead.
    """
    entries = []
    offset = 0
    for name, t in tensors:
        span = _storage_span(t)
        stride = tuple(t.stride()) if span is not None else tuple(torch.empty(t.shape, device="meta").stride())
        nbytes = t.numel() * t.element_size()
        offset = -(-offset // ALIGN) * ALIGN
        entries.append(TensorLayout(name, t.dtype, tuple(t.shape), stride, offset, nbytes))
        offset += nbytes
    return LayerLayout(tuple(entries), -(-offset // ALIGN) * ALIGN)


def _page_lock(buffer: torch.Tensor) -> int:
    """Page-lock an existing host buffer in place (cudaHostRegister); the cudaError code, 0 on success.

    Why not `torch.empty(..., pin_memory=True)`: PyTorch's pinned allocator rounds every request
    up to a power of two, so a 270 MB layer of a 7B model would lock 512 MiB and the store would
    pin almost twice the weights. Registering exact-size ordinary memory locks only what is used.
    """
    rc = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    if rc != 0:
        # A failed runtime call also leaves its error as the runtime's "last error", which the next
        # kernel launch's check (cudaGetLastError) reports as its own failure: some unrelated op
        # later in attach would raise. Clear it (through libcudart: torch.cuda.cudart() has no
        # binding for it); the caller falls back.
        from .transfer import clear_cuda_error

        clear_cuda_error()
    return rc


def _page_unlock(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


@dataclass(frozen=True)
class PackedLayer:
    """A layer's two layouts: how its bytes travel, and how its weights sit when computed.

    compute: the weights in their original dtypes (what parameters are bound to).
    transfer: what the host buffer and a slot's landing area hold. Without quantization it is
        `compute` itself; with it, each quantized weight becomes (integers, scales).
    recipe: per compute tensor, (mode, transfer index, scales index): mode "raw" means the
        transfer tensor is the weight itself (scales index -1), else "int8"/"int4".
    """

    compute: LayerLayout
    transfer: LayerLayout
    recipe: tuple[tuple[str, int, int], ...]

    @property
    def quantized(self) -> bool:
        return self.transfer is not self.compute


def plan_packed(tensors: list[tuple[str, torch.Tensor]], quant: str | None, group_size: int) -> PackedLayer:
    """Lay a layer out for transfer and compute from shapes alone (tensors may be on `meta`)."""
    compute = plan_layout(tensors)
    if quant is None:
        return PackedLayer(compute, compute, tuple(("raw", i, -1) for i in range(len(tensors))))
    items, recipe = _transfer_items(tensors, quant, group_size, materialize=False)
    return PackedLayer(compute, plan_layout(items), recipe)


def _transfer_items(
    tensors: list[tuple[str, torch.Tensor]],
    quant: str,
    group_size: int,
    materialize: bool,
    quantize_device: torch.device | None = None,
) -> tuple[list[tuple[str, torch.Tensor]], tuple[tuple[str, int, int], ...]]:
    items: list[tuple[str, torch.Tensor]] = []
    recipe = []
    for name, t in tensors:
        if not quantization.eligible(t):
            recipe.append(("raw", len(items), -1))
            items.append((name, t))
            continue
        if materialize:
            q, scale = quantization.quantize(t, quant, group_size, device=quantize_device)
        else:
            (q_shape, q_dtype), (s_shape, s_dtype) = quantization.packed_specs(tuple(t.shape), quant, group_size)
            q = torch.empty(q_shape, dtype=q_dtype, device="meta")
            scale = torch.empty(s_shape, dtype=s_dtype, device="meta")
        recipe.append((quant, len(items), len(items) + 1))
        items += [(name + ".q", q), (name + ".scale", scale)]
    return items, tuple(recipe)


def materialize(packed: PackedLayer, transfer_views: list[torch.Tensor], compute_views: list[torch.Tensor]) -> None:
    """Write a layer's weights into `compute_views` from its transfer bytes (dequantizing)."""
    for (mode, ti, si), dst in zip(packed.recipe, compute_views):
        if mode == "raw":
            if dst.data_ptr() != transfer_views[ti].data_ptr():
                dst.copy_(transfer_views[ti])
        else:
            quantization.dequantize_into(dst, transfer_views[ti], transfer_views[si], mode)


class HostStore:
    """Packed host buffers, one per FFN layer (page-locked when the compute device is CUDA).

    With `quant`, the buffers hold quantized weights: a quarter (int8 vs fp32) to an eighth of
    the bytes cross the link, and host memory shrinks by the same factor.
    """

    def __init__(
        self,
        pin_memory: bool,
        quant: str | None = None,
        group_size: int = DEFAULT_QUANT_GROUP_SIZE,
        quantize_device: torch.device | None = None,
    ) -> None:
        """quantize_device: where `quant`'s arithmetic runs (the results always live here, on
        the host); the engine names its CUDA device, since the int4 code search is slow on a few
        CPU cores."""
        map_large_allocations()  # units and packing temporaries must not fragment the heap (os_memory)
        self.pin_memory = pin_memory
        self.quant = quant
        self.group_size = group_size
        self.quantize_device = quantize_device
        self.layers: list[PackedLayer] = []
        self.buffers: list[torch.Tensor | None] = []
        self._registered: set[int] = set()  # data_ptrs we page-locked and must unlock
        self._warned_fallback = False  # page-locking failed once: said so (once per store)
        #: the store's file (`use_file`): read from when it matched, else written as units are packed
        self.file: StoreFile | None = None
        self._file_hit = False
        #: the disk tier (`use_disk_tier`): units live in the store's file, mapped, within a budget
        self.tier: DiskTier | None = None

    def use_disk_tier(self, budget: int, ahead: Callable[[int], Sequence[int]] | None = None) -> None:
        """Keep this store in its file (`use_file` must follow, before any unit is added): units
        written as packed and dropped from memory, mapped back when the file is complete, their
        resident set bounded by `budget` bytes (`disk_tier`)."""
        assert not self.layers and not self.pin_memory
        self.tier = DiskTier(budget, ahead)

    def source(self, i: int) -> torch.Tensor:
        """Unit i's host buffer, about to be read by a transfer (the disk tier reads ahead and
        pages out around it)."""
        if self.tier is not None:
            self.tier.use(i, self.buffers)
        return self.buffers[i]  # type: ignore[return-value]

    def use_file(self, directory: Path, kind: str, units: Iterable[list[tuple[str, torch.Tensor]]]) -> bool:
        """Back this quantized store by a file in `directory` before any unit is added (`units`:
        every unit's tensors, in the order `add_layer` will get them; read once, for the key):
        map it when one holds exactly these units, else write one as they are packed (`finish`
        publishes it). Whether it matched."""
        assert not self.layers and (self.quant is not None or self.tier is not None)
        nbytes: list[int] = []

        def sized() -> Iterator[list[tuple[str, torch.Tensor]]]:
            for unit in units:
                nbytes.append(plan_packed(unit, self.quant, self.group_size).transfer.nbytes)
                yield unit

        key = store_key(kind, self.quant, self.group_size, sized())
        self.file = StoreFile(directory, key, f"the {self.quant} {kind} store")
        self._file_hit = self.file.open(nbytes)
        return self._file_hit

    @property
    def writing_file(self) -> bool:
        """Whether `finish` will write the store's file (it did not match, and is being filled)."""
        return self.file is not None and not self._file_hit

    def packing_phase(self, what: str) -> str:
        """What adding the units does, for progress: read from the file, quantize, or copy."""
        if self._file_hit:
            return f"reading {what} from the {self.quant} store file"
        return f"quantizing {what} to {self.quant}" if self.quant else f"packing {what} into the host store"

    def finish(self) -> None:
        """The units `use_file` named are all added: publish the store's file if this attach wrote
        it (with the disk tier: and map every unit back from it). Units added later (the host
        placement's split shares) are packed as usual, unfiled."""
        if self.file is not None and not self._file_hit:
            self.file.commit()
            if self.tier is not None:
                self._check_written()
                self.file.map_written()
                for i in range(len(self.buffers)):
                    self.buffers[i] = self.file.unit(i)
        if self.file is not None and self.tier is not None:
            self.tier.region = self.file.mapped
        self.file, self._file_hit = None, False

    def _check_written(self) -> None:
        if self.file is not None and self.file.failed:
            raise StoreWriteError(
                f"host_budget keeps the host store on disk, but writing it to {self.file.directory} failed (see the "
                f"log line above): free space there, point store_cache elsewhere, or raise host_budget above the "
                f"store's size"
            )

    @property
    def layouts(self) -> list[LayerLayout]:
        """Compute layouts, one per layer (what parameters look like when bound)."""
        return [p.compute for p in self.layers]

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if not self.pin_memory:
            return torch.empty(nbytes, dtype=torch.uint8)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if not nbytes:
            return buffer
        rc = _page_lock(buffer)
        if rc == 0:
            self._registered.add(buffer.data_ptr())
            return buffer
        # Fall back to PyTorch's pinned allocator (correct, but see `_page_lock` on its rounding),
        # and to pageable memory when that fails too (copies from it are synchronous).
        try:
            pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            fallback = "PyTorch's pinned allocator, which rounds each buffer up to a power of two"
        except RuntimeError as exc:
            from .transfer import clear_cuda_error

            clear_cuda_error()  # as in `_page_lock`: do not fail the next launch
            pinned = buffer
            fallback = f"pageable memory, since the pinned allocator failed too ({exc}); copies are synchronous"
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(
                f"torus-sparse: page-locking the host store failed (cudaHostRegister returned cudaError {rc}); "
                f"it falls back to {fallback}",
                RuntimeWarning,
                stacklevel=3,
            )
        return pinned

    def add_layer(self, tensors: list[tuple[str, torch.Tensor]]) -> tuple[PackedLayer, torch.Tensor]:
        """Pack (and maybe quantize) one layer's tensors into a new buffer; the caller then drops
        the originals. Only this one layer's worth of extra host memory exists meanwhile."""
        if self._file_hit:
            return self._add_from_file(tensors)
        if self.quant is None:
            packed = plan_packed(tensors, None, self.group_size)
            items = tensors
        else:
            items, recipe = _transfer_items(
                tensors, self.quant, self.group_size, materialize=True, quantize_device=self.quantize_device
            )
            packed = PackedLayer(plan_layout(tensors), plan_layout(items), recipe)
        buffer = self._allocate(packed.transfer.nbytes)
        for view, (_, t) in zip(packed.transfer.views(buffer), items):
            view.copy_(t)
        if self.file is not None:
            self.file.append(buffer)
        self.layers.append(packed)
        if self.tier is not None:
            # On disk only: the caller uses this buffer and drops it; `finish` maps the file back.
            self._check_written()
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        else:
            self.buffers.append(buffer)
        return packed, buffer

    def _add_from_file(self, tensors: list[tuple[str, torch.Tensor]]) -> tuple[PackedLayer, torch.Tensor]:
        """The next unit as the store's file holds it: mapped (file-backed pages, read on first
        use), or copied into page-locked memory when the store is pinned."""
        assert self.file is not None
        packed = plan_packed(tensors, self.quant, self.group_size)
        mapped = self.file.unit(len(self.layers))
        buffer = mapped
        if self.pin_memory:
            buffer = self._allocate(mapped.numel())
            buffer.copy_(mapped)
        self.layers.append(packed)
        self.buffers.append(buffer)
        return packed, buffer

    def weights(self, layer: int, buffer: torch.Tensor, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Fresh, independent tensors holding a layer's weights (dequantized) on `device`."""
        packed = self.layers[layer]
        out = [torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device=device) for t in packed.compute.tensors]
        src = [v.to(device) for v in packed.transfer.views(buffer)]
        materialize(packed, src, out)
        return out

    def drop(self, layer: int) -> None:
        """Free a layer's host buffer (its weights now live elsewhere, e.g. resident on the device)."""
        buffer = self.buffers[layer]
        self.buffers[layer] = None
        if buffer is not None and buffer.data_ptr() in self._registered:
            # Unlock before the memory can return to the allocator: freeing registered memory
            # leaves the driver with a stale mapping.
            self._registered.discard(buffer.data_ptr())
            _page_unlock(buffer.data_ptr())

    def close(self) -> None:
        """Drop every buffer (unlocking page-locked ones)."""
        for i in range(len(self.buffers)):
            self.drop(i)

    def __del__(self) -> None:
        if getattr(self, "_registered", None):
            self.close()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers if b is not None)
