"""The disk tier: a host store kept in its file, memory-mapped, with a bounded resident set.

A store larger than host RAM (or than the memory a user gives it, `TorusConfig.host_budget`) cannot
live in anonymous memory. Its units are written to the store's file as they are packed and mapped
from it: the operating system pages them in when a transfer reads them. Left to itself it would
keep every page it ever read until memory runs out and then evict by its own guess; two things
make it behave:

- read-ahead: when a unit is about to stream, the next units it will need are requested with
  MADV_WILLNEED, so the disk read overlaps the current transfer and compute instead of stalling;
- a resident budget: units are paged out (MADV_PAGEOUT) oldest-first once the resident units
  exceed the budget, so the process stays within it and the pages it keeps are the likely ones.
  A page fault also maps neighbouring pages that happen to be cached ("fault-around"), which no
  unit accounts for: every so many page-outs the whole mapping but the kept units is swept.

The ring's own buffers are separate memory; this bounds only the mapped store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from .os_memory import release_pages, release_range, will_need


class DiskTier:
    """Resident-set bookkeeping for one mapped store (`HostStore.buffers`)."""

    def __init__(self, budget: int, ahead: Callable[[int], Sequence[int]] | None = None) -> None:
        """budget: bytes of mapped units to keep resident; ahead(i): the units expected after i
        (read ahead when i is used; default: the next one)."""
        self.budget = budget
        self.ahead = ahead or (lambda i: (i + 1,))
        self._resident: OrderedDict[int, int] = OrderedDict()
        self.read_ahead = 0  # units requested ahead of use
        self.paged_out = 0  # units handed back to the OS over the budget
        #: the whole mapped file, once mapped (`HostStore.finish`): what a sweep pages out
        self.region: torch.Tensor | None = None
        self._since_sweep = 0

    @property
    def resident_bytes(self) -> int:
        return sum(self._resident.values())

    def use(self, i: int, buffers: Sequence[torch.Tensor | None]) -> None:
        """Unit i is about to be read: keep it (newest), read the next ones ahead, and page out the
        oldest units beyond the budget."""
        keep = {i}
        self._admit(i, buffers)
        for j in self.ahead(i):
            if 0 <= j < len(buffers) and buffers[j] is not None:
                if j not in self._resident:
                    will_need(buffers[j])  # type: ignore[arg-type]
                    self.read_ahead += 1
                self._admit(j, buffers)
                keep.add(j)
        self._trim(buffers, keep)

    def _admit(self, i: int, buffers: Sequence[torch.Tensor | None]) -> None:
        b = buffers[i]
        if b is not None:
            self._resident[i] = b.numel()
            self._resident.move_to_end(i)  # newest: the last to be paged out

    def _trim(self, buffers: Sequence[torch.Tensor | None], keep: set[int]) -> None:
        total = self.resident_bytes
        for j in list(self._resident):
            if total <= self.budget:
                break
            if j in keep:
                continue
            total -= self._resident.pop(j)
            b = buffers[j]
            if b is not None:
                release_pages(b, whole=True)  # units start on pages, padding after: all ours
                self.paged_out += 1
                self._since_sweep += 1
        if self.region is not None and self._since_sweep > max(8, len(self._resident)):
            self._sweep(buffers)

    def _sweep(self, buffers: Sequence[torch.Tensor | None]) -> None:
        """Page out the whole mapping except the kept units (amortized: after as many page-outs
        as units kept)."""
        assert self.region is not None
        self._since_sweep = 0
        kept = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for j in self._resident if (b := buffers[j]) is not None)
        cursor = self.region.data_ptr()
        for start, end in kept:
            release_range(cursor, start)
            cursor = max(cursor, end)
        release_range(cursor, self.region.data_ptr() + self.region.numel())


def plan_disk_tier(
    budget: int | None,
    dense_units: Sequence[int],
    expert_unit: int,
    experts: int,
    top_k: int,
    lookahead: int,
) -> tuple[int, int] | None:
    """Split `host_budget` between the dense FFN store and the expert store: (dense bytes, expert
    bytes), or None when there is no budget or both stores fit in it (nothing goes to disk).

    dense_units: transfer bytes of each streamed FFN layer; expert_unit: one expert's transfer
    bytes, `experts` of them in all, `top_k` routed per token in a layer. The minimum working set
    is what one step reads while the next is read ahead: `lookahead` + 1 dense layers, and two
    layers' routed experts.
    """
    if budget is None:
        return None
    dense_total, expert_total = sum(dense_units), expert_unit * experts
    if budget >= dense_total + expert_total:
        return None
    dense_min = (lookahead + 1) * max(dense_units, default=0)
    expert_min = 2 * top_k * expert_unit if experts else 0
    if budget < dense_min + expert_min:
        from .config import format_bytes as fmt_size
        from .errors import BudgetTooSmallError

        parts = []
        if dense_min:
            parts.append(f"{lookahead + 1} FFN layers of {fmt_size(max(dense_units))} (lookahead + 1)")
        if expert_min:
            parts.append(f"two layers' {top_k} routed experts of {fmt_size(expert_unit)}")
        raise BudgetTooSmallError(
            f"host_budget {fmt_size(budget)} is below the host store's minimum working set of "
            f"{fmt_size(dense_min + expert_min)} ({' and '.join(parts)}): raise host_budget to at least that",
            dense_min + expert_min,
        )
    # What is left over the minimums goes to each store in proportion to its size.
    spare = budget - dense_min - expert_min
    dense = dense_min + spare * dense_total // max(1, dense_total + expert_total)
    return dense, budget - dense
