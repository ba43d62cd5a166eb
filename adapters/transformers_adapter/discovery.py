"""Structural discovery: the architecture plugin for a model no table row claims.

It reads the module tree instead of `config.model_type`:

1. the stack: the `ModuleList` of decoder blocks (the largest one whose length is the config's
   layer count; vision or audio towers of a multimodal model are passed over);
2. in each block, the FFN: one child named like an FFN (`mlp`, `feed_forward`, `ffn`, ...), or the
   linears sitting directly on the block after the attention (`fc1`/`fc2` in OPT, XGLM, BART's
   decoder), or BERT's `intermediate` + `output` pair;
3. for MoE, the fused experts module of transformers 5 (3-D expert weights, forward dispatched
   through transformers' experts interface) with its router and shared experts.

A layout it cannot stream safely (two FFN children in one block, FFN weights shared across
blocks, no FFN anywhere) is refused with an `UnsupportedArchitectureError` that says what was
found. What is found is then proved on the model itself before anything streams
(`structure_proof`); a table row, when one matches, is asked first and skips all this.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from torus_plugins import UnsupportedArchitectureError
from torus_plugins.architecture import ExpertSite, FFNSite
from torus_plugins.hookspecs import hookimpl

from .architectures import disable_generate_compile, kv_bytes_per_token
from .moe_architectures import install_streamed_experts, router_scores

#: Children that hold a block's FFN, by the names transformers families use.
FFN_NAMES = ("mlp", "feed_forward", "ffn", "ff", "feedforward", "block_sparse_moe", "moe", "mlp_block")
#: BERT-style blocks split the FFN over two children, run in this order.
FFN_PAIR = ("intermediate", "output")
#: Names of the norm in front of the FFN, whose weight speculative expert routing rescales by.
FFN_NORMS = (
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "pre_mlp_layernorm",
    "ffn_norm",
    "pre_ff_layernorm",
)
#: Stacks under these names belong to a vision or audio tower, not to the language model.
NOT_TEXT = ("vision", "visual", "image", "audio", "speech", "vit")
#: Where the router and the shared experts sit beside the fused experts.
ROUTERS = ("gate", "router")
SHARED = ("shared_experts", "shared_expert", "shared_mlp")


class DiscoveryError(UnsupportedArchitectureError):
    """Discovery found a decoder stack but cannot stream it safely; the message says what it
    found, what failed, and what to do."""


@dataclass(frozen=True)
class BlockLayout:
    """What one block holds. ffn: child names forming the FFN, in execution order (`()`: none).
    experts / router / norm: dotted paths from the block (`None`: not there).
    shared: shared experts' paths (they stay on the device)."""

    ffn: tuple[str, ...] = ()
    experts: str | None = None
    router: str | None = None
    shared: tuple[str, ...] = ()
    norm: str | None = None

    def signature(self, block: nn.Module) -> tuple:
        kinds = tuple(type(block.get_submodule(n)).__name__ for n in self.ffn)
        return (type(block).__name__, self.ffn, kinds, self.experts)


@dataclass(frozen=True)
class Layout:
    """Discovery's findings for one model. mode: "dense" (each block's FFN streams whole) or
    "experts" (routed experts stream one at a time; dense FFN blocks stay on the device)."""

    stack: str
    blocks: nn.ModuleList
    per_block: tuple[BlockLayout, ...]
    mode: str
    top_k: tuple[int | None, ...] = ()
    note: str = ""

    def describe(self) -> str:
        classes = sorted({type(b).__name__ for b in self.blocks})
        ffns = sorted({"+".join(b.ffn) for b in self.per_block if b.ffn})
        text = f"stack {self.stack!r} ({len(self.blocks)} x {'/'.join(classes)}), FFN {', '.join(ffns) or 'none'}"
        experts = sorted({b.experts for b in self.per_block if b.experts})
        if experts:
            text += f", fused experts {', '.join(experts)}"
        return text


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder-block `ModuleList`, or None when the model has no candidate."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        if not all(any(True for _ in b.children()) and _params(b) for b in mod):
            continue  # a list of bare linears or norms is not a stack of blocks
        if any(name.startswith(other + ".") for other, _ in candidates):
            continue  # nested inside a block of an outer stack (an experts list, say)
        candidates.append((name, mod))
    if not candidates:
        return None

    def score(item: tuple[str, nn.ModuleList]) -> tuple:
        name, mod = item
        text = not any(word in name.lower() for word in NOT_TEXT)
        return (text, len(mod) == layers, _params(mod))

    return max(candidates, key=score)


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused experts: a forward dispatched through the experts interface
    (`use_experts_implementation` wraps it and sets `has_gate`) over 3-D expert weights."""
    forward = getattr(type(module), "forward", None)
    own = list(module.named_parameters(recurse=False))
    return (
        hasattr(forward, "__wrapped__")
        and hasattr(module, "has_gate")
        and any(p.dim() == 3 for _, p in own)
        and len({p.shape[0] for _, p in own}) == 1
    )


def _block_layout(block: nn.Module, index: int) -> BlockLayout:
    children = dict(block.named_children())
    ffn_children = [n for n in children if n in FFN_NAMES and _params(children[n])]
    if len(ffn_children) > 1:
        raise DiscoveryError(
            f"block {index} ({type(block).__name__}) has several FFNs ({', '.join(ffn_children)}); "
            f"streaming one of them is not what the budget plans for"
        )
    if ffn_children:
        ffn: tuple[str, ...] = (ffn_children[0],)
    elif all(n in children for n in FFN_PAIR):
        ffn = FFN_PAIR
    else:
        ffn = tuple(
            n
            for n, c in children.items()
            if getattr(c, "weight", None) is not None
            and c.weight.dim() == 2
            and not isinstance(c, nn.Embedding)
            and not any(True for _ in c.children())
        )
        if len(ffn) == 1:
            ffn = ()  # a single projection on the block is not an FFN
    experts = [n for n, m in block.named_modules() if n and _is_fused_experts(m)]
    if len(experts) > 1:
        raise DiscoveryError(
            f"block {index} ({type(block).__name__}) has several fused experts modules ({', '.join(experts)})"
        )
    if experts and not ffn:
        ffn = (experts[0].split(".", 1)[0],)  # the MoE block sits under a child of another name (`mixer`)
    layout = BlockLayout(ffn=ffn, norm=next((n for n in FFN_NORMS if n in children), None))
    if experts and ffn:
        path = experts[0]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        siblings = dict(block.get_submodule(parent).named_children()) if parent else children
        router = next((r for r in ROUTERS if r in siblings and _params(siblings[r])), None)
        shared = tuple(f"{parent}.{s}" if parent else s for s in SHARED if s in siblings)
        if router is not None:
            layout = replace(layout, experts=path, router=f"{parent}.{router}" if parent else router, shared=shared)
    return layout


def find_layout(model: nn.Module) -> Layout:
    """What discovery finds in `model`, before any proof; raises `DiscoveryError` for a layout
    it refuses."""
    found = find_stack(model)
    if found is None:
        raise DiscoveryError(f"{_who(model)}: no ModuleList of decoder blocks found")
    stack, blocks = found
    per_block = tuple(_block_layout(b, i) for i, b in enumerate(blocks))
    if not any(b.ffn for b in per_block):
        children = ", ".join(f"{n} ({type(c).__name__})" for n, c in blocks[0].named_children())
        raise DiscoveryError(
            f"{_who(model)}: found the stack {stack!r} of {len(blocks)} {type(blocks[0]).__name__} blocks, but no FFN "
            f"in any block (block 0 holds: {children}); nothing to stream"
        )
    owners: dict[int, int] = {}
    for i, (block, layout) in enumerate(zip(blocks, per_block)):
        for name in layout.ffn:
            for p in block.get_submodule(name).parameters():
                j = owners.setdefault(id(p), i)
                if j != i:
                    raise DiscoveryError(
                        f"{_who(model)}: blocks {j} and {i} of {stack!r} share FFN weights ({name}); a weight "
                        f"bound for one block would be bound for the other"
                    )
    mode = "experts" if any(b.experts for b in per_block) else "dense"
    return Layout(stack, blocks, per_block, mode)


def _who(model: nn.Module) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return type(model).__name__ + (f" (model_type {kind!r})" if kind else "")


def _ffn_site(stack: str, i: int, block: nn.Module, names: tuple[str, ...]) -> FFNSite:
    modules = [block.get_submodule(n) for n in names]
    params = []
    for prefix, mod in zip(names, modules):
        for sub_name, sub in mod.named_modules():
            for attr, _ in sub.named_parameters(recurse=False):
                params.append((".".join(x for x in (f"{stack}.{i}", prefix, sub_name, attr) if x), sub, attr))
    return FFNSite(entry=modules[0], exit=modules[-1], params=tuple(params))


def _top_k(model: nn.Module, block: nn.Module, layout: BlockLayout) -> int | None:
    cfg = _text_config(model)
    router = block.get_submodule(layout.router) if layout.router else None
    owner = block.get_submodule(layout.experts.rsplit(".", 1)[0]) if layout.experts and "." in layout.experts else block
    for obj in (router, owner, cfg):
        for attr in ("top_k", "num_experts_per_tok", "moe_top_k", "moe_k"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


class StructuralDiscovery:
    """The lowest-priority architecture: claims any transformers model with a decoder stack and
    streams what `find_layout` finds once `structure_proof.prove` has shown it is exact."""

    name = "discovered"

    def __init__(self) -> None:
        self._layouts: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Layout]] = weakref.WeakKeyDictionary()

    def matches(self, model: nn.Module) -> bool:
        return getattr(model, "config", None) is not None and find_stack(model) is not None

    def layout(self, model: nn.Module) -> Layout:
        """Found and (on a model with real weights) proved; raises the refusal. A proved layout is
        kept per model while its module tree is unchanged (the engine asks several times per
        attach); a refusal is not kept, so a fixed model is looked at again."""
        key = tuple((n, id(m)) for n, m in model.named_modules())
        cached = self._layouts.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        from .structure_proof import prove

        try:
            layout = prove(model, find_layout(model))
        except DiscoveryError as exc:
            raise DiscoveryError(
                f"{exc} (a table row registered through the torus_register_architectures hook overrides discovery; "
                f"see docs/plugins.md, 'Adding an architecture')"
            ) from None
        self._layouts[model] = (key, layout)
        return layout

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        layout = self.layout(model)
        if layout.mode != "dense":
            return []  # routed experts stream through `expert_sites`; dense blocks stay on the device
        return [
            _ffn_site(layout.stack, i, block, b.ffn)
            for i, (block, b) in enumerate(zip(layout.blocks, layout.per_block))
            if b.ffn
        ]

    def expert_sites(self, model: nn.Module) -> list[ExpertSite]:
        layout = self.layout(model)
        if layout.mode != "experts":
            return []
        sites = []
        for i, (block, b) in enumerate(zip(layout.blocks, layout.per_block)):
            if not b.experts or not b.router:
                continue
            experts = block.get_submodule(b.experts)
            top_k = (layout.top_k[i] if layout.top_k else None) or _top_k(model, block, b)
            if top_k is None:
                raise DiscoveryError(
                    f"{_who(model)}: block {i}'s router ({b.router}) names no top-k and the config has no "
                    f"num_experts_per_tok; load the model's weights so discovery can measure it"
                )
            own = list(experts.named_parameters(recurse=False))
            norm = getattr(block.get_submodule(b.norm), "weight", None) if b.norm else None
            sites.append(
                ExpertSite(
                    layer=i,
                    module=experts,
                    params=tuple((f"{layout.stack}.{i}.{b.experts}.{attr}", attr) for attr, _ in own),
                    num_experts=int(own[0][1].shape[0]),
                    top_k=int(top_k),
                    router=block.get_submodule(b.router),
                    input_scale=norm if isinstance(norm, torch.Tensor) and norm.dim() == 1 else None,
                )
            )
        return sites

    def router_scores(self, site: ExpertSite, hidden: torch.Tensor) -> torch.Tensor:
        return router_scores(site, hidden)

    def install_experts(self, model: nn.Module) -> Callable[[], None]:
        return install_streamed_experts(model)

    def prepare_model(self, model: nn.Module) -> Callable[[], None] | None:
        return disable_generate_compile(model)

    def kv_bytes_per_token(self, model: nn.Module) -> int:
        return kv_bytes_per_token(model)


DISCOVERY = StructuralDiscovery()


@hookimpl(trylast=True)
def torus_register_architectures(register) -> None:
    # trylast: registered after every table row and third-party plugin, so asked last.
    register(DISCOVERY)
