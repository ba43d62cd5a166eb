"""The prefetch seam: which streamed layers should be on their way to the device next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence


@dataclass(frozen=True)
class PrefetchContext:
    """What a policy knows when it is built for one attached model.

    streamed: FFN layer indices that stream, in execution order within one forward pass.
    n_slots: device slots in the ring (the most layers that can be on their way at once).
    lookahead: the configured lookahead.
    options: free-form settings from `TorusConfig.options`.
    """

    streamed: tuple[int, ...]
    n_slots: int
    lookahead: int
    options: dict[str, Any]


class PrefetchPolicy(Protocol):
    """Chooses the layers to have in flight. Called on the hot path: keep it cheap.

    `warmup()` is asked once after attach; `after(layer)` each time a streamed layer finishes.
    Both return layer indices in the order they will be needed, at most `n_slots` of them; the
    engine issues copies for those not already in a slot, nearest first, and never evicts a layer
    that is in the returned list.
    """

    def warmup(self) -> Sequence[int]: ...

    def after(self, layer: int) -> Sequence[int]: ...


PrefetchFactory = Callable[[PrefetchContext], PrefetchPolicy]
