"""One benchmark case in its own child process: `python -m st_sdk.bench.worker SPEC` loads it, then
answers requests on stdin, one JSON line each. Its own process, so its peak RSS is measured
(`ru_maxrss`), not estimated, and a crashing backend cannot take the run down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from ..errors import BackendError, InputError
from ..loader import load, weight_format
from ..timing import LlamaRunner, ModelRunner, Timing, decode_sparsity, time_round
from .traffic import bytes_per_token, gguf_bytes_per_token

LLAMA = "llama.cpp"


def peak_rss() -> int:
    """This process's peak resident set in bytes. On Linux from VmHWM, which exec resets:
    ru_maxrss would carry over the parent's peak into the child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024
    except ImportError:   # Windows
        import psutil

        return int(psutil.Process().memory_info().peak_wset)


def load_case(spec: dict):
    """(runner, facts) for one case, inside the child."""
    threads = spec["threads"]
    if spec["kind"] == LLAMA:
        from llama_cpp import Llama

        llm = Llama(model_path=spec["model"], n_threads=threads, n_threads_batch=threads,
                    n_ctx=spec["n_ctx"], n_batch=512, logits_all=False, verbose=False)
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()   # "CPU : SSE3 = 1 | AVX = 1 | ..."
        features = [kv.split("=")[0].split(":")[-1].strip() for kv in info.split("|") if kv.strip().endswith("= 1")]
        facts = {"variant": f"llama-cpp-python {llama_cpp.__version__}, {' '.join(features)}", "source": "gguf file"}
        facts["bytes_per_token"] = gguf_bytes_per_token(spec["model"])
        return LlamaRunner(llm), facts
    extra = {"max_memory": spec["max_memory"]} if spec.get("max_memory") else {}
    model = load(spec["model"], backend=spec["backend"], n_threads=threads, **extra)
    facts = {"variant": ", ".join(f"{k}={v}" for k, v in model.backend.describe().items()),
             "fallbacks": list(model.ops.fallbacks),
             "bytes_per_token": bytes_per_token(model.params, model.config),
             "source": "gguf file" if str(spec["model"]).endswith(".gguf") else "file",
             "format": weight_format(model.params)}
    return ModelRunner(model), facts


def main() -> int:
    """Load the case of `sys.argv[1]` (JSON), then answer requests on stdin, one JSON line each, on the
    real stdout (libraries that print are sent to stderr)."""
    spec = json.loads(sys.argv[1])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    base = peak_rss()
    t0 = time.perf_counter()
    try:
        runner, facts = load_case(spec)
    except (BackendError, ImportError, InputError) as e:
        reply(skip=f"{type(e).__name__}: {e}")
        return 0
    except Exception as e:
        reply(error=f"{type(e).__name__}: {e}")
        return 1
    reply(ready=True, load_s=time.perf_counter() - t0, baseline_rss=base, **facts)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "round":
            t = time_round(runner, req["prompt_len"], req["gen_len"], warmup=req.get("warmup", 1), timing=Timing())
            reply(prefill_s=t.prefill_s[0], decode_s=t.decode_s)
        elif req["op"] == "rss":
            model = getattr(runner, "model", None)
            offload = getattr(model, "offload", None)
            stats = dict(offload.stats.as_dict(), reader=offload.reader) if offload is not None else None
            reply(peak_rss=peak_rss(), offload=stats,
                  memory_plan=model.memory_plan.describe() if offload is not None else None)
        elif req["op"] == "sparsity":
            reply(sparsity=decode_sparsity(runner, req.get("tokens", 32)))
        else:
            break
    return 0


class Worker:
    """The parent's handle on one child process running one case."""

    def __init__(self, spec: dict, env: dict[str, str] | None = None):
        self.spec = spec
        self.label = spec["backend"] if spec["kind"] != LLAMA else LLAMA
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "st_sdk.bench.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, env=env)
        self.hello = self._recv()

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = self.err.read().decode(errors="replace").strip().splitlines()[-5:]
            return {"error": f"worker exited with code {self.proc.returncode}: " + " | ".join(tail)}
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.err.close()



if __name__ == "__main__":
    sys.exit(main())
