"""Reports of a comparison: the table, JSON, and a bar chart."""
from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np

from ..errors import InputError
from .run import Record


def _fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def format_table(records: list[Record], context: dict[str, Any]) -> str:
    c, m = context["config"], context["machine"]
    lines = [f"model: {c['model']}   threads: {c['threads']}   prompt: {c['prompt_len']} tokens   "
             f"decode: {c['gen_len']} tokens   rounds: {c['rounds']} (+{c['warmup_rounds']} warm-up), "
             f"interleaved   memory: {c['memory_mode']}",
             f"machine: {m['cpu']} ({m['arch']}, {m['physical_cores']} cores / {m['logical_cores']} threads, "
             f"{m['ram_gib']} GiB; {' '.join(m['flags'])})   read bandwidth: {m.get('read_bandwidth_gbs', '?')} GB/s",
             ""]
    head = ["backend", "format", "prefill tok/s", "decode tok/s", "peak RSS MiB", "of BW limit",
            "vs llama.cpp (dec / pre)"]
    rows = []
    for r in records:
        if r.status != "ok":
            rows.append([r.backend, r.format, f"{r.status}: {r.reason}", "", "", "", ""])
            continue
        ratio = "-" if r.vs_llama_cpp_decode is None else \
            f"{r.vs_llama_cpp_decode:.2f}x / {_fmt(r.vs_llama_cpp_prefill, '.2f')}x"
        rows.append([r.backend, r.format,
                     f"{_fmt(r.prefill_tps, '.1f')} ±{_fmt(r.prefill_spread and r.prefill_spread * 50, '.0f')}%",
                     f"{_fmt(r.decode_tps, '.2f')} ±{_fmt(r.decode_spread and r.decode_spread * 50, '.0f')}%",
                     _fmt(r.peak_rss_mib, '.0f'),
                     f"{r.limit_fraction * 100:.0f}% of {r.decode_limit_tps:.0f}" if r.limit_fraction else "-",
                     ratio])
    widths = [max(len(str(x[i])) for x in [head] + [r for r in rows if r[3] != "" or i < 2]) for i in range(len(head))]
    for row in [head] + rows:
        if row[3] == "" and row is not head:   # a skipped case: one long reason column
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
        else:
            lines.append("  ".join(f"{str(x):<{w}}" if i < 2 else f"{str(x):>{w}}"   # names left, figures right
                                   for i, (x, w) in enumerate(zip(row, widths))))
    details = {}
    for r in records:   # the whole configuration: kernel variant, dtype, fallbacks per backend
        if r.status == "ok" and r.backend not in details:
            fb = f"; falls back to NumPy for {', '.join(r.fallbacks)}" if r.fallbacks else ""
            details[r.backend] = f"  {r.backend}: {r.variant or '-'}{fb}"
    for r in records:
        if r.offload:
            st = r.offload
            details[f"{r.backend}-{r.format}-offload"] = (
                f"  {r.backend} {r.format} under {c['memory_mode']}: {r.memory_plan}; expert cache hit rate "
                f"{st['hit_rate']:.1%}, read {st['bytes_read'] / 2**20:.0f} MiB ({st['reader']}), stalled {st['stall_s']:.2f} s")
    for r in records:
        if r.sparsity:
            sp = r.sparsity
            details[f"{r.backend}-{r.format}-sparsity"] = (
                f"  {r.backend} {r.format}: {sp['live_fraction']:.1%} of expert neurons live; expert weights read "
                f"{sp['expert_bytes_per_token'] / 1e6:.1f} MB per decoded token of "
                f"{sp['dense_expert_bytes_per_token'] / 1e6:.1f} dense ({sp['tokens']} random-token steps)")
    lines += ["", "backends:", *details.values(), "",
              "± is half the range over rounds. 'of BW limit' is decode tok/s over (read bandwidth / weight bytes a "
              "token reads with k dense experts); kernels that skip zero ReGLU neurons can exceed 100%. vs llama.cpp "
              "is the median of per-round ratios on the same file (>1: faster than llama.cpp)."]
    return "\n".join(lines)


def to_json(records: Iterable[Record], context: dict[str, Any]) -> str:
    return json.dumps({**context, "records": [r.to_dict() for r in records]}, indent=2)


def plot(records: list[Record], path: str, title: str = "") -> None:
    """Bar chart of prefill and decode tokens/s per backend and format (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError('--plot needs matplotlib: pip install -e ".[plot]" (from a clone of st-sdk)') from None
    ok = [r for r in records if r.status == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    formats = sorted({r.format for r in ok})
    backends = list(dict.fromkeys(r.backend for r in ok))
    width = 0.8 / max(len(backends), 1)
    for ax, key, name in ((axes[0], "prefill_tps", "prefill tokens/s"), (axes[1], "decode_tps", "decode tokens/s")):
        for j, b in enumerate(backends):
            vals = [next((getattr(r, key) or 0 for r in ok if r.backend == b and r.format == f), 0) for f in formats]
            ax.bar(np.arange(len(formats)) + j * width, vals, width, label=b)
        ax.set_xticks(np.arange(len(formats)) + width * (len(backends) - 1) / 2, formats)
        ax.set_title(name)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
