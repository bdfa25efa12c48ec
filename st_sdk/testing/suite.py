"""`ConformanceSuite`: the pytest base class a backend author subclasses in their own test file.

    from st_sdk.testing import ConformanceSuite
    from my_backend import MyBackend

    class TestMyBackend(ConformanceSuite):
        backend = MyBackend
        formats = ("f32", "q8_0")     # the stored weight formats you claim
        dtypes = (None, "bfloat16")   # the compute dtypes you claim (None: float32)

Each inherited test method is one op, parametrised over its cases x formats x dtypes; ops the backend
does not override are skipped with that reason, and `test_model` always runs.
"""
from __future__ import annotations

import pytest

from .cases import CASES
from .check import make_backend, op_formats, run_case

_instances: dict = {}


def _op(name: str):
    def test(self, conformance_case):
        self._check(*conformance_case)
    test.__name__ = f"test_{name}"
    test.__doc__ = f"'{name}' agrees with the NumPy reference on every case, format and dtype."
    test._conformance_op = name
    return test


class ConformanceSuite:
    #: the Backend subclass under test (or a ready instance)
    backend = None
    #: stored weight formats and compute dtypes the backend claims
    formats: tuple[str, ...] = ("f32",)
    dtypes: tuple = (None,)
    #: looser bounds, {(fmt, dtype) | fmt | dtype: (op_tol, model_tol)}; say why next to them
    tolerances: dict | None = None
    n_threads: int | None = None
    seed: int = 0

    def pytest_generate_tests(self, metafunc):
        op = getattr(metafunc.function, "_conformance_op", None)
        if op is None:
            return
        params = []
        for dtype in self.dtypes:
            for fmt in op_formats(op, self.formats):
                for case, _ in CASES[op]:
                    pid = "-".join(str(p) for p in (case, fmt, dtype) if p is not None)
                    params.append(pytest.param((op, case, fmt, dtype), id=pid))
        metafunc.parametrize("conformance_case", params)

    def _instance(self, dtype):
        if self.backend is None:
            pytest.fail(f"{type(self).__name__} must set `backend = YourBackendClass`", pytrace=False)
        key = (self.backend, dtype, self.n_threads)
        if key not in _instances:
            _instances[key] = make_backend(self.backend, dtype, self.n_threads)
        b = _instances[key]
        if not b.is_available():
            pytest.skip(f"backend {b.name!r} unavailable: {b.unavailable_reason() or 'no reason given'}")
        return b

    def _check(self, op, case, fmt, dtype):
        from ..registry import reference_backend

        result = run_case(self._instance(dtype), reference_backend(), op, case, fmt, dtype,
                          self.tolerances, self.seed)
        if result.status == "skip":
            pytest.skip(result.detail)
        if result.status == "fail":
            pytest.fail(str(result), pytrace=False)

    test_embed = _op("embed")
    test_rms_norm = _op("rms_norm")
    test_linear = _op("linear")
    test_qkv = _op("qkv")
    test_rope = _op("rope")
    test_attention = _op("attention")
    test_route = _op("route")
    test_moe = _op("moe")
    test_layer = _op("layer")
    test_forward = _op("forward")
    test_model = _op("model")
