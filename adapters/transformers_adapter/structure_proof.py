"""The proof discovery gives before anything streams: run real blocks of the model twice, once as
they are and once with their FFN (or routed experts) bound the way the engine binds them, and
demand the same output bit for bit.

The inputs are the model's own: a short text-only forward is stopped at the blocks to prove,
whose arguments are kept. One block of each distinct layout is proved (the first of its kind).

"Bound the way the engine binds them" (`torus_plugins.layer_streamer.bind`): outside the FFN's
window (entry's pre-hook to exit's post-hook) its parameters hold NaN, inside it fresh copies
that are NaN-filled again at the exit, so a weight read outside the window, a cached view of a
weight, or an FFN that never enters its own forward all show up as a different output. Routed
experts run the model's eager loop on a stand-in whose fused weights only answer `w[e]`, as
the expert streamer's do. A block whose output is not repeatable (weights created inside
forward, state carried between calls) or whose parameters change during a forward is refused.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from torus_plugins.architecture import EXPERTS_RUNNER_ATTR
from torus_plugins.layer_streamer import bind

from .discovery import DiscoveryError, Layout, _who
from .moe_architectures import EXPERTS_IMPLEMENTATION, register_experts_implementation

#: Tokens in the probe forward (enough for several experts to be routed).
PROBE_TOKENS = 6


class _Stop(Exception):
    """Ends the probe forward once every block to prove has been reached."""


def prove(model: nn.Module, layout: Layout) -> Layout:
    """`layout`, proved on `model` (with the measured top-k of each MoE block); raises
    `DiscoveryError` naming what was found and what failed. A model without real weights (on
    the `meta` device, for planning) cannot run, so its layout is returned unproved."""
    if any(p.is_meta for p in model.parameters()):
        return layout
    reps: dict[tuple, int] = {}
    for i, (block, b) in enumerate(zip(layout.blocks, layout.per_block)):
        if b.ffn:
            reps.setdefault(b.signature(block), i)
    training = {m: m.training for m in model.modules()}
    model.eval()  # dropout would make the two runs differ for reasons that are not streaming
    try:
        with torch.no_grad():
            inputs = _capture(model, layout, sorted(reps.values()))
            note = ""
            if layout.mode == "experts":
                try:
                    layout = _prove_experts(model, layout, inputs)
                except DiscoveryError as exc:
                    # The whole MoE block still streams as one FFN: exact, only less granular.
                    note = f"routed experts cannot stream one by one ({exc}); each MoE block streams whole"
                    layout = replace(layout, mode="dense", note=note)
            if layout.mode == "dense":
                for i in sorted(reps.values()):
                    _prove_dense(model, layout, i, inputs[i])
    finally:
        for m, flag in training.items():
            m.training = flag
    return layout


def _capture(model: nn.Module, layout: Layout, wanted: list[int]) -> dict[int, tuple[tuple, dict]]:
    captured: dict[int, tuple[tuple, dict]] = {}

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            captured[i] = _snapshot((args, kwargs))  # before the block updates any cache it was given
            if len(captured) == len(wanted):
                raise _Stop
            return None

        return hook

    handles = [layout.blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in wanted]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = int(getattr(embeddings, "num_embeddings", 0) or 0) or 2
    device = next(model.parameters()).device
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
    try:
        for kwargs in ({"use_cache": False}, {}):
            try:
                model(input_ids=ids, **kwargs)
            except _Stop:
                break
            except TypeError:
                continue  # a forward without `use_cache`
            except Exception as exc:
                raise DiscoveryError(
                    f"{_who(model)}: found {layout.describe()}, but a text-only probe forward failed before "
                    f"reaching the blocks to prove: {type(exc).__name__}: {exc}"
                ) from exc
            break
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise DiscoveryError(
            f"{_who(model)}: found {layout.describe()}, but a text-only forward never ran block(s) "
            f"{missing} of {layout.stack!r}, so discovery cannot prove what it found there"
        )
    return captured


def _snapshot(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:
        return value  # not copyable: the repeatability check still catches state that changes


def _run(block: nn.Module, inputs: tuple[tuple, dict]) -> Any:
    args, kwargs = _snapshot(inputs)
    return block(*args, **kwargs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return bool(ta) and len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def _reference(model: nn.Module, layout: Layout, i: int, inputs: tuple[tuple, dict]) -> Any:
    """The block's own output, checked to be repeatable and free of parameter changes."""
    block = layout.blocks[i]
    before = [(n, id(p), p.data_ptr()) for n, p in block.named_parameters()]
    ref = _run(block, inputs)
    again = _run(block, inputs)
    after = [(n, id(p), p.data_ptr()) for n, p in block.named_parameters()]
    what = f"{_who(model)}: found {layout.describe()}, but block {i} ({type(block).__name__})"
    if before != after:
        raise DiscoveryError(f"{what} creates or replaces parameters inside its forward; streaming cannot follow that")
    if not _same(ref, again):
        raise DiscoveryError(
            f"{what} gives a different output when called twice on the same input (weights created inside "
            f"forward, or state carried between calls); discovery cannot prove a streamed run equal to it"
        )
    if any(t.is_floating_point() and t.isnan().any() for t in _tensors(ref)):
        raise DiscoveryError(f"{what} outputs NaN on the probe input; nothing can be proved from it")
    return ref


def _poison(t: torch.Tensor) -> torch.Tensor:
    return torch.full((), float("nan"), dtype=t.dtype, device=t.device).expand(t.shape)


def _prove_dense(model: nn.Module, layout: Layout, i: int, inputs: tuple[tuple, dict]) -> None:
    block, names = layout.blocks[i], layout.per_block[i].ffn
    ref = _reference(model, layout, i, inputs)
    modules = [block.get_submodule(n) for n in names]
    params = [p for m in modules for p in m.parameters()]
    what = f"{_who(model)}: found {layout.describe()}; block {i}'s FFN ({'+'.join(names)})"
    if any(not p.is_floating_point() for p in params):
        raise DiscoveryError(f"{what} has non-float weights, which discovery cannot poison to prove the binding")
    originals = [p.data for p in params]
    poison = [_poison(o) for o in originals]
    state = {"opened": 0, "closed": 0, "live": []}

    def pre(module: nn.Module, args: Any) -> None:
        state["live"] = [o.clone() for o in originals]
        bind(params, state["live"])
        state["opened"] += 1

    def post(module: nn.Module, args: Any, output: Any) -> None:
        bind(params, poison)
        for t in state["live"]:
            t.fill_(float("nan"))  # as a slot overwritten by a later layer
        state["closed"] += 1

    handles = [modules[0].register_forward_pre_hook(pre), modules[-1].register_forward_hook(post)]
    bind(params, poison)
    try:
        first = _run(block, inputs)
        second = _run(block, inputs)
    except Exception as exc:
        raise DiscoveryError(f"{what} fails when bound as the engine binds it: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        bind(params, originals)
    if state["opened"] == 0:
        raise DiscoveryError(f"{what}: the block never calls {names[0]}'s forward, so the engine could never bind it")
    if not (_same(ref, first) and _same(ref, second)):
        raise DiscoveryError(
            f"{what}: the output with the FFN bound only between {names[0]}'s pre-hook and {names[-1]}'s hook "
            f"differs from the block's own (the block reads those weights outside that window or keeps them)"
        )


class _ExpertsView:
    """A fused `[experts, ...]` weight that only answers `w[e]`, like the expert streamer's."""

    __slots__ = ("_full", "shape", "dtype", "device")

    def __init__(self, full: torch.Tensor) -> None:
        self._full, self.shape, self.dtype, self.device = full, full.shape, full.dtype, full.device

    def __getitem__(self, expert: Any) -> torch.Tensor:
        return self._full[int(expert)].clone()


class _Shim:
    def __init__(self, module: nn.Module, views: dict[str, _ExpertsView]) -> None:
        self.__dict__["_module"] = module
        self.__dict__.update(views)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def _prove_experts(model: nn.Module, layout: Layout, inputs: dict[int, tuple[tuple, dict]]) -> Layout:
    """Each representative MoE block: eager experts vs experts streamed one by one. Returns the
    layout with each MoE block's measured top-k."""
    if not hasattr(model, "set_experts_implementation"):
        raise DiscoveryError("the model cannot switch its experts implementation")
    register_experts_implementation()
    cfg = model.config
    previous = getattr(cfg, "_experts_implementation", None)
    top_k: dict[tuple, int] = {}
    try:
        model.set_experts_implementation("eager")
        for i, block_inputs in inputs.items():
            b = layout.per_block[i]
            if b.experts and b.router:
                top_k[b.signature(layout.blocks[i])] = _prove_one_moe(model, layout, i, block_inputs)
    except DiscoveryError:
        raise
    except Exception as exc:
        raise DiscoveryError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.set_experts_implementation(previous or "eager")
    per_block = tuple(
        top_k.get(b.signature(block)) if b.experts else None for block, b in zip(layout.blocks, layout.per_block)
    )
    return replace(layout, top_k=per_block)


def _prove_one_moe(model: nn.Module, layout: Layout, i: int, inputs: tuple[tuple, dict]) -> int:
    block, b = layout.blocks[i], layout.per_block[i]
    experts = block.get_submodule(b.experts)
    router = block.get_submodule(b.router)
    seen: dict[str, Any] = {}
    grab = router.register_forward_pre_hook(lambda m, args: seen.setdefault("hidden", args[0] if args else None))
    try:
        ref = _reference(model, layout, i, inputs)
    finally:
        grab.remove()
    fused = list(experts.named_parameters(recurse=False))
    originals = {attr: p.data for attr, p in fused}
    calls: list[int] = []

    def runner(module: nn.Module, hidden, top_k_index, top_k_weights, eager):
        calls.append(int(top_k_index.shape[-1]))
        shim = _Shim(module, {attr: _ExpertsView(originals[attr]) for attr in originals})
        return eager(shim, hidden, top_k_index, top_k_weights)

    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    experts.__dict__[EXPERTS_RUNNER_ATTR] = runner
    bind([p for _, p in fused], [_poison(o) for o in originals.values()])
    try:
        got = _run(block, inputs)
    except Exception as exc:
        raise DiscoveryError(
            f"block {i}'s experts ({b.experts}) fail on weights streamed one expert at a time: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        del experts.__dict__[EXPERTS_RUNNER_ATTR]
        bind([p for _, p in fused], list(originals.values()))
        model.set_experts_implementation("eager")
    if not calls:
        raise DiscoveryError(f"block {i}'s experts module ({b.experts}) never dispatched through the experts interface")
    if not _same(ref, got):
        raise DiscoveryError(f"block {i}'s output with experts streamed one by one differs from the eager experts'")
    hidden = seen.get("hidden")
    n = int(fused[0][1].shape[0])
    if isinstance(hidden, torch.Tensor):
        from .moe_architectures import router_scores

        class _Site:  # what router_scores reads of a site
            pass

        site = _Site()
        site.router = router  # type: ignore[attr-defined]
        site.num_experts = n  # type: ignore[attr-defined]  (a linear router is applied as its map)
        scores = router_scores(site, hidden.reshape(-1, hidden.shape[-1]))  # type: ignore[arg-type]
        if not isinstance(scores, torch.Tensor) or scores.shape[-1] != n:
            raise DiscoveryError(
                f"block {i}'s router ({b.router}) does not return [tokens, {n}] scores, which expert prediction needs"
            )
    return calls[0]
