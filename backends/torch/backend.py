"""The PyTorch backend: every op of the graph (st_sdk/graph.py), on the best device torch sees.

Device: CUDA when torch sees one, else CPU. Compute dtype: bfloat16 where the hardware runs it well
(CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX, where oneDNN has bf16 GEMM kernels and the
weights move half the bytes of float32), float32 otherwise; `dtype="float32" | "bfloat16"` overrides.
Weights are converted (every GGUF block type dequantised through gguf-py, widened/narrowed from
F16/BF16/F32) and placed on the device once, at load. This module imports torch lazily so discovery never pays for it.
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from st_sdk import kv
from st_sdk.backend import COMPUTE_DTYPES, DTYPE_ALIASES, FLOAT32_ROLES, Backend, ModelParams, Param, is_offloaded
from st_sdk.errors import BackendError, InputError
from st_sdk.hardware import THREADS_ENV, resolve_threads
from st_sdk.weights.mapping import release_map
from st_sdk.weights.tensor import FLOATS, QUANT_SIZES

ROWS_PER_CHUNK = 8192   # dequantise this many rows at a time: bounded float32 scratch at load
SPIN_COUNT = "1000"     # libgomp's busy-wait iterations before a worker sleeps (its default: 300000)


def _cpu_has_bf16() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def default_dtype(device) -> str:
    import torch

    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if _cpu_has_bf16() else "float32"


class TorchBackend(Backend):
    name = "torch"
    version = "0"
    install_hint = 'pip install -e ".[torch]" (from a clone of st-sdk)'
    formats = FLOATS
    converts = tuple(QUANT_SIZES)   # every GGUF block type, dequantised to the compute dtype at load
    #: KV cache storage types (f16 by default: half the bytes of float32 per token)
    kv_dtypes = ("f16", "bf16", "f32")
    #: under max_memory its moe runs on the expert cache, each expert dequantised to the compute dtype as
    #: it is read (expert_layout); only when named: "auto" under a budget does not import torch
    supports_offload = "named"

    def __init__(self, n_threads: int | None = None, dtype: str | None = None, device: str | None = None,
                 moe_decode: str | None = None):
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        super().__init__(n_threads=n_threads, dtype=dtype)
        if dtype not in (None, "auto", *COMPUTE_DTYPES):
            raise BackendError(f"torch backend: dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
        self._device_req = device
        self._moe_decode = moe_decode   # "gather" | "loop" | None (gather on accelerators, loop on CPU)
        self._qkv: dict[int, tuple] = {}       # id(wq view) -> (the view, its [nq + 2 nkv, H] q/k/v matrix)
        self._stacked: dict[int, tuple] = {}   # id(gate view) -> (the view, gate+up, per-expert views)
        self._mapped: set[int] = set()         # ids of tensors that alias the weight file (not copies)
        self._keep: list = []

    # ---- control plane -------------------------------------------------------------------
    def setup(self) -> None:
        """Import torch (with the process settings below), pick the device and compute dtype."""
        if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
            # OpenMP reads this once, when torch loads. A decode step is hundreds of short matmuls a few
            # microseconds apart: workers that sleep at once pay a wake-up on each (27% slower layers,
            # measured), while libgomp's default 3 ms of spinning stalls every matmul on a busy host.
            # About 10 us of spinning bridges the gaps and no more. The user's setting wins.
            os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        # Weights in 4 KiB pages cost a TLB miss every 4 KiB a token streams, and the page tables of
        # 8 GiB of weights do not fit in cache; torch's allocator asks for 2 MiB pages with this set,
        # read at its first large allocation (4b-a0.6b F16 decode: 11.2 -> 14.7 tok/s, measured)
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        import torch

        type(self).version = torch.__version__
        if self._device_req:
            self.device = torch.device(self._device_req)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype if self.dtype in COMPUTE_DTYPES else default_dtype(self.device)
        self.torch_dtype = getattr(torch, self.dtype)
        self.gather = (self._moe_decode or ("loop" if self.device.type == "cpu" else "gather")) == "gather"
        if self.n_threads is not None or os.environ.get(THREADS_ENV):   # else torch's own default
            torch.set_num_threads(resolve_threads(self.n_threads))
        from . import ops

        self.ops = ops
        self.torch = torch
        self._onednn = torch.backends.mkldnn.enabled

    def devices(self) -> list[str]:
        try:
            import torch
        except ImportError:
            return []
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def score(self, hardware, fmt: str) -> float:
        self.check_available()
        return 100.0 if self.device.type == "cuda" else 5.0

    def describe(self):
        self.check_available()
        import torch

        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(self.device)})"
        cache = "float32" if self.device.type == "cpu" else kv.FRAMEWORK_DTYPE[self.kv_dtypes[0]]
        return {"device": dev, "compute_dtype": self.dtype,
                "attention": f"scaled_dot_product_attention ({self.ops.sdpa_kernel(self.device, getattr(torch, cache))}"
                             f", {cache}) for chunks" + ("; one token: float32 bmm" if self.device.type == "cpu" else ""),
                "weights": f"converted once at load to {self.dtype} on {self.device.type} "
                           f"(quantised types dequantised at load; norms and router kept float32)",
                "moe_decode": "gather picked experts on device" if self.gather else "slice picked experts in place",
                "threads": torch.get_num_threads()}

    # ---- weights -------------------------------------------------------------------------
    def prepare(self, param: Param, role: str):
        import torch

        t = param.raw
        dtype = torch.float32 if role in FLOAT32_ROLES else self.torch_dtype
        # a converted copy replaces the file's pages in this process (they refault if ever read again)
        if t.parts is not None:   # HF per-expert tensors: stack once into [E, ...]
            out = torch.empty(t.shape, dtype=dtype, device=self.device)
            for e, part in enumerate(t.parts):
                out[e] = self._convert(part.fmt, part.data, part.shape, dtype)
                release_map(part.data)
            return out
        if self._can_map(t.fmt, dtype, t.data):
            return self._map(t.data, dtype)
        if len(t.shape) == 3:     # GGUF stacked experts: convert one expert at a time
            out = torch.empty(t.shape, dtype=dtype, device=self.device)
            for e in range(t.shape[0]):
                out[e] = self._convert(t.fmt, t.data[e], t.shape[1:], dtype)
                release_map(t.data[e])
            return out
        out = self._convert(t.fmt, t.data, t.shape, dtype)
        release_map(t.data)
        return out

    def _can_map(self, fmt: str, dtype, data: np.ndarray) -> bool:
        """Stored exactly as computed, on the CPU: use the (memory-mapped) storage in place."""
        torch = self.torch
        same = (fmt, dtype) in (("bf16", torch.bfloat16), ("f32", torch.float32))
        return same and self.device.type == "cpu" and data.flags.c_contiguous

    def _map(self, data: np.ndarray, dtype):
        """A tensor over the file's pages, no copy (weights are only ever read)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # torch warns that the map is read-only
            t = self.torch.from_numpy(data.view(np.int16) if dtype == self.torch.bfloat16 else data)
        t = t.view(dtype) if dtype == self.torch.bfloat16 else t
        self._mapped.add(id(t))
        self._keep.append(t)   # keeps the id meaningful
        return t

    def _convert(self, fmt: str, data: np.ndarray, shape, dtype):
        """Storage array of one 1-D/2-D tensor -> torch tensor of `dtype` on the device, one copy."""
        import torch

        from st_sdk.weights.tensor import dequantize

        if fmt in ("f32", "f16", "bf16"):
            arr = np.ascontiguousarray(data)
            with warnings.catch_warnings():   # a read-only memory map is fine: it is only read, then copied
                warnings.simplefilter("ignore", UserWarning)
                src = torch.from_numpy(arr.view(np.int16) if fmt == "bf16" else arr)
            if fmt == "bf16":
                src = src.view(torch.bfloat16)
            # copy=True: never alias the caller's (possibly memory-mapped, read-only) storage
            return src.to(device=self.device, dtype=dtype, copy=True)
        out = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        rows = out.view(-1, shape[-1])
        blocks = data.reshape(rows.shape[0], -1)
        for r in range(0, rows.shape[0], ROWS_PER_CHUNK):
            chunk = blocks[r:r + ROWS_PER_CHUNK]
            rows[r:r + len(chunk)] = torch.from_numpy(dequantize(fmt, chunk, (len(chunk), shape[-1])))
        return out

    # ---- array boundary ------------------------------------------------------------------
    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)

    def from_numpy(self, x: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    # ---- the op set: the graph (st_sdk/graph.py) runs these -------------------------------
    def context(self, config, positions):
        return self.ops.TorchContext(positions, config.rope_theta, self.device, self._onednn)

    def embed(self, table: Param, ids):
        return self.ops.embed(table.value, ids)

    def rms_norm(self, x, weight: Param, eps: float):
        return self.ops.rms_norm(x, weight.value, eps, self.torch_dtype)

    def linear(self, x, weight: Param):
        return self.ops.linear(x, weight.value)

    def qkv(self, x, wq: Param, wk: Param, wv: Param):
        view, stacked = self._qkv.get(id(wq.value), (None, None))
        return self.ops.qkv(x, wq.value, wk.value, wv.value, stacked if view is wq.value else None)

    def rope(self, q, k, ctx):
        return self.ops.rope(q, k, ctx)

    def new_cache(self, config, capacity: int, kv_dtype: str | None = None):
        kv_dtype = kv.storage(kv_dtype or self.kv_dtypes[0])
        if kv_dtype not in self.kv_dtypes:
            raise InputError(f"kv_dtype={kv_dtype!r}: the torch backend stores its KV cache as one of "
                             f"{', '.join(self.kv_dtypes)}")
        return self.ops.new_cache(config, capacity, kv_dtype, self.device)

    def attention(self, q, k, v, layer_cache, ctx, window):
        return self.ops.attention(q, k, v, layer_cache, ctx, window)

    def route(self, x, router: Param, k: int, softmax: bool):
        return self.ops.route(x, router.value, k, softmax)

    def moe(self, x, gate: Param, up: Param, down: Param, ids, weights):
        if is_offloaded(gate):
            return self._offloaded_moe(x, gate.raw, up.raw, down.raw, ids, weights)
        view, gu, experts = self._stacked.get(id(gate.value), (None, None, None))
        if view is not gate.value:   # not stacked by prepare_model: use the two tensors as they are
            gu, experts = (gate.value, up.value), None
        return self.ops.moe(x, gu, down.value, ids, weights, self.gather, experts)

    def expert_layout(self, fmt: str, rows: int, cols: int, role: str):
        """Under a memory budget, experts are held in the cache dequantised to the compute dtype, as the
        loaded ones are: converted once per read, never per use."""
        from st_sdk.offload.experts import Dequantised

        return Dequantised(fmt, rows, cols, self.dtype)

    def _offloaded_moe(self, x, gate, up, down, ids, weights):
        """MoE over the memory-budget cache's slots: the picked experts as tensors over their slots (no
        copy on the CPU), as many at once as the cache holds; each expert runs on its tokens."""
        torch = self.torch
        linear = torch.nn.functional.linear
        cache, layer = gate.cache, gate.layer
        ids_np = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids).reshape(x.shape[0], -1)
        w = torch.as_tensor(weights, device=x.device).float()
        layouts = (gate.layout, up.layout, down.layout)
        out = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)
        picked = list(dict.fromkeys(ids_np.ravel().tolist()))
        group = max(1, cache.slots - 1)
        for start in range(0, len(picked), group):
            experts = picked[start:start + group]
            for e, parts in zip(experts, cache.get_many(layer, experts)):
                g, u, d = (self._slot_tensor(lay, v) for lay, v in zip(layouts, parts))
                tok, slot = np.nonzero(ids_np == e)
                rows = torch.from_numpy(tok).to(x.device)
                xs = x.index_select(0, rows).to(g.dtype)
                act = torch.relu(linear(xs, g)).mul_(linear(xs, u))
                out.index_add_(0, rows, linear(act, d).float() * w[rows, torch.from_numpy(slot).to(x.device)][:, None])
        return out

    def _slot_tensor(self, layout, view):
        """A cache slot's dequantised matrix as a tensor on the device (over the slot itself on the CPU)."""
        torch = self.torch
        arr = layout.array(view)
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if layout.dtype == "bfloat16" else \
            torch.from_numpy(arr)
        return t.to(self.device)

    def prepare_model(self, params: ModelParams, config) -> None:
        """Stack each layer's q/k/v rows into one matrix and gate/up into one [E, 2F, H] tensor, so a
        step runs one GEMM where it would run three (or two); the per-role params become views of
        them, so nothing is held twice. `qkv` and `moe` find the stacked tensors by their views."""
        torch = self.torch
        for lp in params.layers:
            qkv = torch.cat([lp.wq.value, lp.wk.value, lp.wv.value])
            nq, nk = lp.wq.value.shape[0], lp.wk.value.shape[0]
            lp.wq.value, lp.wk.value, lp.wv.value = qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:]
            self._qkv[id(lp.wq.value)] = (lp.wq.value, qkv)
            if is_offloaded(lp.gate):   # read on demand under a memory budget
                continue
            if id(lp.gate.value) in self._mapped or id(lp.up.value) in self._mapped:
                gu = (lp.gate.value, lp.up.value)   # used in place from the file: stacking would copy them
            else:
                F_ = lp.gate.value.shape[1]
                gu = torch.cat([lp.gate.value, lp.up.value], dim=1)
                lp.gate.value, lp.up.value = gu[:, :F_], gu[:, F_:]
            # per-expert views for the CPU's one-token step: a list index, not a tensor op, per expert
            experts = None if self.gather else (
                tuple(list(t.unbind(0)) for t in gu) if isinstance(gu, tuple) else list(gu.unbind(0)),
                list(lp.down.value.unbind(0)))
            self._stacked[id(lp.gate.value)] = (lp.gate.value, gu, experts)
