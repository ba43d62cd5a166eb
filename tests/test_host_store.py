"""The host store: packed, aligned layer buffers whose typed views give back the exact weights."""

from __future__ import annotations

import pytest
import torch

from torus_plugins.host_store import ALIGN, HostStore, LayerLayout, PackedLayer, plan_layout


def _compute(added: tuple[PackedLayer, torch.Tensor]) -> tuple[LayerLayout, torch.Tensor]:
    """add_layer's (packed layer, buffer) as (layout, buffer); unquantized, both layouts agree."""
    packed, buffer = added
    assert packed.transfer is packed.compute and not packed.quantized
    return packed.compute, buffer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().view(torch.uint8)


def _mixed_layer() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    fp32 = torch.randn(3, 5, generator=g)
    fp32[0, 0] = float("nan")
    fp32[0, 1] = -0.0
    fp32[0, 2] = float("inf")
    bf16 = torch.randn(7, 3, generator=g).to(torch.bfloat16)
    int8 = torch.randint(-128, 128, (11,), dtype=torch.int8, generator=g)
    fp16 = torch.randn(2, 2, 2, generator=g).to(torch.float16)
    transposed = torch.randn(6, 9, generator=g).t()  # dense but not contiguous
    bias = torch.randn(1, generator=g)
    return [
        ("up.weight", fp32),
        ("gate.weight", bf16),
        ("q.int8", int8),
        ("x.fp16", fp16),
        ("down.weight", transposed),
        ("down.bias", bias),
    ]


def test_layout_is_aligned_ordered_and_non_overlapping():
    tensors = _mixed_layer()
    layout = plan_layout(tensors)

    assert [t.name for t in layout.tensors] == [n for n, _ in tensors]
    assert layout.nbytes % ALIGN == 0
    end = 0
    for entry, (_, t) in zip(layout.tensors, tensors):
        assert entry.offset % ALIGN == 0, entry.name
        assert entry.offset >= end, f"{entry.name} overlaps its predecessor"
        # Packed tightly: the next aligned offset after the previous tensor, no wasted block.
        assert entry.offset == -(-end // ALIGN) * ALIGN
        assert entry.nbytes == t.numel() * t.element_size()
        assert (entry.dtype, entry.shape) == (t.dtype, tuple(t.shape))
        end = entry.offset + entry.nbytes
    assert end <= layout.nbytes < end + ALIGN


def test_align_is_a_sane_power_of_two():
    assert ALIGN >= 16 and ALIGN & (ALIGN - 1) == 0


def test_views_round_trip_bitwise_for_mixed_dtypes():
    tensors = _mixed_layer()
    store = HostStore(pin_memory=False)
    layout, buffer = _compute(store.add_layer(tensors))

    assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.numel() == layout.nbytes
    views = layout.views(buffer)
    assert len(views) == len(tensors)
    for view, (name, t) in zip(views, tensors):
        assert view.dtype == t.dtype, name
        assert view.shape == t.shape, name
        assert torch.equal(_bits(view), _bits(t)), name
        # A view, not a copy: it lives inside the buffer at its planned offset.
        entry = next(e for e in layout.tensors if e.name == name)
        assert view.data_ptr() == buffer.data_ptr() + entry.offset, name
        assert view.data_ptr() % ALIGN == buffer.data_ptr() % ALIGN


def test_views_alias_the_buffer():
    store = HostStore(pin_memory=False)
    layout, buffer = _compute(store.add_layer([("w", torch.ones(4, 4))]))
    (view,) = layout.views(buffer)
    buffer.zero_()
    assert torch.equal(view, torch.zeros(4, 4))


def test_transposed_weight_keeps_its_strides():
    w = torch.arange(6 * 9, dtype=torch.float32).reshape(6, 9).t()
    assert not w.is_contiguous() and w.stride() == (1, 9)

    layout, buffer = _compute(HostStore(pin_memory=False).add_layer([("w", w)]))
    (entry,) = layout.tensors
    (view,) = layout.views(buffer)

    assert entry.stride == (1, 9)
    assert view.stride() == w.stride() and not view.is_contiguous()
    assert torch.equal(view, w)
    # The math sees the same layout, so it gives the same bits.
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x @ view.t(), x @ w.t())


def test_tensors_with_gaps_or_overlaps_are_stored_contiguous():
    base = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    gappy = base[:, ::2]  # every other column: holes in the storage
    overlapping = torch.randn(5).expand(3, 5)  # stride 0: elements share storage
    tensors = [("gappy", gappy), ("overlapping", overlapping)]

    layout, buffer = _compute(HostStore(pin_memory=False).add_layer(tensors))

    for entry, view, (name, t) in zip(layout.tensors, layout.views(buffer), tensors):
        assert entry.stride == torch.empty(t.shape).stride(), name
        assert view.is_contiguous(), name
        assert entry.nbytes == t.numel() * t.element_size(), name
        assert torch.equal(view, t), name


def test_a_layout_works_on_any_buffer_at_least_nbytes_long():
    # Slots are sized for the largest layer: a smaller layer's layout must work on a bigger buffer.
    tensors = _mixed_layer()
    layout, host = _compute(HostStore(pin_memory=False).add_layer(tensors))
    slot = torch.full((layout.nbytes + 3 * ALIGN,), 0xAB, dtype=torch.uint8)
    slot[: layout.nbytes].copy_(host)
    for view, (name, t) in zip(layout.views(slot), tensors):
        assert torch.equal(_bits(view), _bits(t)), name
        assert view.stride() == t.stride(), name  # every tensor here is dense


def test_empty_and_scalar_tensors():
    tensors = [("empty", torch.empty(0, 3)), ("scalar", torch.tensor(2.5)), ("after", torch.arange(3.0))]
    layout, buffer = _compute(HostStore(pin_memory=False).add_layer(tensors))
    empty, scalar, after = layout.views(buffer)
    assert empty.shape == (0, 3)
    assert scalar.shape == () and scalar.item() == 2.5
    assert torch.equal(after, torch.arange(3.0))


def test_store_buffers_are_not_pinned_on_cpu_and_drop_frees_them():
    store = HostStore(pin_memory=False)
    sizes = []
    for i in range(3):
        layout, buffer = _compute(store.add_layer([("w", torch.full((8, 8), float(i)))]))
        assert not buffer.is_pinned()
        sizes.append(layout.nbytes)

    assert len(store.layouts) == len(store.buffers) == 3
    assert all(isinstance(layout, LayerLayout) for layout in store.layouts)
    assert store.nbytes == sum(sizes)
    store.drop(1)
    assert store.buffers[1] is None
    assert store.nbytes == sizes[0] + sizes[2]
    assert len(store.layouts) == 3  # the layout stays: resident copies are still read through it
    assert torch.equal(store.layouts[2].views(store.buffers[2])[0], torch.full((8, 8), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_store_buffers_are_pinned_when_asked_on_cuda():
    _, buffer = _compute(HostStore(pin_memory=True).add_layer([("w", torch.ones(4))]))
    assert buffer.is_pinned()
