"""The plugin seam: entry-point discovery, the autoload switch, registration conflicts, stats
observers, architecture look-up errors, and pluggy staying off the hot path.

Third-party plugins here are real: a module plus a `.dist-info` directory on `sys.path`, found by
`importlib.metadata` exactly as an installed wheel would be. Throwaway plugin classes are
registered on fresh managers, never on the process-wide one.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

import pytest
import torch

import torus_plugins
from torus_plugins import (
    EngineStats,
    PluginError,
    StatsEvent,
    TorusConfig,
    UnsupportedArchitectureError,
    hookimpl,
    hookspecs,
)
from torus_plugins.builtin.transports import CpuCopyWorker
from torus_plugins.plugins import AUTOLOAD_ENV, build_plugin_manager, resolve

DEMO_MODULE = "torus_thirdparty_demo"
DEMO_DIST = "torus_thirdparty_demo"
DEMO_PLUGIN = f"{DEMO_DIST}:demo"
BROKEN_MODULE = "torus_thirdparty_broken"
BROKEN_DIST = "torus_thirdparty_broken"
BROKEN_PLUGIN = f"{BROKEN_DIST}:broken"

BUILTIN_TRANSPORTS = {"copy", "cuda", "simulated-link", "zero-copy"}

# A third-party plugin for a made-up model family: its own nn.Module, architecture and transport.
DEMO_SOURCE = '''
"""A third-party torus-sparse plugin for the made-up "demo" model family."""

import torch
from torch import nn

from torus_plugins import FFNSite, hookimpl
from torus_plugins.builtin.transports import CpuCopyWorker


class DemoConfig:
    model_type = "demo"
    name_or_path = "demo-tiny"


class DemoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        return x + self.ffn(x)


class DemoModel(nn.Module):
    def __init__(self, vocab=50, d=32, h=64, n_layers=4):
        super().__init__()
        self.config = DemoConfig()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(DemoBlock(d, h) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class DemoArchitecture:
    name = "demo"

    def matches(self, model):
        return getattr(getattr(model, "config", None), "model_type", None) == "demo"

    def ffn_sites(self, model):
        sites = []
        for i, block in enumerate(model.blocks):
            params = tuple(
                (f"blocks.{i}.ffn.{sub_name}.{attr}", sub, attr)
                for sub_name, sub in block.ffn.named_modules()
                for attr, _ in sub.named_parameters(recurse=False)
            )
            sites.append(FFNSite(entry=block.ffn, exit=block.ffn, params=params))
        return sites

    def kv_bytes_per_token(self, model):
        return 0


class DemoCopy(CpuCopyWorker):
    """The CPU copy worker under another name, counting the copies it was asked for."""

    name = "demo-copy"
    copies = 0

    def copy(self, dst, src, after):
        type(self).copies += 1
        return super().copy(dst, src, after)


@hookimpl
def torus_register_architectures(register):
    register(DemoArchitecture())


@hookimpl
def torus_register_transports(register):
    register("demo-copy", DemoCopy)
'''

BROKEN_SOURCE = 'raise RuntimeError("boom: torus_thirdparty_broken cannot be imported")\n'


def _install_distribution(root: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """Write `module.py` and a `.dist-info` that declares it in the `torus_sparse` group."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{hookspecs.ENTRY_POINT_GROUP}]\n{ep_name} = {module}\n")


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    """A fresh directory on `sys.path` to install fake distributions into; cleans `sys.modules`."""
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in (DEMO_MODULE, BROKEN_MODULE):
        sys.modules.pop(name, None)


@pytest.fixture
def demo_installed(site_dir):
    _install_distribution(site_dir, DEMO_DIST, DEMO_MODULE, DEMO_SOURCE, "demo")
    return site_dir


def _builtin_pm():
    return build_plugin_manager(autoload=False)


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor, int]]:
    return {n: (p, p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def _assert_unchanged(model: torch.nn.Module, snap, same_storage: bool = True) -> None:
    """Same parameter objects, values, strides and devices; no hooks; no engine.

    same_storage: also require the original storage (true when attach failed before touching
    the model; after a detach the FFN weights live in fresh, equal copies)."""
    now = dict(model.named_parameters())
    assert now.keys() == snap.keys()
    for name, (param, values, ptr) in snap.items():
        assert now[name] is param, name
        if same_storage:
            assert param.data_ptr() == ptr, name
        assert param.device == values.device and param.stride() == values.stride(), name
        assert torch.equal(param.detach(), values), name
    for mod in model.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks, type(mod).__name__
    assert not torus_plugins.is_attached(model)


# ---------------------------------------------------------------- discovery through entry points
def test_third_party_distribution_is_discovered_and_its_model_streams_bit_exactly(demo_installed):
    pm = build_plugin_manager()

    assert pm.has_plugin(DEMO_PLUGIN)
    demo = sys.modules[DEMO_MODULE]
    assert pm.get_plugin(DEMO_PLUGIN) is demo
    for builtin in ("transports", "prefetch", "transformers_architectures"):
        assert pm.has_plugin(builtin)

    reg = resolve(pm)
    assert reg.transports["demo-copy"] is demo.DemoCopy
    assert BUILTIN_TRANSPORTS <= reg.transports.keys()
    names = [a.name for a in reg.architectures]
    assert "demo" in names and "llama" in names
    # Third-party plugins are asked before the built-ins.
    assert names.index("demo") < names.index("llama")

    torch.manual_seed(0)
    model = demo.DemoModel().eval()
    ids = torch.randint(0, 50, (2, 7))
    originals = _snapshot(model)
    with torch.no_grad():
        expected = model(ids)

    demo.DemoCopy.copies = 0
    engine = torus_plugins.attach(
        model, TorusConfig(transport="demo-copy", resident_layers=0, device="cpu"), plugin_manager=pm
    )
    try:
        assert engine.arch.name == "demo"
        assert isinstance(engine.transport, demo.DemoCopy)
        assert engine.plan.resident == () and engine.plan.streamed == (0, 1, 2, 3)
        with torch.no_grad():
            first = model(ids)
            second = model(ids)  # second pass runs from prefetched slots
        assert torch.equal(first, expected)
        assert torch.equal(second, expected)
        stats = engine.stats()
        assert stats.transport == "demo-copy"
        assert stats.hits + stats.misses == 8  # 4 streamed layers × 2 passes
        assert demo.DemoCopy.copies > 0
    finally:
        torus_plugins.detach(model)

    _assert_unchanged(model, originals, same_storage=False)
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_autoload_env_keeps_only_builtins(demo_installed, monkeypatch, value):
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    pm = build_plugin_manager()

    assert not pm.has_plugin(DEMO_PLUGIN)
    assert DEMO_MODULE not in sys.modules  # not even imported
    reg = resolve(pm)
    assert BUILTIN_TRANSPORTS <= reg.transports.keys()
    assert "demo-copy" not in reg.transports
    assert "sequential" in reg.prefetch_policies
    names = {a.name for a in reg.architectures}
    assert {"llama", "mistral", "qwen2", "gpt2", "opt"} <= names
    assert "demo" not in names


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_autoload_env_falsy_values_keep_autoload_on(demo_installed, monkeypatch, value):
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    assert build_plugin_manager().has_plugin(DEMO_PLUGIN)


def test_explicit_autoload_argument_overrides_env(demo_installed, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert build_plugin_manager(autoload=True).has_plugin(DEMO_PLUGIN)
    monkeypatch.delenv(AUTOLOAD_ENV)
    assert not build_plugin_manager(autoload=False).has_plugin(DEMO_PLUGIN)


def test_plugin_that_fails_to_import_is_skipped_with_a_warning(demo_installed, caplog):
    _install_distribution(demo_installed, BROKEN_DIST, BROKEN_MODULE, BROKEN_SOURCE, "broken")

    with caplog.at_level(logging.WARNING, logger="torus_plugins.plugins"):
        pm = build_plugin_manager()

    assert not pm.has_plugin(BROKEN_PLUGIN)
    assert pm.has_plugin(DEMO_PLUGIN)  # its neighbours still load
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "torus_plugins.plugins"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert BROKEN_PLUGIN in message
    assert "boom" in message
    assert "skipped" in message
    reg = resolve(pm)
    assert BUILTIN_TRANSPORTS | {"demo-copy"} <= reg.transports.keys()


# ---------------------------------------------------------------- registration conflicts
class _CopyTransportA:
    @hookimpl
    def torus_register_transports(self, register):
        register("dup-transport", CpuCopyWorker)


class _CopyTransportB:
    @hookimpl
    def torus_register_transports(self, register):
        register("dup-transport", CpuCopyWorker)


def test_two_plugins_registering_one_transport_name_is_a_plugin_error():
    pm = _builtin_pm()
    pm.register(_CopyTransportA(), name="a")
    pm.register(_CopyTransportB(), name="b")
    with pytest.raises(PluginError, match="'dup-transport'"):
        resolve(pm)


def test_a_plugin_cannot_silently_replace_a_builtin_transport():
    class Shadow:
        @hookimpl
        def torus_register_transports(self, register):
            register("copy", CpuCopyWorker)

    pm = _builtin_pm()
    pm.register(Shadow())
    with pytest.raises(PluginError, match="'copy'"):
        resolve(pm)


def test_duplicate_prefetch_policy_is_a_plugin_error():
    class Again:
        @hookimpl
        def torus_register_prefetch_policies(self, register):
            register("sequential", lambda ctx: None)

    pm = _builtin_pm()
    pm.register(Again())
    with pytest.raises(PluginError, match="prefetch policy named 'sequential'"):
        resolve(pm)


def test_malformed_registrations_are_plugin_errors():
    class NotCallable:
        @hookimpl
        def torus_register_transports(self, register):
            register("broken", "not a factory")

    class HalfArchitecture:
        name = "half"

        def matches(self, model):
            return False

    class RegistersHalf:
        @hookimpl
        def torus_register_architectures(self, register):
            register(HalfArchitecture())

    pm = _builtin_pm()
    pm.register(NotCallable())
    with pytest.raises(PluginError, match="register\\(name: str, factory: callable\\)"):
        resolve(pm)

    pm = _builtin_pm()
    pm.register(RegistersHalf())
    with pytest.raises(PluginError, match="ffn_sites"):
        resolve(pm)


def test_a_plugin_architecture_takes_over_a_builtin_family(tiny_llama):
    from torus_adapters.transformers_adapter.architectures import DecoderFFN

    class Override:
        @hookimpl
        def torus_register_architectures(self, register):
            register(DecoderFFN("my-llama", ("llama",)))

    pm = _builtin_pm()
    pm.register(Override())
    engine = torus_plugins.attach(tiny_llama, TorusConfig(device="cpu", transport="copy"), plugin_manager=pm)
    try:
        assert engine.arch.name == "my-llama"
    finally:
        torus_plugins.detach(tiny_llama)


# ---------------------------------------------------------------- stats observers
class _Recorder:
    def __init__(self) -> None:
        self.events: list[StatsEvent] = []

    @hookimpl
    def torus_stats_event(self, event):
        self.events.append(event)


class _Exploder:
    calls = 0

    @hookimpl
    def torus_stats_event(self, event):
        type(self).calls += 1
        raise RuntimeError("observer exploded")


def test_stats_observer_receives_attached_and_detached(tiny_llama):
    pm = _builtin_pm()
    recorder = _Recorder()
    pm.register(recorder)
    try:
        torus_plugins.attach(
            tiny_llama, TorusConfig(device="cpu", transport="copy", resident_layers=1), plugin_manager=pm
        )
        assert [e.kind for e in recorder.events] == ["attached"]
        with torch.no_grad():
            tiny_llama(torch.tensor([[1, 2, 3]]))
        assert [e.kind for e in recorder.events] == ["attached"]  # a forward pass is not an event
        torus_plugins.detach(tiny_llama)
    finally:
        pm.unregister(recorder)

    assert [e.kind for e in recorder.events] == ["attached", "detached"]
    attached, detached = recorder.events
    for event in recorder.events:
        assert isinstance(event, StatsEvent)
        assert isinstance(event.stats, EngineStats)
        assert event.stats.transport == "copy"
        assert event.stats.resident_layers == 1
        assert event.stats.streamed_layers == 3
    assert attached.stats.hits + attached.stats.misses == 0
    assert detached.stats.hits + detached.stats.misses == 3  # the forward pass, 3 streamed layers
    assert detached.stats.forward_passes == 1


def test_an_observer_that_raises_breaks_nothing(tiny_llama, caplog):
    pm = _builtin_pm()
    recorder = _Recorder()
    _Exploder.calls = 0
    # Registered last, so pluggy lists it first: it runs before the recorder.
    pm.register(recorder)
    pm.register(_Exploder(), name="exploder")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = tiny_llama(ids).logits

    with caplog.at_level(logging.ERROR, logger="torus_plugins.plugins"):
        torus_plugins.attach(
            tiny_llama, TorusConfig(device="cpu", transport="copy", resident_layers=0), plugin_manager=pm
        )
        with torch.no_grad():
            got = tiny_llama(ids).logits
        torus_plugins.detach(tiny_llama)

    assert torch.equal(got, expected)
    assert not torus_plugins.is_attached(tiny_llama)
    assert _Exploder.calls == 2
    assert [e.kind for e in recorder.events] == ["attached", "detached"]
    failures = [r for r in caplog.records if "exploder" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info and "observer exploded" in str(r.exc_info[1]) for r in failures)


# ---------------------------------------------------------------- unknown architecture
class _NoSuchConfig:
    model_type = "nonesuch"


class _NoSuchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _NoSuchConfig()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(x)


def test_unknown_architecture_names_the_supported_ones_and_the_hook():
    torch.manual_seed(0)
    model = _NoSuchModel()
    snap = _snapshot(model)

    with pytest.raises(UnsupportedArchitectureError) as info:
        torus_plugins.attach(model, TorusConfig(device="cpu"), plugin_manager=_builtin_pm())

    message = str(info.value)
    assert "_NoSuchModel" in message
    assert "'nonesuch'" in message
    for supported in ("llama", "mistral", "gpt2"):
        assert supported in message
    assert "torus_register_architectures" in message
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------- pluggy off the hot path
def test_pluggy_is_not_called_during_forward_passes(tiny_llama):
    pm = _builtin_pm()
    hook_calls: list[str] = []
    observed: list[str] = []

    class Observer:
        @hookimpl
        def torus_stats_event(self, event):
            observed.append(event.kind)

    pm.register(Observer())
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: hook_calls.append(name), lambda *a: None)
    try:
        # The instrumentation sees pluggy calls: attach resolves every registration hook.
        engine = torus_plugins.attach(
            tiny_llama, TorusConfig(device="cpu", transport="copy", resident_layers=0), plugin_manager=pm
        )
        assert {"torus_register_architectures", "torus_register_transports", "torus_register_prefetch_policies"} <= set(
            hook_calls
        )
        assert observed == ["attached"]
        hook_calls.clear()
        observed.clear()

        with torch.no_grad():
            for _ in range(3):
                tiny_llama(torch.tensor([[3, 1, 4, 1, 5]]))
        stats = engine.stats()
        assert stats.hits + stats.misses == 12  # the hooks really ran: 4 streamed layers × 3 passes
        assert hook_calls == []
        assert observed == []
    finally:
        undo()
        if torus_plugins.is_attached(tiny_llama):
            torus_plugins.detach(tiny_llama)


# ---------------------------------------------------------------- the hookspec module is the docs
def _hookspec_functions():
    return [
        (name, fn)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None
    ]


def test_hookspecs_are_documented_and_typed():
    specs = _hookspec_functions()
    assert {name for name, _ in specs} == {
        "torus_register_architectures",
        "torus_register_prefetch_policies",
        "torus_register_transports",
        "torus_register_expert_predictors",
        "torus_stats_event",
    }
    assert hookspecs.__doc__ and "TORUS_SPARSE_DISABLE_PLUGIN_AUTOLOAD" in hookspecs.__doc__
    for name, fn in specs:
        assert name.startswith("torus_")
        doc = inspect.getdoc(fn) or ""
        # The spec says how it is called and, for registration hooks, what register() takes.
        assert "alled" in doc, f"{name}'s docstring must say when it is called"
        if name.startswith("torus_register_"):
            assert "register(" in doc, f"{name}'s docstring must show the register(...) call"
        sig = inspect.signature(fn)
        assert sig.parameters, name
        for param in sig.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) is not annotated"
        assert sig.return_annotation is not inspect.Parameter.empty, f"{name} lacks a return annotation"


def test_every_builtin_hookimpl_matches_a_spec():
    """pluggy reports implementations of hooks no spec declares (a typo'd hook name would
    otherwise never be called)."""
    pm = _builtin_pm()
    pm.check_pending()
    implemented = {
        impl.function.__name__
        for name in dir(pm.hook)
        if name.startswith("torus_")
        for impl in getattr(pm.hook, name).get_hookimpls()
    }
    assert implemented == {name for name, _ in _hookspec_functions() if name != "torus_stats_event"}


def test_plugin_api_exports_every_type_a_hook_names():
    """A plugin author imports from one module: every type a hookspec's signature names is there."""
    import re

    from torus_plugins import plugin_api

    named = set()
    for _, fn in _hookspec_functions():
        for param in inspect.signature(fn).parameters.values():
            named |= set(re.findall(r"[A-Z][A-Za-z]+", str(param.annotation))) - {"Callable", "None"}
    assert named and named <= set(plugin_api.__all__), named - set(plugin_api.__all__)
    for name in plugin_api.__all__:
        assert getattr(plugin_api, name) is not None


# ---------------------------------------------------------------------- MoE plugins
def _tiny_glm4_moe() -> torch.nn.Module:
    import transformers as T

    cfg = T.Glm4MoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=48,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
    )
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()


def test_a_new_moe_architecture_is_one_table_row_in_a_plugin():
    """GLM-4-MoE is not built in; one `MoEDecoder` row registered by a plugin streams its experts."""
    from torus_adapters.transformers_adapter.moe_architectures import MoEDecoder

    class Glm4MoePlugin:
        @hookimpl
        def torus_register_architectures(self, register):
            register(MoEDecoder("glm4_moe", ("glm4_moe",)))

    model = _tiny_glm4_moe()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    # Without the row, structural discovery (asked last) streams it; the row takes precedence.
    found = torus_plugins.attach(model, plugin_manager=_builtin_pm(), moe_cache_experts=4)
    assert found.arch.name == "discovered" and len(found.expert_sites) == 2
    torus_plugins.detach(model)
    pm = _builtin_pm()
    pm.register(Glm4MoePlugin(), name="glm4-moe-plugin")
    engine = torus_plugins.attach(model, plugin_manager=pm, moe_cache_experts=4)
    assert engine.arch.name == "glm4_moe"
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    st = engine.stats().experts
    assert st.total_experts == 16 and st.loads > 0  # 2 MoE layers (the first is dense) × 8 experts
    torus_plugins.detach(model)


def test_a_third_party_expert_predictor_is_selected_by_name():
    from torus_adapters.transformers_adapter.moe_architectures import MoEDecoder

    calls = []

    class AlwaysFirstExperts:
        """Predicts experts 0..k-1 for the next layer: a throwaway predictor plugin."""

        def __init__(self, ctx):
            self.ctx = ctx

        def predict(self, j, hidden, routed):
            calls.append(j)
            return [(j + 1, list(range(self.ctx.prefetch_k)))] if j + 1 < self.ctx.num_layers else []

    class Plugin:
        @hookimpl
        def torus_register_architectures(self, register):
            register(MoEDecoder("glm4_moe", ("glm4_moe",)))

        @hookimpl
        def torus_register_expert_predictors(self, register):
            register("first-k", AlwaysFirstExperts)

    pm = _builtin_pm()
    pm.register(Plugin(), name="first-k-plugin")
    model = _tiny_glm4_moe()
    engine = torus_plugins.attach(model, plugin_manager=pm, moe_cache_experts=8, moe_predictor="first-k")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert calls == [0, 1]  # once per MoE layer per forward pass
    assert engine.stats().experts.layers[1].predicted == 2
    torus_plugins.detach(model)
    with pytest.raises(PluginError, match="two plugins register an expert predictor named 'speculative'"):

        class Clash:
            @hookimpl
            def torus_register_expert_predictors(self, register):
                register("speculative", AlwaysFirstExperts)

        pm2 = _builtin_pm()
        pm2.register(Clash(), name="clash")
        resolve(pm2)
