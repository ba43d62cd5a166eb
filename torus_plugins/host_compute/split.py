"""Cutting a dense FFN along its intermediate dimension.

An FFN maps hidden size H to H through I intermediate neurons, and each neuron is independent up to
the output projection's sum: FFN(x) = Σ_neurons. So the first k neurons' rows of the input-side
weights (gate/up/fc1, [I, H] for `nn.Linear`, [H, I] for GPT-2's `Conv1D`) and the matching columns
of the output side ([H, I] / [I, H]), with the output bias in one share only, compute a partial FFN;
two shares sum to the whole (up to the order of the output reduction). Which dimension of a weight is
the intermediate one is read from shapes, so a square FFN (H == I) cannot be cut; the engine proves
every cut by running both shares against the whole layer before using it (`dense`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .kernels import HostComputeError


@dataclass(frozen=True)
class Cut:
    """How each parameter of one FFN layer is cut: `dims[p]` is the intermediate dimension of
    parameter p (0 or 1), or -1 for an output bias, which stays whole in the device share."""

    hidden: int
    intermediate: int
    dims: tuple[int, ...]

    def share(self, tensors: Sequence[torch.Tensor], start: int, stop: int, device_share: bool) -> list[torch.Tensor]:
        """Each parameter's slice for neurons [start, stop); the output bias is the whole bias in
        the device share and zeros in the host share (adding zeros is exact)."""
        out = []
        for t, d in zip(tensors, self.dims):
            if d == -1:
                out.append(t if device_share else torch.zeros_like(t, device="cpu"))
            elif d == 0:
                out.append(t[start:stop])
            else:
                out.append(t[:, start:stop])
        return out


def find_cut(shapes: Sequence[tuple[int, ...]], hidden: int) -> Cut:
    """The cut of a layer whose parameters have `shapes`, for hidden size `hidden`."""
    dims = [s for shape in shapes if len(shape) == 2 for s in shape]
    others = {d for d in dims if d != hidden}
    if len(others) != 1:
        raise HostComputeError(
            f"cannot tell the intermediate dimension of an FFN with parameter shapes {list(shapes)} "
            f"and hidden size {hidden}"
        )
    inter = others.pop()
    cut = []
    for shape in shapes:
        if len(shape) == 2 and shape[0] == inter and shape[1] == hidden:
            cut.append(0)
        elif len(shape) == 2 and shape[0] == hidden and shape[1] == inter:
            cut.append(1)
        elif len(shape) == 1 and shape[0] == inter:
            cut.append(0)
        elif len(shape) == 1 and shape[0] == hidden:
            cut.append(-1)
        else:
            raise HostComputeError(f"FFN parameter of shape {tuple(shape)} fits neither side of a {hidden}→{inter} FFN")
    return Cut(hidden, inter, tuple(cut))
