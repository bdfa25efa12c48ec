"""Prometheus text exposition of the server's and the engine's counters (no client library needed)."""
from __future__ import annotations

import collections
import threading


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self.responses: collections.Counter = collections.Counter()   # (path, status)
        self.generations = 0        # engine requests the server submitted
        self.completed = 0
        self.disconnected = 0       # answers whose client left before the end
        self.ttft_sum = 0.0
        self.e2e_sum = 0.0

    def http(self, path: str, status: int) -> None:
        route = path if path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions") \
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        with self._lock:
            self.responses[(route, status)] += 1

    def submitted(self, n: int) -> None:
        with self._lock:
            self.generations += n

    def finished(self, runs) -> None:
        with self._lock:
            for r in runs:
                t = r.result.timings if r.result is not None else {}
                ttft = t.get("time_to_first_token_s", float("nan"))
                if ttft == ttft:
                    self.completed += 1
                    self.ttft_sum += ttft
                    self.e2e_sum += t.get("total_s", 0.0)

    def render(self) -> str:
        e, st = self.engine, self.engine.stats
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples) -> None:
            lines.append(f"# HELP st_sdk_{name} {help_}")
            lines.append(f"# TYPE st_sdk_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"st_sdk_{name}{{{lab}}} {value}" if lab else f"st_sdk_{name} {value}")

        with self._lock:
            responses = sorted(self.responses.items())
            gen, done, gone, ttft, e2e = self.generations, self.completed, self.disconnected, self.ttft_sum, self.e2e_sum
        metric("http_requests_total", "counter", "HTTP responses by route and status code",
               [({"route": r, "code": c}, n) for (r, c), n in responses])
        metric("requests_total", "counter", "generation requests accepted by the engine", [({}, st.requests)])
        metric("requests_rejected_total", "counter", "requests refused because the queue was full", [({}, st.rejected)])
        metric("requests_finished_total", "counter", "finished generation requests by reason",
               [({"reason": k}, v) for k, v in sorted(st.finished.items())])
        metric("requests_disconnected_total", "counter", "answers whose client left before the end", [({}, gone)])
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, st.prompt_tokens)])
        metric("generation_tokens_total", "counter", "tokens generated", [({}, st.generated_tokens)])
        metric("queue_depth", "gauge", "requests waiting for a place in the batch", [({}, e.queue_depth)])
        metric("running_requests", "gauge", "requests in the running batch", [({}, e.running)])
        metric("batch_size", "gauge", "sequences fed in the last step", [({}, st.last_batch)])
        metric("steps_total", "counter", "engine steps run", [({}, st.steps)])
        metric("step_sequences_total", "counter", "sequences fed, summed over steps (mean batch size = "
               "step_sequences_total / steps_total)", [({}, st.step_rows)])
        metric("step_seconds_total", "counter", "time spent in engine steps", [({}, round(st.busy_s, 6))])
        for name, help_, total in (("time_to_first_token_seconds", "from submission to the first sampled token", ttft),
                                   ("request_seconds", "from submission to the end of generation", e2e)):
            lines += [f"# HELP st_sdk_{name} {help_}", f"# TYPE st_sdk_{name} summary",
                      f"st_sdk_{name}_sum {round(total, 6)}", f"st_sdk_{name}_count {done}"]
        metric("server_generations_total", "counter", "generations the server submitted", [({}, gen)])
        return "\n".join(lines) + "\n"
