"""Train the small SmallThinker that ships with st-sdk (`st_sdk/data/`), on CPU with torch.

    python tools/train_smallthinker.py --out DIR [--steps 1600] [--seed 0] [--ship]

Text: the docstrings of Python's standard library (every importable public module and submodule of
the running interpreter: module, class, function and method docstrings with their signatures) and
the language-reference topics `pydoc` shows (`pydoc_data.topics`), all under the PSF licence
(st_sdk/data/LICENSE-PSF.txt). A module (or topic) is held out for evaluation when
zlib.crc32(name) % 10 == 0; nothing held out is seen by the tokenizer or the model.

Model: every SmallThinker feature. 8 layers, hidden 256, 4 query heads / 2 key-value heads of 64,
the router on the raw layer input before attention with sigmoid-renormalised top-2 of 8 experts,
ReGLU experts of width 256 (relu(gate) * up), the NoPE/RoPE hybrid (layer i is NoPE + global
attention iff i % 4 == 0, the others RoPE + a 64-token sliding window, shorter than the 256-token
training sequences), a tied head. Every matrix has rows of 256 so the k-quants apply to all of them.
Tokenizer: byte-level BPE (Qwen2's pre-tokenizer, 2048 ids with the ChatML specials) trained by
`tokenizers` on the training split. A Switch-style load-balancing loss (0.01) keeps experts in use;
a router z-loss (1e-3) keeps the router logits small (see Layer.moe).

Training saves DIR/checkpoint.pt (weights, optimiser, data order, loss history) at every evaluation;
--resume continues a stopped run from it with the same result as an uninterrupted one.

Writes to DIR: corpus/ (train.txt, heldout.txt), hf/ and smallthinker-docs-f32.gguf (through
st-sdk's own writers), loss.json and loss.png. Before writing it checks that st-sdk's NumPy backend
gives the torch model's logits on the same weights. --ship also writes the package's checkpoint and
evaluation text into st_sdk/data/.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's st_sdk (and its st_sdk/data), not an installed one
DATA = ROOT / "st_sdk" / "data"

#: the shipped model's shape (see the module docstring)
CONFIG = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, moe_num_primary_experts=8, moe_num_active_primary_experts=2,
              moe_ffn_hidden_size=256, sliding_window_size=64, rope_theta=10000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, max_position_embeddings=256)
SHIP_FORMAT = "q8_0"           # st_sdk/data/__init__.py names the file
SHIP_NAME = "smallthinker-docs"
HELD_OUT_MOD = 10
#: stdlib modules never imported: they open browsers, print, start GUIs or run code at import
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "lib2to3",
                "pydoc_data", "test", "venv", "__main__"}


# ---- text -------------------------------------------------------------------------------------
def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_MOD == 0


def _public(name: str) -> bool:
    parts = name.split(".")
    return parts[0] not in SKIP_MODULES and not any(
        p.startswith("_") or p in ("test", "tests", "__main__", "idle_test") for p in parts)


def _quiet_import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _literal(v) -> bool:
    """Defaults shown as written: plain literals that do not depend on the machine (no paths, no
    environment, no object addresses)."""
    if v is None or isinstance(v, (bool, int, float, complex)):
        return True
    if isinstance(v, str):
        return len(v) <= 40 and "/" not in v and "\\" not in v
    if isinstance(v, bytes):
        return len(v) <= 40 and b"/" not in v and b"\\" not in v
    if isinstance(v, tuple):
        return len(v) <= 8 and all(_literal(x) for x in v)
    return False


def _signature(name: str, obj) -> str:
    """name(signature), defaults that are not plain literals shown as '...'."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [p if p.default is p.empty or _literal(p.default) else p.replace(default=_Elided())
              for p in sig.parameters.values()]
    return f"{name}{sig.replace(parameters=params)}"


def _doc(obj) -> str | None:
    d = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None   # own docs, not inherited
    return inspect.cleandoc(d) if d and d.strip() else None


def module_text(name: str, mod) -> str:
    """A module's docstring, then each public class and function defined in it (signature line, then
    its docstring), and each documented public method of those classes, in name order."""
    parts = [f"Module {name}\n\n{_doc(mod)}" if _doc(mod) else f"Module {name}"]
    for k, v in sorted(vars(mod).items()):
        if k.startswith("_") or getattr(v, "__module__", None) != name:
            continue
        if not (inspect.isclass(v) or inspect.isroutine(v)):
            continue
        d = _doc(v)
        if d:
            parts.append(f"{_signature(f'{name}.{k}', v)}\n{d}")
        if inspect.isclass(v):
            for mk, mv in sorted(vars(v).items()):
                if mk.startswith("_") or not (inspect.isroutine(mv) or isinstance(mv, property)):
                    continue
                md = _doc(mv)
                if md:
                    parts.append(f"{_signature(f'{name}.{k}.{mk}', mv)}\n{md}")
    return "\n\n".join(parts)


def collect_corpus() -> dict[str, str]:
    """{name: text} for every importable public stdlib module and submodule, and every pydoc topic
    (as 'topic:NAME'), in a fixed order; duplicate paragraphs after their first use are dropped."""
    names: set[str] = set()
    for n in sorted(sys.stdlib_module_names):
        if not _public(n):
            continue
        try:
            m = _quiet_import(n)
        except BaseException:   # platform modules that do not exist here (winreg, ...)
            continue
        names.add(n)
        if hasattr(m, "__path__"):
            for info in pkgutil.walk_packages(m.__path__, n + ".", onerror=lambda _: None):
                if _public(info.name):
                    names.add(info.name)
    docs: dict[str, str] = {}
    seen: set[str] = set()
    for name in sorted(names):
        try:
            mod = _quiet_import(name)
        except BaseException:
            continue
        with warnings.catch_warnings():   # deprecated aliases (typing.io, ...) warn when touched
            warnings.simplefilter("ignore")
            text = module_text(name, mod)
        paras = []
        for p in text.split("\n\n"):
            if p not in seen or p.startswith("Module "):
                seen.add(p)
                paras.append(p)
        docs[name] = "\n\n".join(paras)
    from pydoc_data.topics import topics

    for k in sorted(topics):
        docs[f"topic:{k}"] = topics[k].strip()
    return docs


# ---- tokenizer ------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's pre-tokenizer (what st-sdk and llama.cpp's 'qwen2' pre-tokenizer
    split alike), the ChatML specials as the last ids, and st-sdk's ChatML template."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    from st_sdk.chat_template import CHATML_TEMPLATE
    from st_sdk.tokenizer import CHATML_SPECIALS, Tokenizer, qwen2_tokenizer

    tk = qwen2_tokenizer({}, [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(CHATML_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIALS])
    return Tokenizer(tk, eos_ids=[tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")], bos_id=None,
                     chat_template=CHATML_TEMPLATE, source="<trained>",
                     special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    """One token stream: each document followed by <|endoftext|>."""
    eot = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for enc in tok.tk.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.int32)


# ---- the model in torch ------------------------------------------------------------------------
def build_torch_model(cfg, seed: int):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Layer(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            H, E, Fw = cfg.hidden_size, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size
            self.i = i
            self.attn_norm = nn.Parameter(torch.ones(H))
            self.wq = nn.Parameter(torch.empty(cfg.q_dim, H))
            self.wk = nn.Parameter(torch.empty(cfg.kv_dim, H))
            self.wv = nn.Parameter(torch.empty(cfg.kv_dim, H))
            self.wo = nn.Parameter(torch.empty(H, cfg.q_dim))
            self.ffn_norm = nn.Parameter(torch.ones(H))
            self.router = nn.Parameter(torch.empty(E, H))
            self.gate = nn.Parameter(torch.empty(E, Fw, H))
            self.up = nn.Parameter(torch.empty(E, Fw, H))
            self.down = nn.Parameter(torch.empty(E, H, Fw))

        def forward(self, h, cos, sin, swa_mask, stats=None):
            B, T, H = h.shape
            nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            router_in = h                                         # the raw layer input, before any norm
            a = rms_norm(h, self.attn_norm)
            q = (a @ self.wq.T).view(B, T, nH, hd).transpose(1, 2)
            k = (a @ self.wk.T).view(B, T, nKV, hd).transpose(1, 2)
            v = (a @ self.wv.T).view(B, T, nKV, hd).transpose(1, 2)
            if cfg.layer_uses_rope(self.i):                       # NoPE layers skip it for q and k
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            # query head h reads kv head h // group (enable_gqa); global layers are plain causal, sliding-window
            # layers also mask keys more than `window` positions back
            if cfg.layer_window(self.i):
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=swa_mask, enable_gqa=True)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            h = h + attn.transpose(1, 2).reshape(B, T, nH * hd) @ self.wo.T
            m = rms_norm(h, self.ffn_norm).reshape(B * T, H)
            moe, aux, z = self.moe(router_in.reshape(B * T, H), m, stats)
            return h + moe.view(B, T, H), aux, z

        def moe(self, router_in, m, stats):
            E, K = cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts
            logits = router_in @ self.router.T                    # [N, E]
            top, idx = logits.topk(K, dim=-1)
            s = torch.sigmoid(top)
            w = s / s.sum(-1, keepdim=True)                        # sigmoid, renormalised over the k picked
            flat = idx.reshape(-1)
            order = flat.argsort(stable=True)
            tok = order // K
            counts = torch.bincount(flat, minlength=E)
            xs = m[tok]
            ys, zero = [], 0
            for e, xe in enumerate(xs.split(counts.tolist())):
                g = xe @ self.gate[e].T
                ys.append((torch.relu(g) * (xe @ self.up[e].T)) @ self.down[e].T)
                if stats is not None:
                    zero += int((g <= 0).sum())
            y = torch.cat(ys) * w.reshape(-1)[order, None]
            out = torch.zeros_like(m).index_add_(0, tok, y)
            # Switch-style balance: fraction of picks per expert x mean normalised router score
            sig = torch.sigmoid(logits)
            p = (sig / sig.sum(-1, keepdim=True)).mean(0)
            f = counts.to(p.dtype) / flat.numel()
            aux = E * (f.detach() * p).sum()
            # router z-loss (ST-MoE): keeps the logits small. The router reads the raw residual stream,
            # whose norm grows with depth; unchecked, its logits pass 17, where float32 sigmoid is exactly
            # 1, and runtimes that pick the top k by sigmoid score (llama.cpp) break ties differently
            # from those that pick by logit (the reference, HF)
            z = torch.logsumexp(logits, -1).pow(2).mean()
            if stats is not None:
                stats.setdefault("counts", []).append(counts.cpu().numpy())
                stats.setdefault("zero", []).append(zero / max(1, xs.shape[0] * cfg.moe_ffn_hidden_size))
            return out, aux, z

    def rms_norm(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
            self.layers = nn.ModuleList(Layer(i) for i in range(cfg.num_hidden_layers))
            self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
            if not cfg.tie_word_embeddings:
                self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

        def forward(self, ids, stats=None):
            B, T = ids.shape
            pos = torch.arange(T, dtype=torch.float64)
            hd = cfg.head_dim
            inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            ang = pos[:, None] * inv[None]
            ang = torch.cat([ang, ang], -1)
            cos, sin = ang.cos().float(), ang.sin().float()
            t = torch.arange(T)
            swa = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - cfg.sliding_window_size)
            h = self.embed[ids]                                   # no scaling
            aux = z = 0.0
            for layer in self.layers:
                h, a, zl = layer(h, cos, sin, swa, stats)
                aux, z = aux + a, z + zl
            h = rms_norm(h, self.norm)
            head = self.embed if cfg.tie_word_embeddings else self.lm_head
            return h @ head.T, aux / len(self.layers), z / len(self.layers)

    torch.manual_seed(seed)
    model = Model()
    std, resid = 0.02, 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, resid if name.endswith(("wo", "down")) else std)
    return model


def hf_tensors(model, cfg):
    """(HF name, float32 numpy) of a torch model, in st-sdk's HF order."""
    from st_sdk.weights.layout import hf_shapes

    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
             "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
             "post_attention_layernorm.weight": "ffn_norm", "block_sparse_moe.primary_router.weight": "router"}
    for name in hf_shapes(cfg):
        if name == "model.embed_tokens.weight":
            yield name, sd["embed"]
        elif name == "model.norm.weight":
            yield name, sd["norm"]
        elif name == "lm_head.weight":
            yield name, sd["lm_head"]
        else:
            parts = name.split(".")
            i, rest = int(parts[2]), ".".join(parts[3:])
            if rest in names:
                yield name, sd[f"layers.{i}.{names[rest]}"]
            else:   # block_sparse_moe.experts.{e}.{gate,up,down}.weight
                e, part = int(parts[5]), parts[6]
                yield name, sd[f"layers.{i}.{part}"][e]


def st_params(model, cfg):
    """st-sdk ModelParams (float32, in memory) holding the torch model's weights."""
    from st_sdk.weights.layout import assemble
    from st_sdk.weights.tensor import WeightTensor

    tensors = {n: WeightTensor(n, "f32", x.shape, np.ascontiguousarray(x), "<torch>") for n, x in hf_tensors(model, cfg)}
    return assemble(cfg, tensors.__getitem__, "hf")


def check_parity(model, cfg, ids: np.ndarray, tol: float = 1e-4) -> float:
    """max|torch - st-sdk numpy| / max|logit| on one sequence; raises above `tol`."""
    import torch

    from st_sdk.loader import build_model

    with torch.no_grad():
        ours = model(torch.as_tensor(ids[None], dtype=torch.long))[0][0].numpy()
    theirs = build_model(cfg, st_params(model, cfg), backend="numpy").logits(ids)
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    if not err < tol:
        raise SystemExit(f"torch and st-sdk disagree on the same weights: max rel diff {err:.2e} >= {tol}")
    return err


def check_llama_cpp(gguf: Path, ids: np.ndarray, log) -> None:
    """llama.cpp (llama-cpp-python, when importable) loads the file and gives st-sdk's logits on a
    sequence no longer than the sliding window (llama.cpp fixes the window at 4096)."""
    try:
        import llama_cpp
    except ImportError:
        log("llama-cpp-python is not installed: llama.cpp check skipped")
        return
    import st_sdk

    ours = st_sdk.load(gguf, backend="numpy").logits(ids)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2 * len(ids), logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)   # f32 KV cache
    llm.eval([int(i) for i in ids])
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    err = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    log(f"llama.cpp {llama_cpp.__version__} on {gguf.name}: max rel diff {err:.1e} over {len(ids)} tokens, "
        f"argmax agreement {(ours.argmax(1) == theirs.argmax(1)).mean():.3f}")
    if not err < 1e-4:
        raise SystemExit("llama.cpp disagrees with st-sdk on the written file")


# ---- training ---------------------------------------------------------------------------------
def batches(stream: np.ndarray, rng: np.random.Generator, B: int, T: int):
    starts = rng.integers(0, len(stream) - T - 1, B)
    return np.stack([stream[s:s + T + 1] for s in starts]).astype(np.int64)


def evaluate(model, stream: np.ndarray, T: int, n_seq: int) -> float:
    """Mean next-token loss over the first n_seq non-overlapping windows of a held-out stream."""
    import torch
    import torch.nn.functional as F

    model.eval()
    x = np.stack([stream[i * T:(i + 1) * T + 1] for i in range(n_seq)]).astype(np.int64)
    with torch.no_grad():
        logits, _, _ = model(torch.as_tensor(x[:, :-1]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(x[:, 1:]).reshape(-1))
    model.train()
    return float(loss)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, cfg, train_ids, eval_ids, args, log) -> list[dict]:
    import torch
    import torch.nn.functional as F

    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    rng = np.random.default_rng(args.seed)
    history: list[dict] = []
    ckpt = args.out / "checkpoint.pt"
    data_crc = zlib.crc32(train_ids.tobytes())
    first = 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["data_crc"] != data_crc or state["steps"] != args.steps:
            raise SystemExit(f"{ckpt}: written for other training tokens or another --steps; remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        history, first = state["history"], state["step"]
        log(f"resumed from {ckpt} at step {first}")
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for step in range(first, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = torch.as_tensor(batches(train_ids, rng, args.batch, args.seq))
        logits, aux, z = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + args.balance * aux + args.router_z * z).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": loss.item(), "aux": aux.item(), "z": z.item(), "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rec["eval_loss"] = evaluate(model, eval_ids, args.seq, args.eval_seqs)
            log(f"step {step + 1}/{args.steps}  loss {rec['loss']:.3f}  held-out {rec['eval_loss']:.3f}  "
                f"aux {rec['aux']:.3f}  z {rec['z']:.2f}  {rec['seconds']:.0f} s")
        history.append(rec)
        if "eval_loss" in rec:   # a run stopped later resumes from here (--resume)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                        "history": history, "step": step + 1, "steps": args.steps, "data_crc": data_crc},
                       ckpt.with_suffix(".part"))
            ckpt.with_suffix(".part").replace(ckpt)
    return history


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], lw=0.6, alpha=0.6, label="training batch")
    ev = [r for r in history if "eval_loss" in r]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="training sequence length (longer than the window)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--balance", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--router-z", type=float, default=1e-3, help="router z-loss coefficient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (written at every "
                                                           "evaluation) instead of starting over")
    ap.add_argument("--ship", action="store_true", help=f"also write st_sdk/data/{SHIP_NAME}-{SHIP_FORMAT}.gguf "
                                                         "and the evaluation text")
    ap.add_argument("--ship-only", action="store_true", help="ship from an earlier run's --out, without training")
    args = ap.parse_args(argv)
    if args.ship_only:
        ship(args.out / f"{SHIP_NAME}-f32.gguf", args.out / "corpus" / "heldout.txt", print)
        return 0

    import torch

    from st_sdk.config import ModelConfig
    from st_sdk.weights.export import export

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    docs = collect_corpus()
    train_names = [n for n in docs if not held_out(n)]
    eval_names = [n for n in docs if held_out(n)]
    (out / "corpus").mkdir(exist_ok=True)
    for split, names in (("train", train_names), ("heldout", eval_names)):
        (out / "corpus" / f"{split}.txt").write_text("\n\n".join(docs[n] for n in names), encoding="utf-8")
    log(f"corpus: {len(train_names)} training documents ({sum(len(docs[n]) for n in train_names) / 1e6:.2f} M "
        f"chars), {len(eval_names)} held out ({sum(len(docs[n]) for n in eval_names) / 1e6:.2f} M chars), "
        f"Python {sys.version.split()[0]}, {time.perf_counter() - t0:.1f} s")

    L = CONFIG["num_hidden_layers"]
    hybrid = tuple(0 if i % 4 == 0 else 1 for i in range(L))
    tok = train_tokenizer([docs[n] for n in train_names], CONFIG["vocab_size"])
    cfg = ModelConfig(**CONFIG, rope_layout=hybrid, sliding_window_layout=hybrid,
                      eos_token_id=tuple(tok.eos_ids), bos_token_id=tok.token_to_id("<|endoftext|>"),
                      source=f"<{SHIP_NAME}>")
    if tok.vocab_size != cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} ids, the model {cfg.vocab_size}")
    train_ids = encode_docs(tok, [docs[n] for n in train_names])
    eval_ids = encode_docs(tok, [docs[n] for n in eval_names])
    log(f"tokenizer: {tok.vocab_size} ids; {len(train_ids)} training tokens "
        f"({sum(len(docs[n]) for n in train_names) / len(train_ids):.2f} chars/token), {len(eval_ids)} held out")

    model = build_torch_model(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters ({cfg.parameter_count() / 1e6:.2f} M by st-sdk's count); "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens, {args.threads} threads, seed {args.seed}")
    err0 = check_parity(model, cfg, eval_ids[:100])
    log(f"parity at init: torch vs st-sdk numpy max rel diff {err0:.1e}")
    history = train(model, cfg, train_ids, eval_ids, args, log)
    model.eval()
    err = check_parity(model, cfg, eval_ids[:200])
    log(f"parity after training: torch vs st-sdk numpy max rel diff {err:.1e}")

    (out / "loss.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "python": sys.version.split()[0], "torch": torch.__version__,
                                               "history": history}, indent=1))
    final = history[-1]
    plot_loss(history, out / "loss.png",
              f"{SHIP_NAME}: {n_params / 1e6:.1f} M params, {args.steps} steps x {args.batch * args.seq} tokens, "
              f"seed {args.seed}; final held-out {final['eval_loss']:.3f}")
    paths = export(cfg, hf_tensors(model, cfg), "f32", hf_dir=out / "hf", gguf_path=out / f"{SHIP_NAME}-f32.gguf",
                   tokenizer=tok, desc="writing")
    log(f"wrote {paths['hf']} and {paths['gguf']}; loss curve {out / 'loss.png'}")
    check_llama_cpp(paths["gguf"], eval_ids[:cfg.sliding_window_size], log)
    if args.ship:
        ship(paths["gguf"], out / "corpus" / "heldout.txt", log)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def ship(f32_gguf: Path, heldout: Path, log) -> None:
    """Write the package's checkpoint (quantised by st-sdk's own quantiser), its evaluation text (the
    first EVAL_CHARS of the held-out split, whole paragraphs), the routing statistics measured on that
    text, the licence of the text (the running Python's LICENSE.txt), and docs/trained_model_loss.png."""
    import shutil
    import sysconfig

    from st_sdk.cli import main as cli
    from st_sdk.data import HELDOUT_TEXT, MODEL, ROUTING_STATS

    DATA.mkdir(exist_ok=True)
    if cli(["quantize", str(f32_gguf), str(MODEL), "--type", SHIP_FORMAT]) != 0:
        raise SystemExit("quantize failed")
    text = heldout.read_text(encoding="utf-8")
    HELDOUT_TEXT.write_text(text[:EVAL_CHARS].rsplit("\n\n", 1)[0] + "\n", encoding="utf-8")
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", DATA / "LICENSE-PSF.txt")
    if cli(["perplexity", str(MODEL), str(HELDOUT_TEXT), "--backend", "numpy", "--routing-stats",
            str(ROUTING_STATS)]) != 0:
        raise SystemExit("measuring the routing failed")
    stats = json.loads(ROUTING_STATS.read_text())
    stats["source"] = f"{MODEL.name} on {HELDOUT_TEXT.name}"   # names, not this machine's paths
    ROUTING_STATS.write_text(json.dumps(stats, indent=1) + "\n")
    plot = f32_gguf.parent / "loss.png"
    if plot.is_file():   # the loss curve, shown in docs/trained_model.md
        shutil.copyfile(plot, ROOT / "docs" / "trained_model_loss.png")
    log(f"shipped {MODEL} ({MODEL.stat().st_size / 2**20:.1f} MiB), {HELDOUT_TEXT.name}, {ROUTING_STATS.name}")


#: characters of held-out text shipped for tests and `st-sdk perplexity demo demo`
EVAL_CHARS = 40_000

if __name__ == "__main__":
    sys.exit(main())
