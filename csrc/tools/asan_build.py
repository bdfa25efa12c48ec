"""Build the C kernels with AddressSanitizer (and UBSan) into a directory, print the module's path.

    python csrc/tools/asan_build.py OUT_DIR
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        ST_C_KERNELS_PATH=<printed path> python csrc/tools/asan_drive.py

tests/test_c_sanitizer.py runs exactly this in a subprocess.
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def build(out_dir: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "c"))
    from build import make_ffi   # backends/c/build.py, without importing the installed package

    ffi = make_ffi(extra_cflags=SAN + ["-O1", "-g"], extra_ldflags=SAN, absolute=True)
    ffi.compile(tmpdir=out_dir)   # absolute sources: objects land under out_dir, never in csrc/
    found = glob.glob(os.path.join(out_dir, "st_sdk_backends", "c", "_st_kernels*.so"))
    if not found:
        raise SystemExit(f"no module built under {out_dir}")
    return found[0]


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "build/asan"))
