"""Expert-cache policies compared on a model's own routing: reads per token for LRU and LFRU, and two
bounds on the same picks: `static`, the best fixed set of experts chosen in hindsight (what a
frequency-counting policy approaches on a long run whose routing does not drift), and `belady`, the
offline optimum that knows the future (no policy reads fewer).

Records which experts the model picks for the tokens benchmarks/offload_budget.py decodes (8 warm-up +
--tokens teacher-forced diverse ids), then replays those picks through caches of the size a budget
plans (`st_sdk.offload.replay.replay`: the router's prefetch, then the MoE's reads, as budget mode runs
them). Deterministic and quick, it isolates the policy from I/O timing; offload_budget.py --policies
lfru,lru measures the same choice in wall-clock time under a cgroup.

    python benchmarks/cache_policy.py MODEL.gguf [--budget 1GiB] [--slots N,N,...] [--tokens 256]
        [--text FILE]

--text replays the picks of a text's tokens instead (the first --tokens after the warm-up; fed in
pieces of the model's context, teacher-forced): real routing, with the locality real text has, on a
trained model such as the shipped one (st_sdk/data/smallthinker-docs-q8_0.gguf and its held-out text).

The slot count for --budget is the plan of an `st_sdk.load(MODEL, max_memory=BUDGET)` in this process
(its baseline is this process's, so a few slots off the cgroup child's).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from offload_budget import TOKENS_OF, WARMUP  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="1GiB", help="plan the slot count of this budget (default 1GiB)")
    ap.add_argument("--slots", default=None, help="comma-separated slot counts instead of --budget's")
    ap.add_argument("--tokens", type=int, default=256, help=f"measured tokens, after {WARMUP} warm-up tokens")
    ap.add_argument("--policies", default="lru,lfru")
    ap.add_argument("--text", default=None, help="replay the routing of this text's tokens instead of diverse ids")
    args = ap.parse_args(argv)

    import st_sdk
    from st_sdk.errors import InputError
    from st_sdk.offload.replay import optimal_reads, replay, static_reads
    from st_sdk.routing import RoutingRecorder

    try:   # the plan of offload_budget.py's load (context 512), planned before the model is loaded whole
        planned = st_sdk.load(args.model, max_memory=args.budget, context=512, backend="numpy")
    except InputError:   # a model whose context is shorter: its own
        planned = st_sdk.load(args.model, max_memory=args.budget, backend="numpy")
    plan = planned.memory_plan
    slots = [int(s) for s in args.slots.split(",")] if args.slots else [plan.slots]
    del planned
    model = st_sdk.load(args.model)
    vocab, n_all = model.config.vocab_size, WARMUP + args.tokens
    if args.text:
        with open(args.text, encoding="utf-8") as fh:
            toks = model.tokenize(fh.read())[:n_all]
        if len(toks) < n_all:
            ap.error(f"--text {args.text}: {len(toks)} tokens, fewer than {n_all} ({WARMUP} + --tokens)")
    else:
        toks = [int(t) for t in eval(TOKENS_OF, {"np": np, "vocab": vocab, "n_all": n_all})]
    picks = []
    for i in range(0, n_all, model.context):   # teacher-forced: the picks of decoding them one at a time
        with RoutingRecorder(model) as rec:
            model.logits(toks[i:i + model.context])
        picks.append(rec.picks())
    picks = np.concatenate(picks)
    n_experts = model.config.num_hidden_layers * model.config.moe_num_primary_experts
    what = f"tokens of {args.text}" if args.text else "diverse tokens"
    print(f"# cache_policy: {args.model}, {WARMUP} warm-up + {args.tokens} teacher-forced {what}; "
          f"{len({(l, e) for t in picks for l, ids in enumerate(t) for e in ids})} of {n_experts} experts used; "
          f"expert {plan.expert_bytes / 2**20:.2f} MiB; slots of --budget {args.budget}: {plan.slots}")
    for n in slots:
        for policy in args.policies.split(","):
            warm = replay(picks[:WARMUP], n, policy)
            st = replay(picks, n, policy)
            reads = (st.reads - warm.reads) / args.tokens   # the measured tokens' reads (warm-up's are the same)
            uses = st.lookups - warm.lookups
            print(f"  {n:5d} slots ({n / n_experts:4.0%})  {policy:6s}  {reads:6.1f} expert reads/token  "
                  f"{reads * plan.expert_bytes / 2**20:7.1f} MiB/token  resident when needed "
                  f"{1 - (reads * args.tokens) / uses:6.1%}", flush=True)
        # the bounds: the best fixed set in hindsight, and the offline optimum (the future known)
        uses = sum(len(set(ids.tolist())) for token in picks[WARMUP:] for ids in token)
        for name, per_token in (("static", static_reads(picks, n)), ("belady", optimal_reads(picks, n))):
            reads = per_token[WARMUP:].sum() / args.tokens
            print(f"  {n:5d} slots ({n / n_experts:4.0%})  {name:6s}  {reads:6.1f} expert reads/token  "
                  f"{reads * plan.expert_bytes / 2**20:7.1f} MiB/token  resident when needed "
                  f"{1 - (reads * args.tokens) / uses:6.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
