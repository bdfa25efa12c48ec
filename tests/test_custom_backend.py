"""The example third-party backend (examples/custom_backend), installed the way pip installs it:
found through its entry point, selected by name, running the model with the other ops falling back."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tomllib = pytest.importorskip("tomllib", reason="reading the example's pyproject.toml needs Python 3.11+")

from st_sdk import synth
from st_sdk.registry import get_registry, reset_registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_backend"


def install_like_pip(site: Path) -> Path:
    """Copy the package and write a *.dist-info whose entry_points.txt comes from the example's own
    pyproject.toml: what `pip install` leaves in site-packages, minus the build."""
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / "src" / "st_sdk_example_backend", site / "st_sdk_example_backend")
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
             for group, eps in meta["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return site


def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ST_BLOCK_PLUGINS", "c,torch,jax")
    for var in ("ST_BACKEND", "ST_DISABLE_PLUGIN_AUTOLOAD", "ST_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def installed(monkeypatch, tmp_path):
    clean_env(monkeypatch, tmp_path)
    site = install_like_pip(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    yield site
    reset_registry()
    for mod in [m for m in sys.modules if m.startswith("st_sdk_example_backend")]:
        del sys.modules[mod]


def test_discovered_through_its_entry_point(installed):
    reg = get_registry()
    assert "example" in reg.backends() and reg.provider("example") == "example"
    rec = reg.record("example")
    assert rec.dist == "st-sdk-example-backend" and rec.error is None and rec.backends == ["example"]
    assert sys.modules["st_sdk_example_backend"].__file__.startswith(str(installed))


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_selected_by_name_runs_with_fallbacks_and_matches_the_reference(installed, fmt):
    m = synth.build_model("tiny", fmt=fmt, backend="example")
    sel = m.selection
    assert sel.chosen == "example" and sel.rule.startswith("explicit")
    assert sel.candidate.native == ["rms_norm"]
    assert sel.fallbacks == ["embed", "linear", "rope", "new_cache", "attention", "route", "moe"]
    assert m.params.norm.value is not m.params.norm.raw       # its prepare() ran once at load
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    want = synth.build_model("tiny", fmt=fmt, backend="numpy").logits(ids)
    np.testing.assert_allclose(m.logits(ids), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # in automatic mode it is a candidate like the built-ins (ranked below the reference statically)
    auto = synth.build_model("tiny", fmt=fmt, backend="auto").selection
    assert next(c for c in auto.candidates if c.name == "example").available


def test_discovered_in_a_fresh_process(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]),
               ST_BACKEND="example")
    code = ("import sys; from st_sdk.cli import main; "
            "sys.exit(main(['backends', '--preset', 'tiny', '--json']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["chosen"] == "example" and doc["rule"] == "ST_BACKEND"
    assert any(p["name"] == "example" and p["dist"] == "st-sdk-example-backend" for p in doc["plugins"])


def test_its_own_conformance_test_passes(installed):
    pytest.importorskip("st_sdk.testing", reason="st_sdk.testing (the conformance kit) is not in this tree yet")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                       env=env, capture_output=True, text=True, cwd=EXAMPLE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.mark.slow
def test_real_pip_install(tmp_path, monkeypatch):
    """The example really is a pip-installable package (built by setuptools, no network)."""
    clean_env(monkeypatch, tmp_path)
    target = tmp_path / "target"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(EXAMPLE)], capture_output=True, text=True)
    if r.returncode != 0 and "setuptools" in r.stderr and "No module named" in r.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(target.glob("st_sdk_example_backend-*.dist-info/entry_points.txt"))
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("from st_sdk.registry import get_registry; from st_sdk import synth;"
            "assert 'example' in get_registry().backends();"
            "m = synth.build_model('tiny', backend='example'); print(m.selection.chosen, m.logits([1, 2]).shape)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["example", "(2,", "512)"]
