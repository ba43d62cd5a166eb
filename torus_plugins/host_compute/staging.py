"""How a host-computed layer's hidden states cross between the device and the host.

A host pass needs the layer's input on the host: that is one host sync per layer, and the only
one (`to_host`: a non_blocking copy into a page-locked staging buffer, an event recorded after
it, `wait_host` on that event). The host's result goes back without any (`to_device`: written into
a page-locked buffer, then a non_blocking copy on the compute stream, which orders every later
kernel after it). Pageable memory would make the copy back synchronous for the host.

Why one buffer each way is enough: before the host writes the output buffer again (the next
host layer of this thread), that layer's `to_host` has waited for an event recorded after its
input, which the compute stream produced after the previous copy back. So the previous copy has
finished reading the buffer; `to_device` checks that (`Event.query`) and would wait for it,
named, if it ever had not. Buffers are per thread (two threads may each run a pass).

An MoE layer's host experts need no wait of their own: `stage` queues their inputs' copies before
the layer's read of its routed ids, whose sync completes them.

On a CPU device nothing crosses: both calls hand the tensor through, and `to_host` still calls
`wait_host` (a no-op there) so that the census counts the sync a GPU would make where it happens.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


def wait_host(event: Any) -> None:
    """The host waits for the device up to `event` (None: a CPU device, nothing to wait for). The
    one host sync of a host-computed layer; benchmarks/census.py counts the calls."""
    if event is not None:
        event.synchronize()


class Staging:
    """Page-locked staging buffers of one engine's host placement (per thread, grown on demand)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.accelerator = device.type != "cpu"
        self._local = threading.local()

    def _buffers(self) -> Any:
        b = self._local
        if not hasattr(b, "inp"):
            b.inp = None
            b.out = {}  # key -> (page-locked buffer, event recorded after its last copy)
            b.staged = {}
        return b

    def stage(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Start copying `tensors` to page-locked host buffers (one per position) and return them,
        without waiting: the caller's next host sync on the compute stream (an MoE layer's read of
        its routed ids) completes these copies too, being queued after them. Read them only after
        that sync. On a CPU device the tensors themselves."""
        if not self.accelerator:
            return list(tensors)
        b = self._buffers()
        out = []
        for k, t in enumerate(tensors):
            buf = b.staged[k] = self._fit(b.staged.get(k), t)
            view = buf[: t.numel()].view(t.shape)
            view.copy_(t, non_blocking=True)
            out.append(view)
        return out

    def _fit(self, buf: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """A page-locked host buffer of at least `like`'s elements and dtype: `buf` when it holds
        them. Where page-locking fails the buffer is pageable (correct; the copy back then waits)."""
        n = like.numel()
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            try:
                buf = torch.empty(max(n, 1), dtype=like.dtype, pin_memory=True)
            except RuntimeError:
                buf = torch.empty(max(n, 1), dtype=like.dtype)
        return buf

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """`x`'s values on the host, after the device has produced them (the layer's one sync)."""
        if not self.accelerator:
            wait_host(None)
            return x
        b = self._buffers()
        b.inp = self._fit(b.inp, x)
        xh = b.inp[: x.numel()].view(x.shape)
        xh.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        wait_host(done)
        return xh

    def to_device(self, yh: torch.Tensor, key: str = "out") -> torch.Tensor:
        """The host's result on the device, copied without a host sync (ordered on the compute
        stream before whatever reads it). `key` names the page-locked buffer (one per key and
        thread): tensors sent in one layer need distinct keys, as the first copy may still be
        queued when the second buffer is written."""
        if not self.accelerator:
            return yh
        b = self._buffers()
        buf, event = b.out.get(key, (None, None)) if b.out else (None, None)
        if event is not None and not event.query():
            wait_host(event)  # never expected: the next host sync already ordered the last copy
        buf = self._fit(buf, yh)
        staged = buf[: yh.numel()].view(yh.shape)
        staged.copy_(yh)  # host memory to host memory
        y = torch.empty(yh.shape, dtype=yh.dtype, device=self.device)
        y.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        b.out = b.out or {}
        b.out[key] = (buf, event)
        return y
