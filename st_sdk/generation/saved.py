"""A conversation saved to a file and loaded in another process: messages, tokens and KV cache.

The file is safetensors (any safetensors reader opens it):

- tensors, for each layer i: `layers.{i}.k` and `layers.{i}.v`, float32 [n_i, num_key_value_heads,
  head_dim], the keys (after RoPE) and values the layer holds, and `layers.{i}.pos`, int64 [n_i], their
  absolute positions, in position order (a sliding-window layer holds at most its window);
- metadata (strings): `format` = "st-sdk-conversation/1"; `model`, the JSON fingerprint of the model
  it belongs to (its config and a SHA-256 of its norm and router weights, which differ between
  models and not between weight formats of one model); `tokens`, the JSON list of token ids the cache
  holds; `messages`, the JSON history; `system`; `defaults`, the JSON-serialisable generation
  defaults; `backend`, `weight_format` and `dtype`, for information.

Loading checks the fingerprint (a file from another model raises InputError naming both) and every
tensor's shape, then writes the keys and values into a new session of the loading model: the next
turn reads only its new tokens and, on the same backend and weights, gives the same tokens as the
original conversation would have.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import InputError

FORMAT = "st-sdk-conversation/1"


def fingerprint(model) -> dict:
    h = hashlib.sha256()
    params = model.params
    for p in [params.norm] + [q for lp in params.layers for q in (lp.attn_norm, lp.ffn_norm, lp.router)]:
        h.update(np.ascontiguousarray(p.raw.numpy(), dtype=np.float32).tobytes())
    return {"config": model.config.to_dict(), "weights_sha256": h.hexdigest()}


def save(conv, path) -> None:
    from safetensors.numpy import save_file

    session = conv.session
    tensors: dict[str, np.ndarray] = {}
    tokens: list[int] = []
    if session is not None:
        state = getattr(session.cache, "state", None)
        if state is None:
            raise InputError(f"save: the {conv.model.backend.name} backend's KV cache cannot be saved (no state())")
        for i, (k, v, pos) in enumerate(state()):
            tensors[f"layers.{i}.k"] = np.ascontiguousarray(k, np.float32)
            tensors[f"layers.{i}.v"] = np.ascontiguousarray(v, np.float32)
            tensors[f"layers.{i}.pos"] = np.ascontiguousarray(pos, np.int64)
        tokens = list(session.tokens)
    defaults = {k: v for k, v in conv.defaults.items() if _jsonable(v)}
    meta = {"format": FORMAT, "model": json.dumps(fingerprint(conv.model)), "tokens": json.dumps(tokens),
            "messages": json.dumps(conv.messages), "system": json.dumps(conv.system),
            "defaults": json.dumps(defaults), "backend": conv.model.backend.name,
            "weight_format": str(getattr(conv.model.selection, "weight_format", "")),
            "dtype": str(conv.model.backend.dtype)}
    save_file(tensors, str(path), metadata=meta)


def load(model, path) -> dict:
    """What `save` wrote, checked against `model`: {system, defaults, messages, session (or None)}."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such conversation file")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises its own errors on a bad header
        raise InputError(f"{p}: not a saved conversation ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{p}: not a saved conversation (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        saved = json.loads(meta["model"])
        tokens = [int(t) for t in json.loads(meta["tokens"])]
        messages = json.loads(meta["messages"])
        system = json.loads(meta["system"])
        defaults = json.loads(meta["defaults"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{p}: malformed metadata ({e})") from None
    mine = fingerprint(model)
    if saved != mine:
        what = "config differs" if saved.get("config") != mine["config"] else "weights differ"
        raise InputError(f"{p}: saved from another model (its {what}: file {_short(saved)} vs this model "
                         f"{_short(mine)})")
    cfg = model.config
    session = None
    if tokens:
        state = []
        for i in range(cfg.num_hidden_layers):
            try:
                k, v, pos = (tensors[f"layers.{i}.{x}"] for x in ("k", "v", "pos"))
            except KeyError as e:
                raise InputError(f"{p}: tensor {e.args[0]} is missing") from None
            want = (cfg.num_key_value_heads, cfg.head_dim)
            n = len(pos)
            if k.shape != (n, *want) or v.shape != (n, *want) or pos.ndim != 1 or n > len(tokens):
                raise InputError(f"{p}: layers.{i} has shapes k{list(k.shape)} v{list(v.shape)} pos{list(pos.shape)}, "
                                 f"expected [n, {want[0]}, {want[1]}] with n <= {len(tokens)}")
            state.append((k, v, pos))
        session = model.session(capacity=len(tokens) + 1)
        session.cache.restore(state, len(tokens))
        session.tokens = tokens
    return dict(system=system, defaults=defaults, messages=messages, session=session)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _short(fp: dict) -> str:
    c = fp.get("config", {})
    return (f"layers={c.get('num_hidden_layers')} hidden={c.get('hidden_size')} "
            f"weights_sha256={str(fp.get('weights_sha256'))[:12]}")
