"""Exercise every C entry point (all formats, prefill, decode, ring caches, growth, threads, variants,
bad input) so a sanitizer build can check them. Exits non-zero on any wrong result."""
from __future__ import annotations

import numpy as np

from st_sdk.errors import InputError
from st_sdk.testing import check_backend
from st_sdk_backends.c import backend as cb
from st_sdk_backends.c.backend import CBackend


def main() -> None:
    report = check_backend(CBackend, formats=("f32", "f16", "bf16", "q8_0", "q4_0"))
    assert report.ok, str(report)
    from st_sdk.synth import build_model

    ids = np.array([3, 17, 256, 99, 400, 12, 7, 311, 64, 128, 5, 460, 33], np.int64)
    _, lib = cb.ffi_lib()
    for variant in [v for v, c in cb.ops.VARIANTS.items() if lib.st_cpu_supports(c)]:
        cb.use_variant(variant)
        for fmt in ("f32", "q8_0", "q4_0"):
            for threads in (1, 2):
                m = build_model("tiny", fmt=fmt, backend="c", n_threads=threads)
                s = m.session(capacity=4)
                s.feed(ids[:9], chunk=4)
                for t in ids[9:]:
                    s.feed([int(t)])
    b = CBackend()
    b.is_available()
    for bad in (lambda: b.linear(np.zeros((1, 3), np.float32), None),
                lambda: b.embed(m.params.embed, [m.config.vocab_size])):
        try:
            bad()
        except (InputError, AttributeError):
            pass
    print("asan drive ok")


if __name__ == "__main__":
    main()
