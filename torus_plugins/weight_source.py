"""Where an FFN weight comes from when the model holds none: a checkpoint read one tensor at a time.

A model built with its FFN (and routed-expert) parameters on the `meta` device holds no FFN bytes
at all. Attach then reads each parameter -- or each routed expert's slice of a fused experts
parameter -- from a `WeightSource` just before packing it into the host store, and lets it go
right after. So host memory never holds the full-precision FFN weights beside the (quantized)
store: what a 30B MoE needs to load in int4 on a machine with less RAM than its bf16 checkpoint.

The source is keyed by the parameter's qualified name in the model (`model.named_parameters()`),
like accelerate's offload maps (a `Mapping` of names to tensors), so storage stays decoupled from
movement; the adapter that loads checkpoints provides one (the core reads no file format).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .errors import IncompatibleModelError

#: The attribute a loader sets on a model it built with empty FFN parameters (`attach` finds the
#: source there when none is passed explicitly).
SOURCE_ATTR = "_torus_weight_source"


@runtime_checkable
class WeightSource(Protocol):
    """Reads the FFN parameters a model was built without."""

    def provides(self, name: str) -> bool:
        """Whether this source holds the parameter `name` (its qualified name in the model)."""
        ...

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The parameter `name` on the CPU, in the model's dtype for it, with the shape and values it
        would have after a normal load; with `index`, only its `index`-th slice along dim 0 (one
        routed expert of a fused experts parameter). Each call returns a new tensor (file-backed where
        the format allows) that the caller drops when done."""
        ...


def source_of(model: nn.Module, weights: WeightSource | None) -> WeightSource | None:
    """`weights`, else the source a loader left on `model`, else None."""
    return weights if weights is not None else model.__dict__.get(SOURCE_ATTR)


class ParamReader:
    """Reads FFN parameters for attach: a loaded parameter's own data, an empty (`meta`) one's from
    the model's weight source."""

    def __init__(self, model: nn.Module, weights: WeightSource | None) -> None:
        self.weights = weights
        #: the parameters the model was built without (still read from the source once `unmeta`
        #: has given them a placeholder)
        self._empty = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}

    def __call__(self, p: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if id(p) not in self._empty:
            return p.data if index is None else p.data[index]
        assert self.weights is not None  # attach refused empty parameters no source provides
        name = self._empty[id(p)]
        t = self.weights.read(name, index)
        expected = tuple(p.shape) if index is None else tuple(p.shape[1:])
        if tuple(t.shape) != expected or t.dtype != p.dtype:
            raise IncompatibleModelError(
                f"the weight source gave {name}{'' if index is None else f'[{index}]'} as "
                f"{tuple(t.shape)} {t.dtype}, but the model's parameter is {expected} {p.dtype}"
            )
        return t


def unmeta(p: nn.Parameter, device: torch.device) -> None:
    """Give an empty (`meta`) parameter a memory-free placeholder on `device`, keeping its identity
    (hooks and the engine's lists hold the object): `p.data = ...` cannot move a tensor off `meta`."""
    if p.is_meta:
        placeholder = torch.zeros((), dtype=p.dtype, device=device).expand(p.shape)
        torch.utils.swap_tensors(p, nn.Parameter(placeholder, requires_grad=p.requires_grad))
