"""The expert cache's eviction (`moe/cache.py`): heaps and a recency order instead of a scan of
the slots, choosing exactly what comparing every slot's key chooses."""

from __future__ import annotations

import random

import pytest
import torch

from torus_plugins.host_store import HostStore
from torus_plugins.moe.cache import ExpertCache, ExpertCachePlan, ExpertRing

LAYERS, EXPERTS, SLOTS = 3, 8, 10


def _scan_victim(ring: ExpertRing, keep, active):
    """The former victim(): every slot's key compared (the reference the heaps must equal)."""
    best, best_key = None, None
    n, cur = ring._n_layers, ring.current
    for s in ring.slots:
        if s is active or (s.layer is not None and s.layer in keep):
            continue
        if s.layer is None:
            return s
        if ring.policy == "lru":
            key = (s.last_used,)
        elif ring.policy == "next-use":
            ahead = (ring._unit_layer[s.layer] - cur) % n or n
            key = (-ahead, ring._freq[s.layer], s.last_used)
        else:
            key = (ring._freq[s.layer], s.last_used)
        if best is None or key < best_key:
            best, best_key = s, key
    return best


@pytest.fixture(scope="module")
def units():
    store = HostStore(pin_memory=False)
    for u in range(LAYERS * EXPERTS):
        store.add_layer([(f"experts.{u}.w", torch.zeros(2, 2))])
    return store


@pytest.mark.parametrize("policy", ["lru", "lfu", "next-use"])
@pytest.mark.parametrize("seed", range(4))
def test_victim_equals_the_scan_of_every_slot(units, policy: str, seed: int) -> None:
    """Random loads, hits, routings, forgotten slots, protected sets and active slots: at every
    step the victim is the slot the full scan picks (ties included)."""
    rng = random.Random(seed)
    unit_layer = [u // EXPERTS for u in range(LAYERS * EXPERTS)]
    plan = ExpertCachePlan(SLOTS, 16, "shared", LAYERS, LAYERS * EXPERTS, 4)
    cache = ExpertCache(
        plan, [torch.zeros(16, dtype=torch.uint8) for _ in range(SLOTS)], units.layers, policy, unit_layer
    )
    ring = cache.ring(0)
    for step in range(600):
        j = step % LAYERS
        cache.enter(j)
        routed = rng.sample(range(j * EXPERTS, (j + 1) * EXPERTS), 3)
        for u in routed:
            cache.routed(u, j)
        keep = set(routed) | set(rng.sample(range(LAYERS * EXPERTS), rng.randint(0, 4)))
        active = rng.choice(ring.slots) if rng.random() < 0.3 else None
        want = _scan_victim(ring, keep, active)
        got = ring.victim(keep, active)
        assert got is want, (step, policy)
        for u in routed:
            slot = ring.find(u)
            if slot is None:
                slot = ring.victim(set(routed), None)
                if slot is None:
                    continue
                ring.assign(slot, u, ready=None)
            if rng.random() < 0.9:
                ring.touch(slot)
        if rng.random() < 0.05:
            occupied = [s for s in ring.slots if s.layer is not None]
            if occupied:
                ring.forget(rng.choice(occupied))
    assert any(s.layer is not None for s in ring.slots)


def test_stale_heap_entries_are_compacted(units) -> None:
    """Every hit pushes a heap entry; the heap is rebuilt from live slots before it outgrows a few
    entries per slot."""
    plan = ExpertCachePlan(4, 16, "shared", 1, EXPERTS, 1)
    cache = ExpertCache(plan, [torch.zeros(16, dtype=torch.uint8) for _ in range(4)], units.layers[:EXPERTS], "lfu")
    ring = cache.ring(0)
    for u, slot in enumerate(ring.slots):
        ring.assign(slot, u, ready=None)
    for _ in range(1000):
        for slot in ring.slots:
            ring.touch(slot)
    assert len(ring._heaps[0]) <= 4 * len(ring.slots) + 64 + 1
