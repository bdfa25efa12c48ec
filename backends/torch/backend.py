"""The PyTorch backend: every op plus a fused whole-step `forward`, on the best device torch sees.

Device: CUDA when torch sees one, else CPU. Compute dtype: bfloat16 where the hardware runs it well
(CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX, where oneDNN has bf16 GEMM kernels and the
weights move half the bytes of float32), float32 otherwise; `dtype="float32" | "bfloat16"` overrides.
Weights are converted (dequantised from Q8_0/Q4_0, widened/narrowed from F16/BF16/F32) and placed on
the device once, at load. This module imports torch lazily so discovery never pays for it.
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from st_sdk.backend import Backend, ModelParams, Param
from st_sdk.errors import BackendError
from st_sdk.weights.mapping import release_map

DTYPES = ("float32", "bfloat16")
ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16"}
#: roles kept in float32 whatever the compute dtype: cheap, and precision there decides the top-k
FLOAT32_ROLES = ("attn_norm", "ffn_norm", "norm", "router")
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

    def __init__(self, n_threads: int | None = None, dtype: str | None = None, device: str | None = None,
                 moe_decode: str | None = None):
        dtype = ALIASES.get(dtype, dtype)
        super().__init__(n_threads=n_threads, dtype=dtype)
        if dtype not in (None, "auto", *DTYPES):
            raise BackendError(f"torch backend: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self._device_req = device
        self._moe_decode = moe_decode   # "gather" | "loop" | None (gather on accelerators, loop on CPU)
        self._error: str | None = None
        self._ready = False
        self._stacked: dict[int, tuple] = {}   # id(gate view) -> (the view, its [E, 2F, H] gate+up tensor)
        self._mapped: set[int] = set()         # ids of tensors that alias the weight file (not copies)
        self._keep: list = []

    # ---- control plane -------------------------------------------------------------------
    def is_available(self) -> bool:
        try:
            self._setup()
        except ImportError as e:
            self._error = f'torch is not installed ({e}); install with `pip install -e ".[torch]"` from a clone of st-sdk'
            return False
        except Exception as e:  # a broken CUDA install must not break selection
            self._error = f"torch failed to initialise: {type(e).__name__}: {e}"
            return False
        return True

    def unavailable_reason(self) -> str | None:
        return self._error

    def _setup(self) -> None:
        if self._ready:
            return
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
        self.dtype = self.dtype if self.dtype in DTYPES else default_dtype(self.device)
        self.torch_dtype = getattr(torch, self.dtype)
        self.gather = (self._moe_decode or ("loop" if self.device.type == "cpu" else "gather")) == "gather"
        if self.n_threads:
            torch.set_num_threads(int(self.n_threads))
        from . import ops

        self.ops = ops
        self.torch = torch
        self._onednn = torch.backends.mkldnn.enabled
        self._ready = True

    def devices(self) -> list[str]:
        try:
            import torch
        except ImportError:
            return []
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def score(self, hardware, fmt: str) -> float:
        self._setup()
        return 100.0 if self.device.type == "cuda" else 5.0

    def describe(self):
        self._setup()
        import torch

        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(self.device)})"
        return {"device": dev, "compute_dtype": self.dtype,
                "weights": f"converted once at load to {self.dtype} on {self.device.type} "
                           f"(Q8_0/Q4_0 dequantised at load; norms and router kept float32)",
                "moe_decode": "gather picked experts on device" if self.gather else "slice picked experts in place",
                "threads": torch.get_num_threads()}

    # ---- weights -------------------------------------------------------------------------
    def prepare(self, param: Param, role: str):
        self._setup()
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

        self._setup()
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    # ---- the op set ----------------------------------------------------------------------
    def embed(self, table: Param, ids):
        return self.ops.embed(table.value, ids)

    def rms_norm(self, x, weight: Param, eps: float):
        return self.ops.rms_norm(x, weight.value, eps, self.torch_dtype)

    def linear(self, x, weight: Param):
        return self.ops.linear(x, weight.value)

    def rope(self, x, positions, theta: float):
        return self.ops.rope(x, positions, theta)

    def new_cache(self, config, capacity: int):
        self._setup()
        return self.ops.new_cache(config, capacity, self.torch_dtype, self.device)

    def attention(self, q, k, v, layer_cache, positions, window):
        return self.ops.attention(q, k, v, layer_cache, positions, window)

    def route(self, x, router: Param, k: int, softmax: bool):
        return self.ops.route(x, router.value, k, softmax)

    def moe(self, x, gate: Param, up: Param, down: Param, ids, weights):
        view, gu = self._stacked.get(id(gate.value), (None, None))
        if view is not gate.value:   # not stacked by prepare_model: use the two tensors as they are
            gu = (gate.value, up.value)
        return self.ops.moe(x, gu, down.value, ids, weights, self.gather)

    def prepare_model(self, params: ModelParams, config) -> None:
        """Stack each layer's q/k/v rows into one matrix and gate/up into one [E, 2F, H] tensor, so a
        step runs one GEMM where it would run three (or two); the per-role params become views of
        them, so nothing is held twice."""
        torch = self.torch
        fused = []
        for lp in params.layers:
            qkv = torch.cat([lp.wq.value, lp.wk.value, lp.wv.value])
            nq, nk = lp.wq.value.shape[0], lp.wk.value.shape[0]
            lp.wq.value, lp.wk.value, lp.wv.value = qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:]
            if not isinstance(lp.gate.value, torch.Tensor):   # read on demand under a memory budget
                fused.append((qkv, None, None))
                continue
            if id(lp.gate.value) in self._mapped or id(lp.up.value) in self._mapped:
                gu = (lp.gate.value, lp.up.value)   # used in place from the file: stacking would copy them
            else:
                F_ = lp.gate.value.shape[1]
                gu = torch.cat([lp.gate.value, lp.up.value], dim=1)
                lp.gate.value, lp.up.value = gu[:, :F_], gu[:, F_:]
                self._stacked[id(lp.gate.value)] = (lp.gate.value, gu)
            # per-expert views for the CPU's one-token step: a list index, not a tensor op, per expert
            views = None if self.gather else (
                tuple(list(t.unbind(0)) for t in gu) if isinstance(gu, tuple) else list(gu.unbind(0)),
                list(lp.down.value.unbind(0)))
            fused.append((qkv, gu, views))
        params.extra["torch"] = fused

    # ---- fused ---------------------------------------------------------------------------
    def forward(self, cfg, params: ModelParams, ids, positions, cache, last_only: bool = False):
        """The whole step in torch: one host->device copy of ids/positions in, logits out on the device."""
        import torch

        host, pt = self.ops.device_positions(positions, self.device)
        T = len(host)
        # oneDNN wins for prefill GEMMs but its bf16 matrix-vector path reads weights at about half
        # the speed of ATen's own gemv kernel (measured: docs/torch_backend.md); decode skips it
        if self.device.type != "cpu" or T > 1:
            return self._forward(cfg, params, ids, pt, host, T, cache, last_only)
        torch.backends.mkldnn.enabled = False
        try:
            if "torch" in params.extra and not self.gather:
                return self._decode_one(cfg, params, int(ids[0]), pt, host, cache)
            return self._forward(cfg, params, ids, pt, host, T, cache, last_only)
        finally:   # the value seen at setup, not at entry: concurrent sessions cannot leave it off
            torch.backends.mkldnn.enabled = self._onednn

    def _forward(self, cfg, params, ids, pt, host, T, cache, last_only):
        import torch

        o = self.ops
        dt = self.torch_dtype
        with torch.no_grad():   # not inference_mode: a cache grown here must stay writable outside it
            h = o.embed(params.embed.value, ids)                       # float32 residual stream
            cos, sin = o.rope_tables(pt, cfg.rope_theta, cfg.head_dim, dt)
            eps, k_act, softmax = cfg.rms_norm_eps, cfg.moe_num_active_primary_experts, cfg.moe_primary_router_apply_softmax
            nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            fused = params.extra.get("torch") or [(None, None, None)] * len(params.layers)
            for i, (p, (wqkv, gu, _)) in enumerate(zip(params.layers, fused)):
                w, e = o.route(h, p.router.value, k_act, softmax)     # router reads the raw layer input
                a = o.rms_norm(h, p.attn_norm.value, eps, dt)
                if wqkv is None:   # params prepared without prepare_model
                    wqkv = torch.cat([p.wq.value, p.wk.value, p.wv.value])
                    gu = (p.gate.value, p.up.value)
                qkv = o.linear(a, wqkv).view(T, nH + 2 * nKV, hd)
                if cfg.layer_uses_rope(i):                           # q and k heads rotated together
                    qk = o.apply_rope(qkv[:, :nH + nKV], cos, sin)
                    q, k = qk[:, :nH], qk[:, nH:]
                else:
                    q, k = qkv[:, :nH], qkv[:, nH:nH + nKV]
                v = qkv[:, nH + nKV:]
                attn = o.attention(q, k, v, cache.layers[i], host, cfg.layer_window(i), positions_t=pt)
                h = h + o.linear(attn, p.wo.value)
                m = o.rms_norm(h, p.ffn_norm.value, eps, dt)
                h = h + o.moe(m, gu, p.down.value, e, w, self.gather)
            if last_only:
                h = h[-1:]
            return o.linear(o.rms_norm(h, params.norm.value, eps, dt), params.head.value)

    def _decode_one(self, cfg, params, token: int, pt, host, cache):
        """One token on the CPU, the same layer as `_forward` on 1-D vectors with matrix-vector
        products. Each op costs microseconds of dispatch that the weights streaming through the
        caches make several times longer, so this step runs as few as it can (about 60 per layer)."""
        import torch

        o = self.ops
        dt = self.torch_dtype
        eps, k_act, softmax = cfg.rms_norm_eps, cfg.moe_num_active_primary_experts, cfg.moe_primary_router_apply_softmax
        nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        with torch.no_grad():
            h = params.embed.value[token].float()                       # float32 residual stream [H]
            cos, sin = o.rope_tables(pt, cfg.rope_theta, hd, dt)
            for i, (p, (wqkv, _, experts)) in enumerate(zip(params.layers, params.extra["torch"])):
                ids, w = o.route_one(h, p.router.value, k_act, softmax)  # router reads the raw layer input
                qkv = torch.mv(wqkv, o.rms_norm(h, p.attn_norm.value, eps, dt)).view(1, nH + 2 * nKV, hd)
                qk = o.apply_rope(qkv[:, :nH + nKV], cos, sin) if cfg.layer_uses_rope(i) else qkv[:, :nH + nKV]
                attn = o.attention(qk[:, :nH], qk[:, nH:], qkv[:, nH + nKV:], cache.layers[i], host,
                                   cfg.layer_window(i), positions_t=pt)
                h = h + torch.mv(p.wo.value, attn[0])
                o.moe_one(o.rms_norm(h, p.ffn_norm.value, eps, dt), *experts, ids, w, h)
            return torch.mv(params.head.value, o.rms_norm(h, params.norm.value, eps, dt))[None]
