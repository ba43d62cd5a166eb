"""`TorusSparseConfig`: the seed project's configuration fields, each mapped onto `TorusConfig` or refused."""

from __future__ import annotations

from dataclasses import dataclass

from torus_plugins import ConfigError, TorusConfig

#: The seed's `weight_quant` spellings and the `TorusConfig.weight_quant` each one means.
_WEIGHT_QUANTS = {"none": None, "int8": "int8", "int4": "int4"}


@dataclass(frozen=True)
class TorusSparseConfig:
    """The seed project's knobs. How each one maps onto `TorusConfig`:

    pcie_buffer_mb: refused (any value but None). torus-sparse has no separate staging buffer:
        streamed layers are copied straight into a ring of `lookahead_horizon + 1` device slots of
        one FFN layer each, so the ring's size follows from the layer size. Set
        `lookahead_horizon`, and `vram_budget` for the device memory in total.
    lookahead_horizon: `TorusConfig.lookahead`, FFN layers copied ahead of compute (>= 1).
    vram_resident_fraction: the share of decoder layers whose FFN stays on the device:
        `TorusConfig.resident_layers = round(fraction * num_hidden_layers)`, from the model's
        config. None: the budget decides.
    weight_quant: "none" (weights as loaded), "int8" or "int4": `TorusConfig.weight_quant`.
    moe_expert_prefetch_k: `TorusConfig.moe_expert_prefetch_k` (None: the model's top-k).
    vram_budget, device, transport: the `TorusConfig` fields of the same names.
    """

    pcie_buffer_mb: int | float | None = None
    lookahead_horizon: int = TorusConfig.lookahead
    vram_resident_fraction: float | None = None
    weight_quant: str = "none"
    moe_expert_prefetch_k: int | None = None
    vram_budget: int | str | None = None
    device: str | None = None
    transport: str = TorusConfig.transport

    def __post_init__(self) -> None:
        if self.pcie_buffer_mb is not None:
            raise ConfigError(
                f"pcie_buffer_mb={self.pcie_buffer_mb!r} has no equivalent: torus-sparse copies streamed layers "
                f"straight into lookahead_horizon + 1 device slots of one FFN layer each, so the buffer's size "
                f"follows from the layer size; drop pcie_buffer_mb and set lookahead_horizon (and vram_budget)"
            )
        if self.weight_quant not in _WEIGHT_QUANTS:
            raise ConfigError(f"weight_quant must be 'none', 'int8' or 'int4', got {self.weight_quant!r}")
        f = self.vram_resident_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1):
            raise ConfigError(f"vram_resident_fraction must be a number from 0 to 1, or None, got {f!r}")
        self.to_torus_config(num_layers=1)  # every other field is checked by TorusConfig itself

    def to_torus_config(self, num_layers: int | None) -> TorusConfig:
        """The `TorusConfig` this stands for, for a model with `num_layers` decoder layers
        (needed only when `vram_resident_fraction` is set)."""
        resident = None
        if self.vram_resident_fraction is not None:
            if num_layers is None:
                raise ConfigError(
                    "vram_resident_fraction needs the model's number of decoder layers (num_hidden_layers), "
                    "which its config does not state; set resident layers with TorusConfig(resident_layers=N)"
                )
            resident = round(self.vram_resident_fraction * num_layers)
        return TorusConfig(
            vram_budget=self.vram_budget,
            lookahead=self.lookahead_horizon,
            resident_layers=resident,
            device=self.device,
            transport=self.transport,
            weight_quant=_WEIGHT_QUANTS[self.weight_quant],
            moe_expert_prefetch_k=self.moe_expert_prefetch_k,
        )
