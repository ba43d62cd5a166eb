"""The architecture seam: where a model keeps the FFN weights that stream.

The core knows nothing about any framework. An architecture plugin looks at a `torch.nn.Module`
and answers with one `FFNSite` per decoder layer; the transformers adapter registers a table of
them, and a new architecture is one more `Architecture` registered through
`torus_register_architectures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class FFNSite:
    """One decoder layer's streamable FFN weights.

    entry: the first module whose forward reads the weights (its forward pre-hook binds them).
    exit: the last such module (its forward hook releases them). For a `mlp` submodule both are
        the `mlp`; for OPT, whose linears sit directly on the layer, they are `fc1` and `fc2`.
    params: (qualified name, owning module, attribute) for each streamed parameter.
    """

    entry: nn.Module
    exit: nn.Module
    params: tuple[tuple[str, nn.Module, str], ...]


@runtime_checkable
class Architecture(Protocol):
    """Finds FFN sites in models of one family.

    name: shown in error messages and stats (e.g. "llama").
    matches(model): whether this plugin knows the model.
    ffn_sites(model): one `FFNSite` per decoder layer, in execution order.
    kv_bytes_per_token(model): KV-cache bytes per token (all layers), for the budget's reserve;
        return 0 when unknown.
    """

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]: ...

    def kv_bytes_per_token(self, model: nn.Module) -> int: ...
