"""The plugin system: hook specifications, entry-point discovery, broken plugins, env controls, the
selection-policy and step-wrapper hooks."""
import inspect
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from st_sdk import hookspecs, synth
from st_sdk.plugins import hookimpl
from st_sdk.registry import get_registry, reset_registry
from st_sdk_backends.numpy.backend import NumpyBackend


def install_fake_dist(site, dist, entry_points, modules):
    """Lay out a distribution the way `pip install` does: package files plus a *.dist-info with
    entry_points.txt, so discovery goes through importlib.metadata like for any installed plugin."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[st_sdk.backends]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, src in modules.items():
        (site / name).write_text(textwrap.dedent(src))
    return site


GOOD = """
    from st_sdk import hookimpl
    from st_sdk_backends.numpy.backend import NumpyBackend

    class Good(NumpyBackend):
        name = "good"
        def score(self, hardware, fmt):
            return 0.5

    @hookimpl
    def st_sdk_backends():
        return [Good]
"""
BROKEN_IMPORT = "raise RuntimeError('this plugin is broken on purpose')\n"
BROKEN_HOOK = """
    from st_sdk import hookimpl

    @hookimpl
    def st_sdk_backends():
        raise ValueError('no backends today')
"""


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("ST_BACKEND", "ST_DISABLE_PLUGIN_AUTOLOAD", "ST_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ST_BLOCK_PLUGINS", "c,torch,jax")
    site = install_fake_dist(tmp_path / "site", "st-sdk-test-plugins",
                             {"good": "st_test_good", "broken": "st_test_broken", "badhook": "st_test_badhook"},
                             {"st_test_good.py": GOOD, "st_test_broken.py": BROKEN_IMPORT,
                              "st_test_badhook.py": BROKEN_HOOK})
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    yield monkeypatch
    reset_registry()
    for mod in ("st_test_good", "st_test_broken", "st_test_badhook"):
        sys.modules.pop(mod, None)


def test_every_hook_is_documented_where_declared():
    specs = [f for n, f in vars(hookspecs).items() if n.startswith("st_sdk_") and callable(f)]
    assert {f.__name__ for f in specs} == {"st_sdk_backends", "st_sdk_select_backend", "st_sdk_wrap_step"}
    for f in specs:
        doc = inspect.getdoc(f)
        assert doc and "Called by" in doc and ("return" in doc.lower()), f.__name__
    assert hookimpl.project_name == "st_sdk"


def test_broken_plugins_are_recorded_and_skipped(env, caplog):
    reg = get_registry()
    recs = {p.name: p for p in reg.plugins}
    assert "RuntimeError: this plugin is broken on purpose" in recs["broken"].error
    assert set(reg.backends()) >= {"numpy", "good"}
    assert "no backends today" in recs["badhook"].error
    assert recs["good"].error is None and recs["good"].backends == ["good"]
    assert recs["good"].dist == "st-sdk-test-plugins"
    m = synth.build_model("tiny", backend="auto")          # the host still works
    by = {c.name: c for c in m.selection.candidates}
    assert "broken on purpose" in by["broken"].reason and not by["broken"].available
    assert by["good"].available
    with pytest.raises(Exception, match="broken on purpose"):
        synth.build_model("tiny", backend="broken")        # asking for it explains why it is missing


def test_block_and_autoload_controls(env):
    env.setenv("ST_BLOCK_PLUGINS", "c,torch,jax,good")
    reset_registry()
    reg = get_registry()
    assert "good" not in reg.backends() and "ST_BLOCK_PLUGINS" in reg.record("good").error

    env.setenv("ST_BLOCK_PLUGINS", "c,torch,jax,numpy")   # the reference cannot be blocked
    env.setenv("ST_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_registry()
    reg = get_registry()
    assert "numpy" in reg.backends() and "good" not in reg.backends()
    assert "ST_DISABLE_PLUGIN_AUTOLOAD" in reg.record("good").error
    assert reg.record("broken").error.startswith("not loaded")   # not even imported

    env.setenv("ST_PLUGINS", "good")
    reset_registry()
    assert "good" in get_registry().backends()


class Policy:
    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    @hookimpl
    def st_sdk_select_backend(self, candidates, weight_format):
        self.calls += 1
        assert weight_format == "f32" and {c.name for c in candidates} >= {"numpy", "good"}
        return self.answer


def test_selection_policy_first_result_wins_and_is_recorded(env):
    reg = get_registry()
    abstain, first, ignored = Policy(None), Policy("good"), Policy("numpy")
    reg.register(ignored, name="policy-early")
    reg.register(first, name="policy-late")      # pluggy asks the last registered first
    reg.register(abstain, name="policy-abstain")
    sel = synth.build_model("tiny", backend="auto").selection
    assert sel.chosen == "good" and sel.rule == "selection plugin 'policy-late'"
    assert abstain.calls == 1 and first.calls == 1 and ignored.calls == 0
    # an explicit request is not up to policy plugins
    assert synth.build_model("tiny", backend="numpy").selection.chosen == "numpy" and first.calls == 1


def test_selection_policy_naming_an_unavailable_backend_is_ignored(env):
    reg = get_registry()
    reg.register(Policy("nosuch"), name="policy-bad")
    sel = synth.build_model("tiny", backend="auto").selection
    assert sel.chosen == "numpy" and sel.rule.startswith("static score")
    assert any("policy-bad" in n and "nosuch" in n for n in sel.notes)


class Tracer:
    def __init__(self):
        self.wrapped, self.steps = 0, []

    @hookimpl
    def st_sdk_wrap_step(self, step, backend, config):
        self.wrapped += 1

        def traced(ids, positions, cache, last_only=False):
            self.steps.append(len(ids))
            return step(ids, positions, cache, last_only)

        return traced


def test_step_wrapper_wraps_once_at_load_and_sees_every_step(env):
    plain = synth.build_model("tiny", backend="numpy")
    tracer = Tracer()
    get_registry().register(tracer, name="tracer")
    m = synth.build_model("tiny", backend="numpy")
    assert tracer.wrapped == 1 and m.selection.step_wrappers == ["tracer"]
    s = m.session()
    first = s.feed(list(range(10)), chunk=4)
    nxt = s.feed([3])
    assert tracer.steps == [4, 4, 2, 1] and tracer.wrapped == 1
    ref = plain.session()
    np.testing.assert_array_equal(first, ref.feed(list(range(10)), chunk=4))
    np.testing.assert_array_equal(nxt, ref.feed([3]))
    # the data plane is plain callables: the backend's own functions, no hook dispatch per op
    assert m.ops.linear is NumpyBackend.linear and m.ops.moe is NumpyBackend.moe


class BrokenTracer:
    @hookimpl
    def st_sdk_wrap_step(self, step):
        raise RuntimeError("tracer bug")


def test_a_broken_step_wrapper_does_not_stop_loading(env, caplog):
    get_registry().register(BrokenTracer(), name="brokentracer")
    m = synth.build_model("tiny", backend="numpy")
    assert m.selection.step_wrappers == [] and m.logits([1, 2]).shape == (2, 512)
    assert any("tracer bug" in r.getMessage() for r in caplog.records)


def test_import_st_sdk_is_light():
    code = ("import sys, st_sdk, st_sdk.hardware, st_sdk.registry, st_sdk.selection, st_sdk.selection_cache;"
            "st_sdk.hardware.probe();"
            "bad = [m for m in ('torch', 'jax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
