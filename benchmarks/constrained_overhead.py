"""Per-token overhead of constrained decoding on a 151,936-token vocabulary.

    python benchmarks/constrained_overhead.py --tiktoken qwen.tiktoken [--model 4b-a0.6b-q4_0.gguf]

Part 1 compares llguidance, xgrammar and outlines-core (whichever are installed) on the same
vocabulary and the same token sequences: the time to compile each constraint (JSON schema, regex) for
the vocabulary, and per token the time to compute the mask of allowed ids plus the commit of the
chosen id. The token sequences are valid answers tokenized with the vocabulary, so every library walks
the same path.

Part 2 (with --model) runs st-sdk's own generate on the 4b-a0.6b shape with and without
`json_schema=`, in interleaved paired rounds, and reports decode milliseconds per token (forward step,
sampling, and for the constrained run the mask, its application to the logits and the commit).

The vocabulary: Qwen's byte-level BPE ranks (`qwen.tiktoken`, 151,643 tokens; Qwen2 and SmallThinker
use the same ranks) plus Qwen2's specials and padding to 151,936 ids. The file ships inside the
`dashscope` wheel on PyPI (`dashscope/resources/qwen.tiktoken`). The synthetic model files carry a
small byte-level BPE padded with unused ids, which would make every library look cheaper than on a
real vocabulary, so part 2 swaps in this tokenizer.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

V = 151936
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "email": "ada.lovelace@analytical.org",
                     "tags": ["mathematics", "poetry of science", "notes on the engine", "Bernoulli numbers"],
                     "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
                     "active": False}, separators=(",", ":"))
REGEX = r"[A-Z][a-z]+( [a-z]+){5,40}\."
REGEX_ANSWER = ("The quick brown fox jumps over the lazy dog and then runs into the forest where it finds a "
                "small river and drinks some cold water before going back home to sleep.")


# ---- the vocabulary ------------------------------------------------------------------------------------
def load_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that rebuilds each token from bytes using only lower-ranked tokens (what
    transformers' tiktoken converter does)."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def qwen2_tokenizer(path: str):
    """An st_sdk Tokenizer with Qwen2's BPE (vocabulary, merges, pre-tokenizer, specials), 151,936 ids."""
    from tokenizers import AddedToken

    from st_sdk.tokenizer import Tokenizer, qwen2_tokenizer as build

    ranks = load_ranks(path)
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)   # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    merges = [(enc(a), enc(b)) for a, b in bpe_merges(ranks)]
    tk = build(vocab, merges)
    n = len(vocab)
    pads = [f"<|extra_{i}|>" for i in range(V - n - len(SPECIALS))]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + pads])
    assert tk.get_vocab_size() == V and tk.token_to_id("<|im_end|>") == n + 2
    return Tokenizer(tk, eos_ids=[n + 2, n], source=path, special_tokens={"eos_token": "<|im_end|>"})


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def token_bytes(tok) -> list[bytes]:
    """Each id's bytes (specials and padding: their text, never produced by a constraint)."""
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    out = []
    for i in range(V):
        t = tok.tk.id_to_token(i)
        if t is None:
            out.append(b"")
        elif tok.tk.get_added_tokens_decoder().get(i) is not None:
            out.append(t.encode())
        else:
            out.append(bytes(u2b[c] for c in t))
    return out


# ---- the libraries ---------------------------------------------------------------------------------------
class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance

        self.version = llguidance.__version__ if hasattr(llguidance, "__version__") else _version("llguidance")
        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tok.tk.to_str(), n_vocab=V, eos_token=tok.eos_ids)
        self.bits = np.zeros((V + 31) // 32, np.int32)

    def compile(self, kind, text):
        g = (self.ll.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
             if kind == "json" else self.ll.LLMatcher.grammar_from_regex(text))
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def mask(self, m):
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def allowed(self, m, t):
        return bool((self.bits[t // 32] >> (t % 32)) & 1)

    def commit(self, m, t):
        assert m.consume_token(t)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import torch
        import xgrammar as xgr

        self.version = _version("xgrammar")
        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=tok.eos_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bits = xgr.allocate_token_bitmask(1, V)
        self.torch = torch

    def compile(self, kind, text):
        cg = (self.compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":")) if kind == "json"
              else self.compiler.compile_regex(text))
        return self.xgr.GrammarMatcher(cg)

    def mask(self, m):
        m.fill_next_token_bitmask(self.bits)

    def allowed(self, m, t):
        return bool((int(self.bits[0, t // 32]) >> (t % 32)) & 1)

    def commit(self, m, t):
        assert m.accept_token(t)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core

        self.version = _version("outlines-core")
        self.oc = outlines_core
        m: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i not in tok.eos_ids and not b.startswith(b"<|"):
                m.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_ids[0], m)
        self.bits = np.zeros((V + 31) // 32, np.int32)

    def compile(self, kind, text):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(text, whitespace_pattern="") if kind == "json" else text
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, m):
        m.write_mask_into(self.bits.ctypes.data, self.bits.size, self.bits.itemsize)

    def allowed(self, m, t):
        return bool((self.bits[t // 32] >> (t % 32)) & 1)

    def commit(self, m, t):
        m.advance(t)


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


def walk(lib, kind, text, ids, rounds: int):
    """(cold compile s, first token s, median later token s): compile is the first round's (no cache),
    the token times are medians over rounds of mask + commit."""
    comp, first, rest = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        m = lib.compile(kind, text)
        t1 = time.perf_counter()
        times = []
        for t in ids:
            ta = time.perf_counter()
            lib.mask(m)
            assert lib.allowed(m, t), (lib.name, t)
            lib.commit(m, t)
            times.append(time.perf_counter() - ta)
        comp.append(t1 - t0)
        first.append(times[0])
        rest.append(statistics.median(times[1:]))
    return comp[0], statistics.median(first), statistics.median(rest)


def part1(tok, rounds: int) -> None:
    vocab = token_bytes(tok)
    libs = []
    for make in (lambda: LLGuidance(tok), lambda: XGrammar(tok, vocab), lambda: OutlinesCore(tok, vocab)):
        try:
            t0 = time.perf_counter()
            lib = make()
            libs.append((lib, time.perf_counter() - t0))
        except ImportError as e:
            print(f"# skipped: {e}")
    cases = [("json", json.dumps(SCHEMA), tok.encode(ANSWER) + [tok.eos_ids[0]]),
             ("regex", REGEX, tok.encode(REGEX_ANSWER))]
    print(f"{'library':<14} {'version':<8} {'setup s':>8} {'case':<6} {'tokens':>6} {'compile ms':>11} "
          f"{'1st token us':>13} {'mask+commit us/token':>21}")
    for lib, setup in libs:
        for kind, text, ids in cases:
            if kind == "json":
                ids = ids[:-1]     # the closing eos is checked by allowed() only in llguidance's matcher
            c, f, p = walk(lib, kind, text, ids, rounds)
            print(f"{lib.name:<14} {lib.version:<8} {setup:8.2f} {kind:<6} {len(ids):6d} {c * 1e3:11.1f} "
                  f"{f * 1e6:13.1f} {p * 1e6:21.1f}")


def part2(tok, model_path: str, backend: str, rounds: int, n_tokens: int) -> None:
    import st_sdk

    model = st_sdk.load(model_path, backend=backend)
    model.tokenizer = tok
    print(f"# model {model_path} backend {model.backend.name} weights {model.selection.weight_format if hasattr(model.selection, 'weight_format') else ''}")
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string", "maxLength": 400}}}
    prompt = "Write a JSON record about a person: "
    kw = dict(max_new_tokens=n_tokens, seed=0, temperature=1.0, ignore_eos=True)
    free, cons, ratios = [], [], []
    model.generate(prompt, max_new_tokens=2)   # warm up
    for r in range(rounds):
        a = model.generate(prompt, **kw)
        b = model.generate(prompt, json_schema=schema, **kw)
        fa = a.timings["decode_s"] / max(1, a.timings["generated_tokens"] - 1)
        fb = b.timings["decode_s"] / max(1, b.timings["generated_tokens"] - 1)
        free.append(fa)
        cons.append(fb)
        ratios.append(fb / fa)
        print(f"round {r}: free {fa * 1e3:.1f} ms/token ({a.timings['generated_tokens']} tokens), "
              f"json_schema {fb * 1e3:.1f} ms/token ({b.timings['generated_tokens']} tokens, {b.finish_reason})")
    print(f"median decode ms/token: free {statistics.median(free) * 1e3:.1f}, json_schema "
          f"{statistics.median(cons) * 1e3:.1f}, paired ratio {statistics.median(ratios):.3f}, overhead "
          f"{(statistics.median(cons) - statistics.median(free)) * 1e3:.2f} ms/token")


def sampler_overhead(tok, rounds: int) -> None:
    """st-sdk's Sampler.step on random [V] logits with and without json_schema (no model)."""
    from st_sdk.generation import Options, Sampler

    class Fake:
        class config:
            vocab_size = V
            eos_token_id = []
            max_position_embeddings = 1 << 20
        tokenizer = tok

    ids = tok.encode(ANSWER)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((len(ids), V)).astype(np.float32)
    out = {}
    for name, kw in (("free", {}), ("json_schema", {"json_schema": {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}})):
        ts = []
        for _ in range(rounds):
            s = Sampler(Fake, Options.parse(seed=0, **kw), [1, 2, 3])
            t0 = time.perf_counter()
            for i, t in enumerate(ids):
                x = logits[i].copy()
                x[t] += 1e4 if "json_schema" in kw else 0.0   # walk the valid answer
                s.step(x)
                if s.finished:
                    break
            ts.append((time.perf_counter() - t0) / (i + 1))
        out[name] = statistics.median(ts)
        print(f"Sampler.step {name:<12} {out[name] * 1e6:8.1f} us/token")
    print(f"Sampler.step constraint overhead {(out['json_schema'] - out['free']) * 1e6:.1f} us/token")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiktoken", required=True, help="Qwen's qwen.tiktoken ranks file")
    ap.add_argument("--model", help="a 4b-a0.6b GGUF for part 2 (end-to-end decode)")
    ap.add_argument("--backend", default="c")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    print(f"# constrained_overhead: python {platform.python_version()}, {platform.machine()}, "
          f"loadavg {open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else '?'}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, vocab {V}")
    t0 = time.perf_counter()
    tok = qwen2_tokenizer(args.tiktoken)
    print(f"# Qwen2 tokenizer built in {time.perf_counter() - t0:.1f} s; answer {len(tok.encode(ANSWER))} tokens")
    part1(tok, args.rounds)
    sampler_overhead(tok, args.rounds)
    if args.model:
        part2(tok, args.model, args.backend, args.rounds, args.tokens)
    print(f"# loadavg at end {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    sys.exit(main())
