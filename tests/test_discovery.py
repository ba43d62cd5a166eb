"""Structural discovery (`torus_adapters.transformers_adapter.discovery` and `structure_proof`):
a model no table row claims is found by its module tree, proved before it streams, and refused
with an error naming what was found and what failed when it cannot be proved.

Every model here is a real transformers model, tiny and random-init; a refusal must leave the
model exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

import torus_plugins as tp
from torus_adapters.transformers_adapter.discovery import DISCOVERY, find_layout

IDS = torch.tensor([[5, 17, 42, 8, 63, 21]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a thread pool only adds spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llama(model_type: str | None = None, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = T.LlamaForCausalLM(cfg).eval()
    if model_type is not None:
        model.config.model_type = model_type  # a fine-tune's custom config: the tree is still Llama's
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not tp.is_attached(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_llama_tree_under_a_new_model_type_streams_identically():
    model = _llama("my_llama_finetune")
    with torch.no_grad():
        ref = model(IDS).logits
    want = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    before = _state(model)
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0, lookahead=2))
    assert engine.arch.name == "discovered"
    assert [s.entry for s in engine.sites] == [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0), want)
    stats = engine.stats()
    assert stats.streamed_layers == 2 and stats.bytes_moved > 0
    tp.detach(model)
    _assert_unchanged(model, before)


def test_a_table_row_is_asked_before_discovery():
    engine = tp.attach(_llama(), tp.TorusConfig(transport="copy"))
    assert engine.arch.name == "llama"
    tp.detach(engine.model)


def test_linears_on_the_block_and_split_ffns_are_found():
    """OPT-style fc1/fc2 on the block (BART's decoder) and BERT's intermediate + output pair."""
    torch.manual_seed(0)
    bart = T.BartForCausalLM(
        T.BartConfig(vocab_size=96, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64)
    )
    bert = T.BertLMHeadModel(
        T.BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        )
    )
    assert find_layout(bart).per_block[0].ffn == ("fc1", "fc2")
    assert find_layout(bert).per_block[0].ffn == ("intermediate", "output")


def _refusal(model: nn.Module) -> str:
    before = _state(model)
    with pytest.raises(tp.UnsupportedArchitectureError) as info:
        tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    _assert_unchanged(model, before)
    return str(info.value)


def test_several_ffns_in_one_block_are_refused():
    model = _llama("two_ffns")
    for layer in model.model.layers:
        layer.feed_forward = T.models.llama.modeling_llama.LlamaMLP(model.config)  # a second FFN child
    message = _refusal(model)
    assert "several FFNs (mlp, feed_forward)" in message and "block 0" in message


def test_ffn_weights_shared_across_blocks_are_refused():
    model = _llama("shared_ffn")
    model.model.layers[1].mlp = model.model.layers[0].mlp
    message = _refusal(model)
    assert "blocks 0 and 1 of 'model.layers' share FFN weights (mlp)" in message


class _FreshWeights(nn.Module):
    """An FFN that builds a new random projection on every call (weights created inside forward)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.inner = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = nn.Linear(x.shape[-1], x.shape[-1], bias=False).to(x.dtype)
        return self.inner(x) + extra(x)


def test_weights_created_inside_forward_are_refused():
    model = _llama("fresh_weights")
    for layer in model.model.layers:
        layer.mlp = _FreshWeights(layer.mlp)
    message = _refusal(model)
    assert "different output when called twice" in message and "weights created inside forward" in message


def test_an_ffn_weight_read_outside_its_window_is_refused():
    """A block that reads its FFN's weight after the FFN returned: the engine would have unbound it."""
    model = _llama("late_read")
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, a, out: out + 0 * m.mlp.down_proj.weight.sum())
    before = _state(model)
    with pytest.raises(tp.UnsupportedArchitectureError) as info:
        tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    assert "reads those weights outside that window" in str(info.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_ffns_is_refused_with_what_was_found():
    torch.manual_seed(0)
    mamba = T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4))
    message = _refusal(mamba)
    assert "found the stack 'backbone.layers' of 2 MambaBlock blocks, but no FFN" in message
    assert "mixer (MambaMixer)" in message and "torus_register_architectures" in message


def test_a_meta_model_is_found_without_running_it():
    """Planning builds models on the meta device: discovery reads the tree, proves nothing."""
    cfg = T.CohereConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    with torch.device("meta"):
        model = T.CohereForCausalLM(cfg)
    sites = DISCOVERY.ffn_sites(model)
    assert [s.entry for s in sites] == [layer.mlp for layer in model.model.layers]


def test_fused_experts_are_found_with_router_shared_experts_and_top_k():
    torch.manual_seed(0)
    cfg = T.Glm4MoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        head_dim=8,
    )
    cfg._experts_implementation = "eager"
    model = T.Glm4MoeForCausalLM(cfg).eval()
    layout = DISCOVERY.layout(model)
    moe = layout.per_block[1]
    assert layout.mode == "experts" and layout.per_block[0].experts is None  # the dense first layer
    assert (moe.experts, moe.router, moe.shared) == ("mlp.experts", "mlp.gate", ("mlp.shared_experts",))
    (site,) = DISCOVERY.expert_sites(model)
    assert (site.layer, site.num_experts, site.top_k) == (1, 4, 2)
