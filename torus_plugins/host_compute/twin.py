"""A host twin of an FFN module: the same forward, its own parameter objects, no hooks.

The device share of a split layer computes through the model's module while the host share computes
at the same time on another thread; a module's parameters can point at one tensor at a time, so the
host share needs a module of its own. `copy.deepcopy` with the FFN parameters mapped to fresh,
empty parameters copies the module's code and small state (activation, config) and nothing heavy.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .kernels import HostComputeError

#: A twin may copy this many bytes of tensors that are not FFN parameters (buffers such as a
#: scale); more means the module references something big (the whole model, say).
MAX_COPIED_BYTES = 1 << 20


def host_twin(module: nn.Module, params: Sequence[nn.Parameter]) -> tuple[nn.Module, list[nn.Parameter]]:
    """(twin, its parameters in the order of `params`). Made before any hook is installed; hooks and
    instance-level `forward` overrides are dropped from the copy anyway."""
    fresh = [nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=False) for p in params]
    memo = {id(p): f for p, f in zip(params, fresh)}
    try:
        twin = copy.deepcopy(module, memo)
    except Exception as exc:  # a module holding an uncopyable object (a lock, a file, a C handle)
        raise HostComputeError(f"{type(module).__name__} cannot be copied for host compute: {exc}") from exc
    mapped = {id(f) for f in fresh}
    copied = sum(
        t.numel() * t.element_size() for t in list(twin.parameters()) + list(twin.buffers()) if id(t) not in mapped
    )
    if copied > MAX_COPIED_BYTES:
        raise HostComputeError(
            f"{type(module).__name__} holds {copied} bytes of tensors besides its FFN weights (a reference to "
            f"other modules?): it cannot be twinned for host compute; use host_compute='off'"
        )
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m.__dict__.pop("forward", None)
    twin.requires_grad_(False)
    return twin, fresh
