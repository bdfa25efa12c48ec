"""Model: a loaded SmallThinker bound to one backend's op table."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from . import graph
from .arguments import positive_int, token_ids
from .backend import Backend, ModelParams, OpTable
from .config import DEFAULT_CONTEXT, ModelConfig
from .errors import InputError

DEFAULT_CHUNK = 256


class Session:
    """Per-conversation decoding state: the KV cache and the tokens it holds. Not thread-safe;
    one model serves many sessions (one per thread)."""

    def __init__(self, model: "Model", capacity: int | None = None):
        self.model = model
        self.capacity = min(capacity or model.context, model.context)
        self.cache = model.new_cache(min(self.capacity, DEFAULT_CONTEXT))   # grows past it
        self.tokens: list[int] = []

    def feed(self, ids: Sequence[int], all_logits: bool = False, chunk: int | None = None) -> np.ndarray:
        """Append tokens (prefill in chunks of `chunk` tokens, default the model's `chunk_size`) and return
        float32 logits: every position's [T, V] when all_logits, else the last position's [V]. Under a
        memory budget a chunk is at most `chunk_size` tokens, the step the plan counted."""
        m = self.model
        m.check_files()
        ids = m.check_ids(ids, start=len(self.tokens))
        chunk = positive_int(chunk, "chunk") or m.chunk_size
        if m.offload is not None:
            chunk = min(chunk, m.chunk_size)
        vocab = m.config.vocab_size
        rows = np.empty((len(ids), vocab), np.float32) if all_logits else None   # filled chunk by chunk
        room = rows is not None and m.offload is not None
        try:
            for s in range(0, len(ids), chunk):
                part = ids[s:s + chunk]
                pos = np.arange(len(self.tokens), len(self.tokens) + len(part), dtype=np.int64)
                with m._step_lock:
                    if room:   # under a budget: the rows still to be written and this chunk's own logits
                        m.offload.reserved[self] = (len(ids) - s + len(part)) * vocab * 4
                        m.offload.keep_within()   # slots given back first, if the process would pass its limit
                    logits = m._forward(part, pos, self.cache, last_only=not all_logits)
                if rows is not None:
                    rows[s:s + len(part)] = m.ops.to_numpy(logits)
                elif s + chunk >= len(ids):
                    last = m.ops.to_numpy(logits)[-1].astype(np.float32, copy=False)
                self.tokens.extend(int(t) for t in part)
        finally:
            if room:
                with m._step_lock:
                    m.offload.reserved.pop(self, None)
        return rows if all_logits else last

    def _check_step(self, ids) -> np.ndarray:
        """ids for one step of feed_batch: validated, and no longer than one chunk."""
        ids = self.model.check_ids(ids, start=len(self.tokens))
        if len(ids) > self.model.chunk_size:
            raise InputError(f"feed_batch: {len(ids)} ids for one session in one step exceed the chunk size "
                             f"{self.model.chunk_size}; feed longer prompts in chunks")
        return ids

    def rewind(self, n: int) -> bool:
        """Keep only the first n tokens (and their KV). False, with nothing changed, when the cache
        cannot (a sliding-window ring that already dropped some of them, or a backend cache without
        `truncate`)."""
        if n >= len(self.tokens):
            return n == len(self.tokens)
        truncate = getattr(self.cache, "truncate", None)
        if n < 0 or truncate is None or not truncate(n):
            return False
        del self.tokens[n:]
        return True


class Model:
    def __init__(self, config: ModelConfig, params: ModelParams, backend: Backend, ops: OpTable,
                 tokenizer: Any = None, selection: Any = None, path: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK, kv_dtype: str | None = None):
        self.config = config
        self.params = params
        self.backend = backend
        self.ops = ops
        self.tokenizer = tokenizer
        self.selection = selection
        self.path = path
        self.chunk_size = chunk_size
        self.kv_dtype = kv_dtype   # the KV cache's storage type (None: the cache's own, no choice offered)
        self.offload = None        # the ExpertCache in memory-budget mode
        self.memory_plan = None    # what the budget holds, planned before loading
        self.files = None          # FileWatch over the mapped weight files (st_sdk.weights.watch)
        self.context = config.max_position_embeddings   # most tokens one sequence may hold (load(context=N))
        self._engine = None
        self._engine_lock = threading.Lock()
        # steps of sessions fed from several threads run one at a time where they share mutable state
        # (the memory budget's expert cache: set by the loader); otherwise they run concurrently
        self._step_lock = contextlib.nullcontext()
        from .generation.prompt_cache import PromptCache

        self.prompt_cache = PromptCache(self)   # the KV of the last request, for the next one's shared prefix

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path or 'in-memory'}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"experts={c.moe_num_active_primary_experts}/{c.moe_num_primary_experts}, backend={self.backend.name})")

    def check_files(self) -> None:
        """WeightError naming the file if a weight file changed on disk since it was loaded (once per
        step, before any kernel reads the mapped weights; see st_sdk/weights/watch.py)."""
        if self.files is not None:
            self.files.check()

    # ---- the data plane --------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, positions: np.ndarray, cache, last_only: bool = False):
        return graph.forward(self.ops, self.config, self.params, ids, positions, cache, last_only)

    def new_cache(self, capacity: int):
        """An empty KV cache for `capacity` tokens (it grows past that) in this model's kv_dtype."""
        if self.kv_dtype is None:
            return self.ops.new_cache(self.config, capacity)
        return self.ops.new_cache(self.config, capacity, kv_dtype=self.kv_dtype)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes the KV cache holds at `tokens` tokens (st_sdk.config.ModelConfig.kv_cache_bytes)."""
        return self.config.kv_cache_bytes(tokens, self.kv_dtype or "f32")

    def check_ids(self, ids: Iterable[int] | np.ndarray, start: int = 0, name: str = "ids") -> np.ndarray:
        arr = token_ids(ids, name)
        if arr.ndim != 1:
            raise InputError(f"{name}: expected a 1-D sequence of token ids, got shape {list(arr.shape)}")
        if arr.size == 0:
            raise InputError(f"{name}: empty sequence of token ids")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name}: token ids must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.config.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise InputError(f"{name}[{j}] = {int(arr[j])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if start + arr.size > self.context:
            raise InputError(f"{name}: {start + arr.size} tokens exceed the model's context of {self.context} "
                             f"tokens (load(..., context=N) sets it, up to max_position_embeddings="
                             f"{self.config.max_position_embeddings})")
        return arr.astype(np.int64)

    def session(self, capacity: int | None = None) -> Session:
        return Session(self, capacity)

    def feed_batch(self, sessions: Sequence[Session], ids_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One step over several sessions: feed each its new ids (ragged: a prefill chunk for one, a single
        token for others), advance its cache and tokens, and return each one's last-position float32
        logits [V]. The dense ops read each weight once for all sessions (graph.forward_batch). Each row
        equals what `session.feed(ids)` alone gives: bit for bit on the C backend, within float32
        rounding on the others (docs/serving.md)."""
        if len(sessions) != len(ids_list) or not sessions:
            raise InputError(f"feed_batch: expected as many id lists as sessions (at least one), got "
                             f"{len(ids_list)} for {len(sessions)}")
        if len({id(s) for s in sessions}) != len(sessions):
            raise InputError("feed_batch: a session appears twice in one step")
        for s in sessions:
            if not isinstance(s, Session) or s.model is not self:
                raise InputError("feed_batch: every session must come from this model's session()")
        checked = [s._check_step(ids) for s, ids in zip(sessions, ids_list)]
        self.check_files()
        if getattr(self._forward, "__func__", None) is not Model._forward:
            # the step is wrapped (a tracing plugin's st_sdk_wrap_step, a test double): its contract is
            # one sequence per call, so each session steps through it in turn
            return [s.feed(ids) for s, ids in zip(sessions, checked)]
        seg = np.zeros(len(sessions) + 1, np.int64)
        seg[1:] = np.cumsum([len(ids) for ids in checked])
        positions = np.concatenate([np.arange(len(s.tokens), len(s.tokens) + len(ids), dtype=np.int64)
                                    for s, ids in zip(sessions, checked)])
        with self._step_lock:
            out = graph.forward_batch(self.ops, self.config, self.params, np.concatenate(checked), positions,
                                      [s.cache for s in sessions], seg)
        logits = np.asarray(self.ops.to_numpy(out), np.float32)
        for s, ids in zip(sessions, checked):
            s.tokens.extend(int(t) for t in ids)
        return list(logits)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 logits [T, vocab] for a fresh sequence."""
        ids = self.check_ids(ids)
        return self.session(capacity=len(ids)).feed(ids, all_logits=True)

    # ---- text <-> ids ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text` with the model's tokenizer. Special tokens written in the text
        ("<|im_end|>") become their ids; add_special=True also adds what the tokenizer adds around a
        sequence (nothing for SmallThinker's Qwen2 tokenizer)."""
        from .generation.options import need_tokenizer

        if not isinstance(text, str):
            raise InputError(f"text: expected a str, got {type(text).__name__}")
        return list(need_tokenizer(self, "tokenize").encode(text, add_special_tokens=bool(add_special)))

    def detokenize(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """The text of token ids (special tokens written out unless skip_special); invalid UTF-8 (a
        character cut between ids) becomes U+FFFD."""
        from .generation.options import need_tokenizer

        tok = need_tokenizer(self, "detokenize")
        if isinstance(ids, (int, np.integer)) or not isinstance(ids, (list, tuple, np.ndarray)):
            raise InputError(f"ids: expected a list of token ids, got {type(ids).__name__}")
        if len(ids) == 0:
            return ""
        arr = self.check_ids(ids, name="ids")
        return tok.decode(arr.tolist(), skip_special_tokens=bool(skip_special))

    # ---- generation (text in, text out) ------------------------------------------------------
    @property
    def engine(self):
        """The scheduler every generation on this model runs through (continuous batching: one
        thread, started on demand, runs one step for all running requests). `engine.configure(
        max_batch=..., max_queue=..., max_kv_bytes=...)` sets its bounds."""
        with self._engine_lock:
            if self._engine is None:
                from .generation.engine import Engine

                self._engine = Engine(self)
            return self._engine

    def generate(self, prompt, **kwargs):
        """Text from a prompt (text or ids), or a list of results from a list of prompts run together
        (see docs/generation.md and docs/serving.md)."""
        from .generation import generate

        return generate(self, prompt, **kwargs)

    def chat(self, messages, **kwargs):
        from .generation import chat

        return chat(self, messages, **kwargs)

    def agenerate(self, prompt, **kwargs):
        """Async iterator of the text pieces generate(stream=True) yields."""
        from .generation import agenerate

        return agenerate(self, prompt, **kwargs)

    def conversation(self, system: str | None = None, **defaults):
        """A multi-turn chat that keeps its KV cache between turns (see generation.Conversation)."""
        from .generation import Conversation

        return Conversation(self, system=system, **defaults)
