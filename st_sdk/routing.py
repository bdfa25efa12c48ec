"""Routing statistics measured on real text: per layer, how often each expert is chosen, how many ReGLU
neurons of the chosen experts are exactly zero (relu(gate) == 0, i.e. gate <= 0), and how many of a
token's experts the previous token also chose.

`RoutingRecorder(model)` wraps the model's bound `route` and `moe` ops (fused layer/step ops are set
aside while it records, so every backend reports the same thing) and counts (`picks()`: the picks
themselves, token by token, as benchmarks/cache_policy.py replays them); the gate activations are
recomputed in NumPy from the stored weights. `st-sdk perplexity MODEL TEXT --routing-stats OUT.json`
records while it measures; `st-sdk synth --routing trained[:OUT.json]` builds random weights that
route that way (st_sdk/synth.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError


@dataclass
class LayerRouting:
    expert_share: list[float]          # fraction of the layer's picks that went to each expert (sums to 1)
    relu_zero_fraction: float          # fraction of the picked experts' gate neurons that are <= 0
    reuse: float                       # fraction of a token's picks that the previous token also made


@dataclass
class RoutingStats:
    experts: int
    active: int
    tokens: int
    layers: list[LayerRouting]
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "RoutingStats":
        try:
            layers = [LayerRouting(expert_share=[float(x) for x in l["expert_share"]],
                                   relu_zero_fraction=float(l["relu_zero_fraction"]), reuse=float(l.get("reuse", 0.0)))
                      for l in d["layers"]]
            stats = cls(experts=int(d["experts"]), active=int(d["active"]), tokens=int(d.get("tokens", 0)),
                        layers=layers, source=str(d.get("source", "")), notes=dict(d.get("notes", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{source}: not a routing statistics file ({type(e).__name__}: {e})") from None
        for i, l in enumerate(stats.layers):
            s = np.asarray(l.expert_share)
            if len(s) != stats.experts or (s < 0).any() or abs(s.sum() - 1) > 1e-3 \
                    or not 0 <= l.relu_zero_fraction <= 1:
                raise InputError(f"{source}: layer {i}: expert_share must hold {stats.experts} fractions summing "
                                 "to 1 and relu_zero_fraction lie in [0, 1]")
        if not stats.layers:
            raise InputError(f"{source}: no layers")
        return stats

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "RoutingStats":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{p}: routing statistics file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: malformed JSON: {e}") from None
        return cls.from_dict(d, source=str(p))

    def table(self) -> str:
        """One line per layer: ReGLU zeros, the most and least chosen expert's share, reuse."""
        rows = [f"{'layer':>5} {'relu zeros':>10} {'top share':>9} {'min share':>9} {'reuse':>6}   shares (sorted)"]
        for i, l in enumerate(self.layers):
            s = sorted(l.expert_share, reverse=True)
            rows.append(f"{i:>5} {l.relu_zero_fraction:>10.3f} {s[0]:>9.3f} {s[-1]:>9.3f} {l.reuse:>6.3f}   "
                        + " ".join(f"{x:.3f}" for x in s))
        return "\n".join(rows)


def resample_shares(shares, n: int) -> np.ndarray:
    """The popularity curve of `shares` (sorted, most chosen first) carried over to `n` experts: the
    cumulative share as a function of the fraction of experts, linearly interpolated and re-cut."""
    s = np.sort(np.asarray(shares, dtype=np.float64))[::-1]
    s = s / s.sum()
    cum = np.interp(np.arange(n + 1) / n, np.arange(len(s) + 1) / len(s), np.concatenate([[0.0], np.cumsum(s)]))
    return np.diff(cum)


class RoutingRecorder:
    """Context manager: while active, every forward of `model` adds to the counts."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.E, self.k, self.L = cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts, cfg.num_hidden_layers
        self.counts = np.zeros((self.L, self.E), np.int64)
        self.zero = np.zeros(self.L, np.int64)
        self.neurons = np.zeros(self.L, np.int64)
        self.reused = np.zeros(self.L, np.int64)
        self.pairs = np.zeros(self.L, np.int64)
        self.tokens = 0
        self.trace: list[list[np.ndarray]] = [[] for _ in range(self.L)]   # each route call's picks [T, k]
        self._layer_of = {}
        for i, lp in enumerate(model.params.layers):
            self._layer_of[id(lp.router)] = i
            self._layer_of[id(lp.gate)] = i

    def __enter__(self) -> "RoutingRecorder":
        ops = self.model.ops
        to_np = ops.to_numpy
        route0, moe0 = ops.route, ops.moe

        def route(x, weight, k, softmax):
            w, idx = route0(x, weight, k, softmax)
            i = self._layer_of[id(weight)]
            ids = np.asarray(to_np(idx)).astype(np.int64).reshape(-1, k)
            self.counts[i] += np.bincount(ids.ravel(), minlength=self.E)
            self.trace[i].append(ids)
            if i == 0:
                self.tokens += len(ids)
            if len(ids) > 1:
                prev, cur = ids[:-1], ids[1:]
                self.reused[i] += int((cur[:, :, None] == prev[:, None, :]).any(-1).sum())
                self.pairs[i] += cur.size
            return w, idx

        def moe(x, gate, up, down, ids, weights):
            i = self._layer_of[id(gate)]
            m = np.asarray(to_np(x), dtype=np.float32)
            picked = np.asarray(to_np(ids)).astype(np.int64)
            # under a budget, from the file: the cache may hold a backend's layout, and counts the MoE's uses
            stored = gate.raw.stored_expert if getattr(gate.raw, "offloaded", False) else gate.raw.expert
            for e in np.unique(picked):
                rows = (picked == e).any(-1)
                g = m[rows] @ stored(int(e)).numpy().T
                self.zero[i] += int((g <= 0).sum())
                self.neurons[i] += g.size
            return moe0(x, gate, up, down, ids, weights)

        self._saved = ops
        # fused layer/step ops would bypass route and moe: record through the per-op path
        self.model.ops = dataclasses.replace(ops, route=route, moe=moe, layer=None, layers=None, forward=None)
        return self

    def __exit__(self, *exc) -> None:
        self.model.ops = self._saved

    def picks(self) -> np.ndarray:
        """Every recorded token's picks, in order: int64 [tokens, layers, k] (to replay through a cache)."""
        if self.tokens == 0:
            raise InputError("no tokens were recorded")
        return np.stack([np.concatenate(layer) for layer in self.trace], axis=1)

    def stats(self, source: str = "", **notes) -> RoutingStats:
        if self.tokens == 0:
            raise InputError("no tokens were recorded")
        layers = [LayerRouting(expert_share=(self.counts[i] / self.counts[i].sum()).round(6).tolist(),
                               relu_zero_fraction=round(float(self.zero[i] / max(1, self.neurons[i])), 6),
                               reuse=round(float(self.reused[i] / max(1, self.pairs[i])), 6))
                  for i in range(self.L)]
        return RoutingStats(experts=self.E, active=self.k, tokens=self.tokens, layers=layers, source=source,
                            notes=dict(notes))
