"""`st-sdk generate MODEL -p TEXT`: one completion, streamed to stdout (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import sys

from st_sdk.config import DEFAULT_CONTEXT


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .gguf file, an HF model directory, or 'demo' (the small model shipped with st-sdk)")
    p.add_argument("--backend", default="auto", help="auto (default), a backend name, or a comma priority list")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="run within this memory budget (e.g. 1GiB): experts are read from the file on demand")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="with --max-memory: the longest sequence the memory plan reserves KV cache for "
                        f"(default min(context length, {DEFAULT_CONTEXT}))")
    p.add_argument("--cache-policy", choices=("lfru", "lru"), default="lfru",
                   help="with --max-memory: which expert the cache evicts (default lfru: frequency-aware)")
    p.add_argument("--expert-file", choices=("auto", "write", "off"), default="auto",
                   help="with --max-memory: read experts from a file written once in the backend's layout "
                        "(st_sdk.offload.prepared; in st-sdk's cache directory, as large as the experts): "
                        "auto (default): the existing one, else written on first load where the backend "
                        "converts experts and a tenth of the disk (at most 16 GiB) stays free; write: write it first if "
                        "missing; off: never")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by generate and chat; None means the library default (0.6 / 20 / 0.95 ...)."""
    g = p.add_argument_group("sampling (defaults: the SmallThinker authors' temperature 0.6, top-k 20, top-p 0.95)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None, help="1 = off")
    g.add_argument("--min-p", type=float, default=None, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def generation_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def load_model(args: argparse.Namespace):
    import st_sdk
    from st_sdk.data import resolve_model

    backend = args.backend.split(",") if "," in args.backend else args.backend
    extra = {"max_memory": args.max_memory, "context": args.context,
             "cache_policy": args.cache_policy,
             "expert_file": {"write": True, "off": False}.get(args.expert_file, "auto")} \
        if getattr(args, "max_memory", None) else {}
    return st_sdk.load(resolve_model(args.model), backend=backend, n_threads=args.threads, **extra)


def stats_line(res, backend: str) -> str:
    t = res.timings
    return (f"[{len(res.token_ids)} tokens, finish: {res.finish_reason}, backend {backend}, "
            f"prefill {t['prompt_tokens'] - t['cached_tokens']} tokens at {t['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {t['decode_tokens_per_s']:.1f} tok/s]")


def offload_lines(model) -> list[str]:
    """The memory plan and expert-cache statistics of a model run under a memory budget."""
    if model.offload is None:
        return ["[no memory budget: every weight resident]"]
    st = model.offload.stats
    return [f"[{model.memory_plan.describe()}]",
            f"[expert cache: hit rate {st.hit_rate:.1%} ({st.prefetch_hits} brought in by prefetch), "
            f"{st.misses} misses, {st.late} late prefetches, read {st.bytes_read / 2**20:.1f} MiB in {st.reads} "
            f"reads ({model.offload.reader}), stalled {st.stall_s * 1e3:.0f} ms, {st.evictions} evictions"
            + (f"; {model.offload.warmed} read at load from the use counts earlier loads kept"
               if model.offload.warmed else "") + "]"] + lookahead_line(model.offload)


def lookahead_line(cache) -> list[str]:
    ahead = cache.lookahead
    if ahead is None or not sum(ahead.guessed):
        return []
    per = "; ".join(f"{d} layer{'s' * (d > 1)} ahead {ahead.share_needed_at(d):.0%}, so "
                    f"{'on' if ahead.active_at(d) else 'off'}" for d in range(1, ahead.depth + 1) if ahead.guessed[d - 1])
    return [f"[reads ahead ({ahead.mode}): {cache.stats.ahead} started; of recent guessed reads, needed: {per}]"]


def sparsity_line(model) -> str | None:
    """Sparse ReGLU's counters since the last reset, where the backend keeps them."""
    sp = model.backend.sparsity()
    if sp is None:
        return None
    layers = [f for f in sp["layer_live_fraction"] if f is not None]
    return (f"[sparse ReGLU: {sp['live_fraction']:.1%} of expert neurons live (layers {min(layers):.0%}-"
            f"{max(layers):.0%}), expert weights read {sp['expert_bytes_per_token'] / 1e6:.1f} MB per token of "
            f"{sp['dense_expert_bytes_per_token'] / 1e6:.1f} dense, over {sp['tokens']} tokens]")


def stream_to(out, stream) -> None:
    """Write pieces as they come; stop the generation if the output goes away (a closed pipe)."""
    with stream:
        for piece in stream:
            out.write(piece)
            out.flush()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="complete a prompt (streams to stdout)",
        description="Generate a continuation of a prompt. Text streams to stdout as it is decoded; a line of "
                    "statistics goes to stderr. With --json, print one JSON object instead (text, token ids, "
                    "finish reason, timings).")
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-stream", action="store_true", help="print the text once generation has finished")
    p.add_argument("--stats", action="store_true",
                   help="also print the memory plan and expert-cache statistics (with --max-memory) and, on "
                        "backends that skip dead neurons, the live-neuron fraction and expert bytes read")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each token's log-probability and the N most likely alternatives")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from st_sdk.errors import InputError

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise InputError("prompt: empty (give -p TEXT or text on stdin)")
    model = load_model(args)
    kw = generation_kwargs(args)
    if args.chat:
        call = lambda **k: model.chat([{"role": "user", "content": prompt}], **k)   # noqa: E731
    else:
        call = lambda **k: model.generate(prompt, **k)   # noqa: E731
    backend = model.backend.name
    model.backend.sparsity(reset=True)
    if args.json:
        if args.logprobs is not None:
            kw["logprobs"] = args.logprobs if args.logprobs > 0 else True
        res = call(**kw)
        record = dict(res.to_dict(), backend=backend)
        if model.offload is not None:
            record["offload"] = dict(model.offload.stats.as_dict(), plan=model.memory_plan.describe(),
                                    reader=model.offload.reader, warmed=model.offload.warmed)
        sparsity = model.backend.sparsity()
        if sparsity is not None:
            record["sparsity"] = sparsity
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if args.no_stream:
        res = call(**kw)
        sys.stdout.write(res.text)
    else:
        stream = call(stream=True, **kw)
        stream_to(sys.stdout, stream)
        res = stream.result
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(stats_line(res, backend), file=sys.stderr)
    if args.stats:
        for line in offload_lines(model) + [sparsity_line(model)]:
            if line:
                print(line, file=sys.stderr)
    return 0
