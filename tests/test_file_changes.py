"""A model file that changes under a loaded model: truncated or overwritten in place, the next call raises
WeightError naming the file and the process lives on (it used to die of SIGBUS, or produce garbage);
replaced by a rename or deleted, the model keeps running on the weights it loaded. Each scenario runs
in a child process, so a regression fails the test instead of killing the suite."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY_IDS

CHILD = textwrap.dedent("""
    import json, os, shutil, sys
    import numpy as np
    import st_sdk
    src, other, backend, work = sys.argv[1:5]
    ids = json.loads(sys.argv[5])
    results = {}
    for scenario in sys.argv[6:]:
        change, budget = scenario.split(":")
        path = os.path.join(work, scenario.replace(":", "-"), os.path.basename(src))
        os.makedirs(os.path.dirname(path))
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, path)
        m = st_sdk.load(path, backend=backend, **({"max_memory": "2GiB"} if budget == "budget" else {}))
        target = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
        if change == "delete-first":   # before any expert was read: the reference is the original file
            os.unlink(target)
            before = st_sdk.load(src, backend=backend).logits(ids)
        else:
            before = m.logits(ids)
        new = other if os.path.isfile(other) else os.path.join(other, "model.safetensors")
        if change == "truncate":
            os.truncate(target, os.path.getsize(target) // 2)
        elif change == "overwrite":   # what `cp other target` does: same inode, new bytes
            with open(new, "rb") as f, open(target, "r+b") as g:
                g.write(f.read())
        elif change == "rename":
            shutil.copy(new, target + ".new")
            os.replace(target + ".new", target)
        elif change == "delete":
            os.unlink(target)
        out = {"path": path}
        for call in ("logits", "generate"):
            try:
                if call == "logits":
                    got = m.logits(ids)
                    out[call] = {"ok": True, "same": bool(np.abs(got - before).max() <= 1e-4 * np.abs(before).max())}
                else:
                    out[call] = {"ok": True, "tokens": m.generate(ids, max_new_tokens=3, temperature=0).token_ids}
            except st_sdk.STError as e:
                out[call] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[scenario] = out
        print("RESULT " + json.dumps({scenario: out}), flush=True)
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny models of the same shapes and sizes (seeds 0 and 1), as GGUF and HF."""
    from st_sdk.synth import write_model

    root = tmp_path_factory.mktemp("changing")
    return {seed: write_model(root / f"seed{seed}", seed=seed) for seed in (0, 1)}


def run_child(files, tmp_path, kind, backend, scenarios):
    """{scenario: {"path", "logits", "generate"}} from one child process running every scenario."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(files[0][kind]), str(files[1][kind]), backend,
                           str(tmp_path), json.dumps(TINY_IDS), *scenarios],
                          capture_output=True, text=True, timeout=600)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[7:]))
    assert proc.returncode == 0 and len(out) == len(scenarios), \
        f"child died (rc {proc.returncode}) after {list(out)}: {proc.stderr[-3000:]}"
    return out


def _backends():
    out = ["numpy", "c"]
    for name in ("torch", "jax"):
        try:
            __import__(name)
            out.append(name)
        except ImportError:
            pass
    return out


def assert_raises_naming(out, name):
    for call in ("logits", "generate"):
        assert not out[call]["ok"], out
        assert out[call]["error"].startswith("WeightError") and name in out[call]["error"], out
        assert "changed on disk" in out[call]["error"], out


@pytest.mark.parametrize("backend", _backends())
def test_gguf_changed_in_place_raises_at_the_next_call(files, tmp_path, backend):
    # the check runs before the backend's step, so one scenario per slow-to-start backend is enough
    scenarios = ["truncate:", "overwrite:", "truncate:budget", "overwrite:budget"] if backend in ("numpy", "c") \
        else ["truncate:"]
    for scenario, out in run_child(files, tmp_path, "gguf", backend, scenarios).items():
        assert_raises_naming(out, out["path"])


def test_hf_shard_changed_in_place_raises(files, tmp_path):
    for scenario, out in run_child(files, tmp_path, "hf", "c", ["truncate:", "overwrite:"]).items():
        assert_raises_naming(out, "model.safetensors")


def test_file_replaced_by_rename_or_deleted_keeps_the_loaded_weights(files, tmp_path):
    """The mapped inode (and, under a budget, the descriptor the expert reads use) outlives the path:
    a deleted file used to raise a raw FileNotFoundError at the first expert read."""
    scenarios = ["rename:", "delete:", "rename:budget", "delete:budget", "delete-first:budget"]
    for scenario, out in run_child(files, tmp_path, "gguf", "c", scenarios).items():
        assert out["logits"] == {"ok": True, "same": True}, (scenario, out)
        assert out["generate"]["ok"], (scenario, out)
