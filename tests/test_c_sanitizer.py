"""The C kernels under AddressSanitizer + UBSan: a separate build of the cffi module, driven through
every entry point in a subprocess (csrc/tools/asan_drive.py). Skips, saying why, when gcc or the
sanitizer runtime is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _libasan() -> str | None:
    if not shutil.which("gcc"):
        return None
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.slow
def test_kernels_clean_under_address_sanitizer(tmp_path):
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc with the AddressSanitizer runtime (libasan) is not installed")
    build = subprocess.run([sys.executable, str(ROOT / "csrc" / "tools" / "asan_build.py"), str(tmp_path)],
                           capture_output=True, text=True, timeout=1200)
    if build.returncode != 0:
        pytest.skip(f"sanitizer build failed (toolchain without ASan support?): {build.stderr[-500:]}")
    module = build.stdout.strip().splitlines()[-1]
    libubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    preload = " ".join(p for p in (libasan, libubsan) if os.path.isabs(p) and os.path.exists(p))
    env = dict(os.environ, LD_PRELOAD=preload, ST_C_KERNELS_PATH=module,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="halt_on_error=1:exitcode=87:print_stacktrace=1")
    run = subprocess.run([sys.executable, str(ROOT / "csrc" / "tools" / "asan_drive.py")], env=env,
                         capture_output=True, text=True, timeout=1200)
    log = run.stdout[-3000:] + run.stderr[-6000:]
    assert "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, log
    assert run.returncode == 0, log
    assert "asan drive ok" in run.stdout
