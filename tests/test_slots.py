"""The slot ring: which slot is refilled next, and the layer ↔ slot bookkeeping."""

from __future__ import annotations

import pytest
import torch

from torus_plugins.host_store import HostStore
from torus_plugins.slots import SlotRing


@pytest.fixture
def store() -> HostStore:
    """Four layers of different dtypes and shapes, as the ring would see them."""
    s = HostStore(pin_memory=False)
    for i in range(4):
        s.add_layer([("w", torch.full((4, 4), float(i))), ("b", torch.arange(4, dtype=torch.int8) + i)])
    return s


def _ring(store: HostStore, n: int = 3) -> SlotRing:
    size = max(layout.nbytes for layout in store.layouts)
    return SlotRing([torch.zeros(size, dtype=torch.uint8) for _ in range(n)], store.layers)


def _fill(ring: SlotRing, layers: list[int]) -> None:
    """Assign `layers` to slots 0.. in order, touching each in that order (so slot 0 is LRU)."""
    for slot, layer in zip(ring.slots, layers):
        ring.assign(slot, layer, ready=None)
        ring.touch(slot)


def test_a_new_ring_is_empty(store):
    ring = _ring(store)
    assert len(ring) == 3
    assert [s.index for s in ring.slots] == [0, 1, 2]
    assert all(s.layer is None for s in ring.slots)
    assert all(ring.find(layer) is None for layer in range(4))


def test_victim_prefers_empty_slots_in_order(store):
    ring = _ring(store)
    assert ring.victim((), None) is ring.slots[0]
    ring.assign(ring.slots[0], 2, ready=None)
    assert ring.victim((), None) is ring.slots[1]
    # An empty slot wins even over a slot that was used long ago.
    ring.touch(ring.slots[0])
    ring.assign(ring.slots[1], 3, ready=None)
    ring.touch(ring.slots[1])
    assert ring.victim((), None) is ring.slots[2]


def test_an_emptied_slot_wins_over_an_older_full_one(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    ring.forget(ring.slots[2])  # the most recently used slot, now empty
    assert ring.victim((), None) is ring.slots[2]


def test_victim_is_least_recently_used_when_all_are_full(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    assert ring.victim((), None) is ring.slots[0]
    ring.touch(ring.slots[0])
    assert ring.victim((), None) is ring.slots[1]
    ring.touch(ring.slots[1])
    assert ring.victim((), None) is ring.slots[2]


def test_victim_skips_the_active_slot(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    assert ring.victim((), ring.slots[0]) is ring.slots[1]
    # An active slot is protected even when it is the only empty one.
    ring.forget(ring.slots[1])
    assert ring.victim((), ring.slots[1]) is ring.slots[0]


def test_victim_skips_kept_layers(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    assert ring.victim({0}, None) is ring.slots[1]
    assert ring.victim((0, 1), None) is ring.slots[2]
    assert ring.victim(frozenset({0, 2}), None) is ring.slots[1]
    # Keeping a layer that is not in the ring protects nothing.
    assert ring.victim({3}, None) is ring.slots[0]


def test_victim_is_none_when_every_slot_is_protected(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    assert ring.victim({0, 1, 2}, None) is None
    assert ring.victim({1, 2}, ring.slots[0]) is None
    assert _ring(store, n=0).victim((), None) is None


def test_assign_find_and_reassign(store):
    ring = _ring(store)
    slot = ring.slots[1]
    fence = object()
    ring.assign(slot, 3, ready=fence)
    assert ring.find(3) is slot
    assert (slot.layer, slot.ready, slot.used_since_load) == (3, fence, False)

    ring.touch(slot)
    assert slot.used_since_load and slot.last_used > 0

    # Reusing the slot for another layer forgets the old one and resets the per-load state.
    ring.assign(slot, 0, ready=None)
    assert ring.find(3) is None
    assert ring.find(0) is slot
    assert (slot.layer, slot.ready, slot.used_since_load) == (0, None, False)


def test_touch_orders_slots_by_a_monotonic_clock(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    stamps = [s.last_used for s in ring.slots]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    ring.touch(ring.slots[0])
    assert ring.slots[0].last_used > max(stamps)


def test_forget_and_clear(store):
    ring = _ring(store)
    _fill(ring, [0, 1, 2])
    ring.slots[1].ready = object()

    ring.forget(ring.slots[1])
    assert ring.find(1) is None
    assert ring.slots[1].layer is None and ring.slots[1].ready is None
    assert ring.find(0) is ring.slots[0] and ring.find(2) is ring.slots[2]
    ring.forget(ring.slots[1])  # forgetting an empty slot is harmless
    assert ring.find(0) is ring.slots[0]

    ring.clear()
    assert all(s.layer is None and s.ready is None for s in ring.slots)
    assert all(ring.find(layer) is None for layer in range(4))
    assert ring.victim((), None) is ring.slots[0]


def test_views_use_the_layer_layout_and_are_cached(store):
    ring = _ring(store)
    slot = ring.slots[0]
    slot.buffer[: store.layouts[2].nbytes].copy_(store.buffers[2])
    ring.assign(slot, 2, ready=None)

    w, b = ring.views(slot, 2).bind
    assert torch.equal(w, torch.full((4, 4), 2.0))
    assert torch.equal(b, torch.arange(4, dtype=torch.int8) + 2)
    assert w.data_ptr() == slot.buffer.data_ptr()  # a view of the slot, not a copy
    assert ring.views(slot, 2) is ring.views(slot, 2)  # built once per (slot, layer)

    # The cached views follow the slot's bytes when a new copy lands.
    slot.buffer[: store.layouts[3].nbytes].copy_(store.buffers[3])
    assert torch.equal(w, torch.full((4, 4), 3.0))


def test_units_with_one_layout_share_a_slots_views(store):
    """Every expert of a MoE layer has the same layout: a slot builds their views once, whichever
    of them lands (views follow the bytes, not the unit or the tensors' names)."""
    many = HostStore(pin_memory=False)
    for i in range(5):
        many.add_layer([(f"experts.{i}.w", torch.full((2, 2), float(i)))])
    ring = SlotRing([torch.zeros(many.layouts[0].nbytes, dtype=torch.uint8)], many.layers)
    slot = ring.slots[0]
    first = None
    for i in range(len(many.layers)):
        slot.buffer.copy_(many.buffers[i])
        ring.assign(slot, i, ready=None)
        views = ring.views(slot, i)
        first = first or views
        assert views is first and torch.equal(views.bind[0], torch.full((2, 2), float(i)))
    assert len(slot.views) == 1


def test_view_cache_is_bounded_per_slot(store):
    """An expert cache may land every unit in every slot: the cache keeps the latest layouts only."""
    from torus_plugins.slots import VIEWS_PER_SLOT

    many = HostStore(pin_memory=False)
    for i in range(VIEWS_PER_SLOT * 3):
        many.add_layer([("w", torch.full((2, i + 1), float(i)))])  # a layout per unit
    ring = SlotRing([torch.zeros(max(x.nbytes for x in many.layouts), dtype=torch.uint8)], many.layers)
    slot = ring.slots[0]
    for i in range(len(many.layers)):
        slot.buffer[: many.buffers[i].numel()].copy_(many.buffers[i])
        ring.assign(slot, i, ready=None)
        (w,) = ring.views(slot, i).bind
        assert torch.equal(w, torch.full((2, i + 1), float(i)))
        assert len(slot.views) <= VIEWS_PER_SLOT
    assert set(slot.views) == set(range(len(many.layers) - VIEWS_PER_SLOT, len(many.layers)))


def test_views_built_in_inference_mode_are_normal_tensors(store):
    ring = _ring(store)
    slot = ring.slots[0]
    with torch.inference_mode():
        w, _ = ring.views(slot, 1).bind
    assert not w.is_inference()
    w.add_(0)  # writable outside inference mode (dequantization writes into such views)
