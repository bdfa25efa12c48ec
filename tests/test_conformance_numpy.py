"""The conformance kit on the NumPy reference backend (equal by construction: this proves the kit runs),
and proof that it catches wrong backends, one deliberate mistake per op, through both of its APIs."""
from __future__ import annotations

import numpy as np
import pytest

from st_sdk.testing import ConformanceSuite, check_backend, tolerance
from st_sdk_backends.numpy import ops as np_ops
from st_sdk_backends.numpy.backend import NumpyBackend

pytest_plugins = ["pytester"]


class TestNumpyConformance(ConformanceSuite):
    backend = NumpyBackend
    formats = ("f32", "f16", "bf16", "q8_0", "q4_0")
    dtypes = (None,)


# ---- deliberately wrong backends: each gets one op wrong ------------------------------------------

class NormPlusOne(NumpyBackend):
    name = "norm-plus-one"          # the Gemma-style `1 + w` offset SmallThinker does not have

    @staticmethod
    def rms_norm(x, weight, eps):
        x = x.astype(np.float32)
        return (1.0 + weight.raw.numpy()) * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


class EpsOutsideSqrt(NumpyBackend):
    name = "eps-outside-sqrt"

    @staticmethod
    def rms_norm(x, weight, eps):
        return weight.raw.numpy() * (x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps))


class EmbedOffByOne(NumpyBackend):
    name = "embed-off-by-one"

    @staticmethod
    def embed(table, ids):
        return np_ops.embed(table, (np.asarray(ids) + 1) % table.raw.shape[0])


class LinearDropsLastBlock(NumpyBackend):
    name = "linear-drops-last-block"

    @staticmethod
    def linear(x, weight):
        w = weight.raw.numpy()
        return x[:, :-32] @ w[:, :-32].T


class InterleavedRope(NumpyBackend):
    name = "interleaved-rope"

    @staticmethod
    def rope(q, k, ctx):
        def rotate(x):
            T, n, hd = x.shape
            pairs = x.reshape(T, n, hd // 2, 2)
            inv_freq = ctx.theta ** (-np.arange(0, hd, 2) / hd)
            ang = np.asarray(ctx.positions)[:, None, None] * inv_freq[None, None, :]
            c, s = np.cos(ang), np.sin(ang)
            a, b = pairs[..., 0], pairs[..., 1]
            return np.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(T, n, hd).astype(np.float32)
        return rotate(q), rotate(k)


class WindowOffByOne(NumpyBackend):
    name = "window-off-by-one"      # sees window + 1 keys

    @staticmethod
    def attention(q, k, v, cache, ctx, window):
        return np_ops.attention(q, k, v, cache, ctx, window + 1 if window else None)


class AlwaysSigmoid(NumpyBackend):
    name = "always-sigmoid"         # ignores moe_primary_router_apply_softmax

    @staticmethod
    def route(x, weight, k, softmax):
        return np_ops.route(x, weight, k, False)


class SiluExperts(NumpyBackend):
    name = "silu-experts"

    @staticmethod
    def moe(x, gate, up, down, ids, weights):
        out = np.zeros_like(x)
        for t in range(len(x)):
            for w, e in zip(weights[t], ids[t]):
                g = x[t] @ gate.raw.expert(int(e)).numpy().T
                u = x[t] @ up.raw.expert(int(e)).numpy().T
                out[t] += w * ((u * g / (1 + np.exp(-g))) @ down.raw.expert(int(e)).numpy().T)
        return out


class FusedLayerNormedRouter(NumpyBackend):
    name = "fused-layer-normed-router"   # a fused layer that routes on the normed stream

    def layer(self, cfg, i, p, h, ctx, cache):
        from st_sdk.backend import bind_ops
        from st_sdk.graph import decoder_layer

        ops = bind_ops(NumpyBackend(), NumpyBackend())
        route = ops.route
        ops.route = lambda x, w, k, s: route(ops.rms_norm(x, p.attn_norm, cfg.rms_norm_eps), w, k, s)
        return decoder_layer(ops, cfg, i, p, h, ctx, cache)


BROKEN = [(NormPlusOne, "rms_norm"), (EpsOutsideSqrt, "rms_norm"), (EmbedOffByOne, "embed"),
          (LinearDropsLastBlock, "linear"), (InterleavedRope, "rope"), (WindowOffByOne, "attention"),
          (AlwaysSigmoid, "route"), (SiluExperts, "moe"), (FusedLayerNormedRouter, "layer")]


@pytest.mark.parametrize("cls,op", BROKEN, ids=[c.name for c, _ in BROKEN])
def test_check_backend_reports_the_broken_op(cls, op):
    report = check_backend(cls, formats=("f32",), ops=[op])
    assert not report.ok
    assert {r.op for r in report.failures} == {op}
    assert cls.name in str(report) and "FAIL" in str(report)
    # the failures name the case and how far off it was
    assert all(r.err > r.tol and r.detail for r in report.failures)


def test_whole_model_check_catches_a_wrong_op():
    """Even an op the author forgot to list is caught by the always-run whole-model check."""
    report = check_backend(NormPlusOne, formats=("f32",), ops=["model"])
    assert {(r.op, r.case) for r in report.failures} >= {("model", "logits")}


def test_eps_outside_sqrt_is_caught_only_where_eps_matters():
    report = check_backend(EpsOutsideSqrt, formats=("f32",), ops=["rms_norm"])
    assert {r.case for r in report.failures} == {"eps-dominates"}


def test_reference_backend_passes_every_format():
    report = check_backend(NumpyBackend, formats=("f32", "q4_0"), ops=["linear", "moe", "model"])
    assert report.ok, str(report)
    assert report.passed and all(r.err <= r.tol for r in report.passed)


def test_unavailable_backend_is_reported_not_failed():
    class Missing(NumpyBackend):
        name = "missing"

        def is_available(self):
            return False

        def unavailable_reason(self):
            return "libfoo not found"

    report = check_backend(Missing)
    assert report.ok and len(report.results) == 1 and "libfoo not found" in report.results[0].detail


def test_tolerance_table():
    assert tolerance("f32") == 1e-4
    assert tolerance("q8_0") > tolerance("f32")
    assert tolerance("f32", "bf16") == tolerance("f32", "bfloat16") > tolerance("f32", "float16")
    assert tolerance("q4_0", None, "model") >= tolerance("q4_0", None, "op")
    assert tolerance("f32", None, overrides={"f32": (1e-3, 1e-2)}) == 1e-3
    with pytest.raises(ValueError, match="unknown compute dtype"):
        tolerance("f32", "int3")


def test_suite_subclass_fails_in_pytest_for_a_wrong_backend(pytester):
    """What an author sees: their ConformanceSuite subclass fails on the broken op and passes or
    skips the rest."""
    pytester.makepyfile(test_mine="""
        import numpy as np
        from st_sdk.testing import ConformanceSuite
        from st_sdk_backends.numpy.backend import NumpyBackend

        class Mine(NumpyBackend):
            name = "mine"
            @staticmethod
            def rms_norm(x, weight, eps):
                return (1.0 + weight.raw.numpy()) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

        class TestMine(ConformanceSuite):
            backend = Mine
            formats = ("f32",)
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "rms_norm or model or rope")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 4          # three rms_norm cases and the model logits
    assert outcomes.get("passed", 0) >= 3          # rope and the self-consistency model checks
    result.stdout.fnmatch_lines(["*FAILED*test_rms_norm*"])
