"""`guards`: an attached model stays correct however it is called — from several threads at once,
under torch.compile or graph capture (refused), or after another library hooked it (refused)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_tiny

import torus_plugins as tp
from torus_plugins.errors import IncompatibleModelError
from torus_plugins.guards import check_traceable_call

PROMPTS = [torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]]), torch.tensor([[7, 1, 8, 2, 81, 82, 8, 45, 90, 4]])]
NEW = 8


def greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def in_threads(fn, n: int) -> list[object]:
    """Run fn(i) on n threads started together; return results (an exception is a result)."""
    out: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:  # reported by the caller's assertion
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread never finished: the pass lock deadlocked"
    return out


CASES = [
    ("llama", dict(transport="copy", resident_layers=0)),
    ("llama", dict(transport="copy", resident_layers=2)),
    ("llama", dict(transport="copy", resident_layers=0, weight_quant="int8")),
    ("llama", dict(transport="simulated-link", resident_layers=0, options={"link_bandwidth": "2GB/s"})),
    ("llama", dict(transport="zero-copy")),
    ("opt", dict(transport="copy", resident_layers=0, lookahead=1)),  # entry fc1 ≠ exit fc2
    ("mixtral", dict(transport="copy", moe_cache_experts=16)),  # half the experts cached
    ("qwen2_moe", dict(transport="copy", moe_cache_experts=16, lookahead=1)),
]


@pytest.mark.parametrize("arch,cfg", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_concurrent_generate_equals_alone(arch: str, cfg: dict) -> None:
    model = build_tiny(arch)
    with torch.no_grad():
        alone = [greedy(model, p) for p in PROMPTS]
    engine = tp.attach(model, tp.TorusConfig(**cfg))
    engine.reset_stats()
    runs = 3

    def work(i: int) -> list[bool]:
        with torch.no_grad():
            return [torch.equal(greedy(model, PROMPTS[i % 2]), alone[i % 2]) for _ in range(runs)]

    results = in_threads(work, 4)
    assert all(r == [True] * runs for r in results), results
    st = engine.stats()
    passes = 4 * runs * NEW  # one forward per new token
    if st.transport != "zero-copy":  # zero-copy has no hooks, so it counts no passes
        assert st.forward_passes == passes
    if st.experts is not None:
        for layer in st.experts.layers:
            assert layer.hits + layer.misses == layer.routed
            assert layer.calls == passes
    elif st.streamed_layers:
        for layer in st.layers:
            if layer.placement == "streamed":
                assert layer.hits + layer.misses == passes
    tp.detach(model)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_pass_that_raises_never_wedges_other_threads(error) -> None:
    """Forward hooks' `always_call` misses KeyboardInterrupt: the lock is released in a finally."""
    model = build_tiny("llama")
    with torch.no_grad():
        alone = greedy(model, PROMPTS[0])
    tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    boom = {"left": 3}

    def fail_inside_ffn(module, args):
        if threading.current_thread().name == "failing" and boom["left"] > 0:
            boom["left"] -= 1
            raise error("boom inside a streamed layer")

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(fail_inside_ffn)
    errors: list[BaseException] = []

    def failing() -> None:
        for _ in range(3):
            try:
                with torch.no_grad():
                    model(PROMPTS[0])
            except error as exc:
                errors.append(exc)

    t = threading.Thread(target=failing, name="failing")
    t.start()
    t.join(timeout=60)
    got = in_threads(lambda i: greedy(model, PROMPTS[0]), 2)
    handle.remove()
    assert len(errors) == 3
    assert all(isinstance(g, torch.Tensor) and torch.equal(g, alone) for g in got), got
    tp.detach(model)


def test_nested_call_from_inside_a_forward_does_not_deadlock() -> None:
    """A hook that calls the model again on the same thread re-enters the lock."""
    model = build_tiny("llama")
    with torch.no_grad():
        inner_ref = model(PROMPTS[1]).logits
    tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    seen: list[torch.Tensor] = []
    entered = threading.Event()

    def call_again(module, args, output):
        if not entered.is_set():
            entered.set()
            seen.append(model(PROMPTS[1]).logits)

    with torch.no_grad():
        outer_ref = model(PROMPTS[0]).logits
    h = model.model.layers[0].register_forward_hook(call_again)
    (out,) = in_threads(lambda i: model(PROMPTS[0]).logits, 1)
    h.remove()
    assert isinstance(out, torch.Tensor), out
    assert torch.equal(seen[0], inner_ref)
    assert torch.equal(out, outer_ref)
    tp.detach(model)


def test_compile_and_capture_are_refused_in_the_hot_path(monkeypatch) -> None:
    model = build_tiny("llama")
    tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IncompatibleModelError, match="torch.compile"), torch.no_grad():
        model(PROMPTS[0])
    monkeypatch.undo()
    # The engine stays usable after the refusal.
    with torch.no_grad():
        model(PROMPTS[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(IncompatibleModelError, match="CUDA graph"):
        check_traceable_call(torch.device("cuda", 0))
    check_traceable_call(torch.device("cpu"))  # CPU passes never capture
    tp.detach(model)


def test_torch_compile_of_an_attached_model_still_gives_the_plain_logits() -> None:
    model = build_tiny("llama")
    with torch.no_grad():
        ref = model(PROMPTS[0]).logits
    tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(compiled(PROMPTS[0]).logits, ref)
    tp.detach(model)


def test_generate_auto_compile_is_switched_off_while_attached() -> None:
    model = build_tiny("llama")
    before = model.generation_config.disable_compile
    assert not before
    tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    assert model.generation_config.disable_compile is True
    tp.detach(model)
    assert model.generation_config.disable_compile is before


def test_accelerate_hooked_model_is_refused_and_left_unchanged() -> None:
    from accelerate import cpu_offload

    model = build_tiny("llama")
    with torch.no_grad():
        ref = model(PROMPTS[0]).logits
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(IncompatibleModelError, match="accelerate hooks.*remove_hook_from_module"):
        tp.attach(model, tp.TorusConfig(transport="copy"))
    assert not tp.is_attached(model)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS[0]).logits, ref)


def test_weights_on_meta_are_refused() -> None:
    import transformers as T
    from accelerate import init_empty_weights
    from conftest import TINY_CONFIGS

    with init_empty_weights():
        model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    with pytest.raises(IncompatibleModelError, match="meta device"):
        tp.attach(model, tp.TorusConfig(transport="copy"))
    assert not tp.is_attached(model)
