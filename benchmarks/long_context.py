"""Prefill and decode speed, KV-cache memory and attention's share of decode at increasing context
lengths: st-sdk against llama.cpp on one GGUF file, the same threads, paired interleaved rounds.

    python benchmarks/long_context.py MODEL.gguf [--contexts 128,1024,3000,4096,16384] [--threads 2]
        [--rounds 3] [--gen-len 16] [--backend c] [--kv-dtype f16] [--llama-flash-attn off|on]

MODEL.gguf defaults to the synthetic 4b-a0.6b Q4_0 file (`st_sdk.bench.synth_gguf`, written once
into $ST_SDK_CACHE_DIR/models). Each engine runs in its own child process, loaded once with room for
the longest context; each round visits every context length and, at each, runs both engines one
after the other (the order alternating from one measurement to the next): a fresh prefill of a
C-token prompt (st-sdk in its chunks, llama.cpp in --n-batch chunks, 512 by default), then one
untimed and --gen-len timed greedy decode steps continuing from it. After one warm-up round at the
shortest context, it prints per context the medians over rounds of prefill tokens/s and decode
tokens/s, the medians of the per-round ratios st-sdk / llama.cpp (> 1: st-sdk faster), the KV-cache
bytes per token and at that context (each engine's cache as allocated), and on the C backend the
fraction of decode (and prefill) wall time spent in attention (csrc's st_attention_seconds). The
whole configuration and the load average before and after every round are printed; --json FILE
also writes every raw measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median

#: llama.cpp's ggml type numbers for its --cache-type-k/v
GGML_TYPE = {"f32": 0, "f16": 1, "q8_0": 8}


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


class StSdk:
    """st-sdk: one model, a fresh session per measurement."""

    def __init__(self, spec: dict):
        import st_sdk
        from st_sdk import kv

        self.model = st_sdk.load(spec["model"], backend=spec["backend"], n_threads=spec["threads"],
                                 kv_dtype=spec["kv_dtype"])
        self.lib = None
        if self.model.backend.name == "c":
            from st_sdk_backends.c.backend import ffi_lib

            self.lib = ffi_lib()[1]
        m = self.model
        self.facts = {"engine": f"st-sdk {st_sdk.__version__}", "backend": m.backend.name,
                      "kv_dtype": m.kv_dtype, "prefill_chunk": m.chunk_size,
                      "kv_bytes_per_token": kv.bytes_per_token(m.config, m.kv_dtype or "f32"),
                      **{k: str(v) for k, v in m.backend.describe().items()}}

    def _attn(self) -> float:
        return float(self.lib.st_attention_seconds()) if self.lib is not None else float("nan")

    def measure(self, ids, gen_len: int) -> dict:
        import numpy as np

        s = self.model.session(capacity=len(ids) + gen_len + 2)
        a0, t0 = self._attn(), time.perf_counter()
        tok = int(np.argmax(s.feed(ids)))
        a1, t1 = self._attn(), time.perf_counter()
        tok = int(np.argmax(s.feed([tok])))          # untimed first step
        a2, t2 = self._attn(), time.perf_counter()
        for _ in range(gen_len):
            tok = int(np.argmax(s.feed([tok])))
        a3, t3 = self._attn(), time.perf_counter()
        nbytes = getattr(s.cache, "nbytes", None)
        return {"prefill_s": t1 - t0, "decode_s": (t3 - t2) / gen_len,
                "prefill_attention": (a1 - a0) / (t1 - t0), "decode_attention": (a3 - a2) / (t3 - t2),
                "kv_bytes": int(nbytes) if nbytes is not None else None, "token": tok}


class Llama:
    """llama.cpp through llama-cpp-python (its C API): fresh state per measurement."""

    def __init__(self, spec: dict):
        import llama_cpp

        kw = {"type_k": GGML_TYPE[spec["kv_dtype"]], "type_v": GGML_TYPE[spec["kv_dtype"]],
              "flash_attn": spec["llama_flash_attn"] == "on",
              "swa_full": False}     # sliding-window layers keep their window only, as st-sdk's rings
        self.llm = llama_cpp.Llama(model_path=spec["model"], n_threads=spec["threads"],
                                   n_threads_batch=spec["threads"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"],
                                   n_ubatch=spec["n_batch"], logits_all=False, verbose=False, **kw)
        self.vocab = self.llm.n_vocab()
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "")
        layers = int(meta.get(f"{arch}.block_count", 0))
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", 0))
        head_dim = int(meta.get(f"{arch}.attention.key_length", 0))
        per = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}[spec["kv_dtype"]]
        self.facts = {"engine": f"llama-cpp-python {llama_cpp.__version__}",
                      "kv_dtype": f"{spec['kv_dtype']} (type_k/type_v)", "prefill_chunk": spec["n_batch"],
                      "flash_attn": spec["llama_flash_attn"], "swa_full": False,
                      "kv_bytes_per_token": int(round(2 * layers * kv_heads * head_dim * per)),
                      "system": llama_cpp.llama_print_system_info().decode().strip()}

    def _next(self) -> int:
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits(self.llm.ctx)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def measure(self, ids, gen_len: int) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval([int(t) for t in ids])
        tok = self._next()
        t1 = time.perf_counter()
        self.llm.eval([tok])                          # untimed first step
        tok = self._next()
        t2 = time.perf_counter()
        for _ in range(gen_len):
            self.llm.eval([tok])
            tok = self._next()
        t3 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": (t3 - t2) / gen_len, "kv_bytes": None, "token": tok}


def child(spec: dict) -> None:
    """Load one engine, then answer one JSON request per stdin line on the real stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import numpy as np

    engine = (StSdk if spec["kind"] == "st-sdk" else Llama)(spec)
    vocab = engine.model.config.vocab_size if spec["kind"] == "st-sdk" else engine.vocab
    proto.write(json.dumps({"facts": engine.facts}) + "\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") != "measure":
            break
        ids = np.random.default_rng(req["seed"]).integers(0, vocab, req["context"]).astype(np.int64)
        proto.write(json.dumps(engine.measure(ids, req["gen_len"])) + "\n")
        proto.flush()


class Child:
    def __init__(self, spec: dict):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{spec['kind']} child failed to load (exit code {self.p.wait()})")
        self.facts = json.loads(line)["facts"]

    def measure(self, **req) -> dict:
        self.p.stdin.write(json.dumps({"op": "measure", **req}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"child exited with code {self.p.wait()}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
            self.p.wait()


def _ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of the per-round speed ratio st-sdk / llama.cpp (times in, > 1: st-sdk faster)."""
    return median(t / o for o, t in zip(ours, theirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the synthetic 4b-a0.6b Q4_0 file)")
    ap.add_argument("--contexts", default="128,1024,3000,4096,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-len", type=int, default=16, help="timed decode steps after each prompt")
    ap.add_argument("--backend", default="c")
    ap.add_argument("--kv-dtype", default="f16", choices=sorted(GGML_TYPE), help="both engines' KV cache type")
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp's prefill chunk (n_batch = n_ubatch)")
    ap.add_argument("--llama-flash-attn", choices=("off", "on"),
                    help="llama.cpp's flash attention (default: off, llama-cpp-python's default; on for a "
                         "q8_0 cache, which llama.cpp's V cache needs)")
    ap.add_argument("--no-llama", action="store_true", help="st-sdk alone")
    ap.add_argument("--json", help="write every raw measurement here")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    a.llama_flash_attn = a.llama_flash_attn or ("on" if a.kv_dtype == "q8_0" else "off")
    if a.model is None:
        from st_sdk.bench import synth_gguf

        a.model = str(synth_gguf("4b-a0.6b", "q4_0"))
    spec = {"model": a.model, "threads": a.threads, "kv_dtype": a.kv_dtype, "backend": a.backend,
            "n_ctx": max(contexts) + a.gen_len + 8, "n_batch": a.n_batch, "llama_flash_attn": a.llama_flash_attn}
    print(f"file {a.model}; threads {a.threads}; contexts {contexts}; {a.rounds} rounds (+1 warm-up at "
          f"{contexts[0]}); decode {a.gen_len} timed steps (after 1 untimed) per measurement; KV cache {a.kv_dtype}")
    engines = {"st-sdk": Child({**spec, "kind": "st-sdk"})}
    if not a.no_llama:
        engines["llama.cpp"] = Child({**spec, "kind": "llama.cpp"})
    for name, c in engines.items():
        print(f"{name}: " + "; ".join(f"{k}={v}" for k, v in c.facts.items()))
    raw: dict = {ctx: {name: [] for name in engines} for ctx in contexts}
    loads = [f"before: {_loadavg()}"]
    try:
        for name, c in engines.items():
            c.measure(context=contexts[0], gen_len=a.gen_len, seed=0)     # warm-up: page in the weights
        turn = 0
        for r in range(a.rounds):
            for ctx in contexts:
                order = list(engines.items())
                for name, c in (order if turn % 2 == 0 else order[::-1]):
                    raw[ctx][name].append(c.measure(context=ctx, gen_len=a.gen_len, seed=r))
                turn += 1
            loads.append(f"after round {r + 1}: {_loadavg()}")
            print(f"round {r + 1}/{a.rounds} done, load average {_loadavg()}", flush=True)
    finally:
        for c in engines.values():
            c.close()
    print("load average " + "; ".join(loads))
    ours = engines["st-sdk"].facts
    print(f"\nKV bytes per token: st-sdk {ours['kv_bytes_per_token']}"
          + (f", llama.cpp {engines['llama.cpp'].facts['kv_bytes_per_token']}" if "llama.cpp" in engines else ""))
    head = f"{'context':>8s} {'prefill tok/s':>15s} {'decode tok/s':>15s}"
    if "llama.cpp" in engines:
        head += f" {'prefill':>8s} {'decode':>8s}"
    head += f" {'st-sdk KV MiB':>14s} {'attn % decode':>14s} {'attn % prefill':>15s}"
    print("medians; tok/s as st-sdk / llama.cpp; ratios: median of per-round st-sdk/llama.cpp speed")
    print(head)
    for ctx in contexts:
        o = raw[ctx]["st-sdk"]
        op, od = [x["prefill_s"] for x in o], [x["decode_s"] for x in o]
        line = f"{ctx:8d}"
        if "llama.cpp" in engines:
            t = raw[ctx]["llama.cpp"]
            tp, td = [x["prefill_s"] for x in t], [x["decode_s"] for x in t]
            line += f" {ctx / median(op):7.1f}/{ctx / median(tp):<7.1f} {1 / median(od):7.1f}/{1 / median(td):<7.1f}"
            line += f" {_ratio(op, tp):7.2f}x {_ratio(od, td):7.2f}x"
        else:
            line += f" {ctx / median(op):15.1f} {1 / median(od):15.1f}"
        kvb = o[-1]["kv_bytes"]
        line += f" {kvb / 2**20 if kvb is not None else float('nan'):14.1f}"
        att_d, att_p = (100 * median(x[key] for x in o) for key in ("decode_attention", "prefill_attention"))
        line += f" {att_d:13.1f}% {att_p:14.1f}%"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": {**spec, "contexts": contexts, "rounds": a.rounds, "gen_len": a.gen_len},
                       "facts": {n: c.facts for n, c in engines.items()}, "loadavg": loads,
                       "raw": {str(k): v for k, v in raw.items()}}, f, indent=1)


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(json.loads(sys.argv[sys.argv.index("--child") + 1]))
    else:
        main()
