"""What keeps an attached model correct however it is called: threads, compilers, graph capture,
models that another library already hooked.

Concurrency contract: an attached model has one slot ring, one set of parameters that the hooks
rebind, and one set of counters. A forward pass of the model (and so every `generate()` step) runs
under the engine's `PassLock`: passes from different threads take turns, each one whole, so every
thread gets exactly what it would get alone. The lock wraps the `forward` of the model itself and
of each module around streamed weights (decoder layers, MoE blocks), so a direct call to a decoder
layer is serialised too. It is re-entrant (a nested call from the same thread never deadlocks) and
released in a `finally`, so a pass that raises (KeyboardInterrupt included) never wedges others.
Batching concurrent requests into one pass remains the server's job; the lock only makes separate
calls correct.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import IncompatibleModelError

if TYPE_CHECKING:
    from .weight_source import WeightSource


class PassLock:
    """A re-entrant lock held across one forward pass of an attached model.

    It also keeps backward correct: autograd saves the weights a layer computed with, and a
    streamed weight is a view of a slot that the next layers overwrite. During a grad-enabled
    pass, every tensor autograd saves whose memory is one of the `volatile` storages (the slots)
    is saved as a copy instead, so backward sees the weights the forward used. Passes without
    grad (inference mode, no_grad) pay nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # nesting of the holding thread (only it touches this)
        self._saved_hooks: Any = None
        #: storage data pointers of the device slots: memory that is reused between layers
        self.volatile: set[int] = set()

    def __enter__(self) -> "PassLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def install(self, modules: list[nn.Module]) -> list[ForwardOverride]:
        """Hold the lock around each module's `forward` (try/finally: released whatever the pass
        raises, KeyboardInterrupt included, which forward hooks would miss). Returns handles
        whose `remove()` puts the original `forward` back."""
        return [ForwardOverride(m, self._locked) for m in modules]

    def _locked(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self.enter()
        try:
            return inner(*args, **kwargs)
        finally:
            self.exit()

    def enter(self) -> None:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1 and self.volatile and torch.is_grad_enabled():
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._saved_hooks.__enter__()

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._saved_hooks is not None:
            hooks, self._saved_hooks = self._saved_hooks, None
            hooks.__exit__(None, None, None)
        self._lock.release()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            in_slot = t.untyped_storage().data_ptr() in self.volatile
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return t
        return t.detach().clone() if in_slot else t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class ForwardOverride:
    """`module.forward` replaced by fn(inner, *args, **kwargs), `inner` being the forward it
    replaced (an instance attribute, as accelerate's hooks do; `functools.wraps` keeps the
    signature `generate()` inspects). `remove()` puts the original back. The pass lock wraps
    forwards with it, and so does the host placement (`host_compute.dense`)."""

    def __init__(self, module: nn.Module, fn: Any) -> None:
        self.module = module
        self._had_own = "forward" in module.__dict__
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return fn(inner, *args, **kwargs)

        self.wrapper = forward
        module.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.wrapper:
            if self._had_own:
                self.module.forward = self.wrapper.__wrapped__  # type: ignore[attr-defined,method-assign]
            else:
                del self.module.forward


def lock_points(
    model: nn.Module, sites: list[tuple[nn.Module, nn.Module]], expert_modules: list[nn.Module]
) -> list[nn.Module]:
    """The modules whose forward holds the pass lock: the model; for each streamed site the
    closest module whose forward runs both its entry's pre-hook and its exit's hook (the parent of
    an FFN module, e.g. the decoder layer; the common ancestor of OPT's fc1 and fc2); each experts
    module (the MoE runner runs inside its forward). A direct call to the FFN module itself is the
    one call that takes no lock."""
    parents = {id(child): mod for mod in model.modules() for child in mod.children()}
    points: dict[int, nn.Module] = {id(model): model}
    for entry, exit_ in sites:
        chain, m = [], parents.get(id(entry))
        while m is not None:
            chain.append(m)
            m = parents.get(id(m))
        ancestors = {id(x) for x in chain}
        m = parents.get(id(exit_)) if entry is exit_ else exit_
        while m is not None and id(m) not in ancestors:
            m = parents.get(id(m))
        common = m if m is not None else model
        points.setdefault(id(common), common)
    for m in expert_modules:
        points.setdefault(id(m), m)
    return list(points.values())


def freeze_grads(params: list[nn.Parameter]) -> list[tuple[nn.Parameter, bool]]:
    """Make the engine's FFN weights not require grad while attached; returns what to restore.

    Autocast caches a cast copy of every weight that requires grad for its whole region: for
    streamed weights that would be a device copy of every layer, far past the budget. Gradients
    still reach the inputs, so backward works (see `PassLock`).
    """
    flags = [(p, p.requires_grad) for p in params]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags


def restore_grads(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def check_traceable_call(device: torch.device) -> None:
    """Refuse to run a streamed layer under `torch.compile` or CUDA-graph capture.

    Both record the tensors a layer reads once and replay them later; the engine rebinds a
    streamed parameter to a different slot on every pass, so a replay would compute from whatever
    that slot holds by then: wrong text, with no error. Called on the hot path: both checks are
    a flag read.
    """
    if torch.compiler.is_compiling():
        raise IncompatibleModelError(
            "a torus-sparse streamed layer is being traced by torch.compile; streamed weights move "
            "between passes, so a compiled graph would read stale memory. Run the model uncompiled "
            "(generate() auto-compile is switched off at attach; do not pass a compile_config)"
        )
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise IncompatibleModelError(
            "a torus-sparse streamed layer is being captured into a CUDA graph; streamed weights "
            "move between passes, so a replayed graph would read stale memory. Run the model "
            "without CUDA graphs (e.g. no static-cache compile, no cudagraph mode in your server)"
        )


def check_not_hooked(model: nn.Module, weights: WeightSource | None = None) -> None:
    """Refuse a model that accelerate (or another library using its hooks) already placed.

    Empty (`meta`) parameters are accepted only where `weights` provides them (a model built by a
    loader that reads its FFN weights at attach: `weight_source`).

    accelerate's hooks move weights in and out around each forward, and an offloaded weight is a
    `meta` tensor whose real values live elsewhere: streaming from either would pack the wrong bytes.
    """
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if hasattr(m, "_hf_hook")]
    if hooked:
        raise IncompatibleModelError(
            f"{type(model).__name__} carries accelerate hooks ({len(hooked)} modules, first {hooked[0]!r}), "
            f"as loading with device_map=... or accelerate's dispatch/offload leaves them. torus-sparse "
            f"places weights itself: load the model without device_map (TorusModel.from_pretrained and "
            f"enable() do), or remove the hooks first with "
            f"accelerate.hooks.remove_hook_from_module(model, recurse=True) once every weight is in host memory"
        )
    meta = [
        name
        for name, p in model.named_parameters()
        if p.is_meta and not (weights is not None and weights.provides(name))
    ]
    if meta:
        raise IncompatibleModelError(
            f"{type(model).__name__} has {len(meta)} parameters on the meta device (first {meta[0]!r}): "
            f"their values are not in memory (offloaded, or the model was built empty). Load the model "
            f"with its weights in host memory (no device_map, no offload) and attach again"
        )
