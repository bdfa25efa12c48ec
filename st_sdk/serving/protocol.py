"""The OpenAI request and response shapes: request bodies checked and turned into generation options,
results turned into `chat.completion` / `text_completion` objects and their streamed chunks.

Unknown fields are ignored (clients send many); known ones are checked and a bad one raises
`APIError(400)` naming it. Omitted sampling fields take the SDK's defaults (the SmallThinker authors'
temperature 0.6, top-k 20, top-p 0.95), as llama-server uses its own.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import STError
from ..generation.options import Options

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}
#: OpenAI's ranges
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "invalid_request_error",
                             404: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class Job:
    """What one request body asks for, checked."""
    kind: str                                   # "chat" | "completion"
    prompts: list                               # chat: [messages]; completion: texts or id lists
    options: dict                               # keyword arguments for Options.parse
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                 # None: none; else the number of top alternatives
    echo: bool = False
    model: str | None = None


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(name, f"expected {kind} in [{lo}, {hi}], got {v!r}")
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"expected true or false, got {v!r}")
    return v


def parse(body: Any, kind: str, vocab_size: int) -> Job:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"expected a string, got {model!r}")
    if kind == "chat":
        prompts = [messages(body.get("messages"))]
    else:
        prompts = completion_prompts(body.get("prompt"))
    opts: dict = {}
    mx = body.get("max_completion_tokens", body.get("max_tokens"))
    if mx is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        opts["max_new_tokens"] = _number({name: mx}, name, 1, 10**9, integer=True)
    else:
        opts["max_new_tokens"] = None          # until an end-of-sequence token or the context is full
    for name, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False),
                                  ("top_k", -1, 10**9, True), ("min_p", 0, 1, False),
                                  ("repetition_penalty", 0, 100, False), ("seed", -2**63, 2**64 - 1, True)):
        v = _number(body, name, lo, hi, integer)
        if v is not None:
            opts[name] = v
    if opts.get("top_p") == 0:
        raise bad("top_p", "must be > 0")
    if opts.get("top_k") == -1:                # vLLM's "off"
        opts["top_k"] = 0
    if "seed" in opts:
        opts["seed"] %= 2**64                  # the SDK's seeds are non-negative
    if opts.get("repetition_penalty") == 0:
        raise bad("repetition_penalty", "must be > 0")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _number(body, name, -2, 2)
        if v:
            opts[name] = v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", f"expected a non-empty string or a list of them, got {stop!r}")
        opts["stop"] = stop
    opts["ignore_eos"] = _flag(body, "ignore_eos")
    n = _number(body, "n", 1, MAX_N, integer=True) or 1
    stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", f"expected an object, got {so!r}")
    include_usage = bool((so or {}).get("include_usage", False))
    bias = logit_bias(body.get("logit_bias"), vocab_size)
    if bias:
        opts["logit_bias"] = bias
    if kind == "chat":
        lp = None
        if _flag(body, "logprobs"):
            lp = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True) or 0
        elif body.get("top_logprobs"):
            raise bad("top_logprobs", "needs logprobs: true")
    else:
        lp = _number(body, "logprobs", 0, 5, integer=True)
    if lp is not None:
        opts["logprobs"] = lp if lp else True
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("response_format", f"expected {{'type': 'text' | 'json_object' | 'json_schema'}}, got {fmt!r}")
        if fmt["type"] == "json_object":
            opts["json_schema"] = {"type": "object"}
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise bad("response_format", "json_schema: expected {'name': ..., 'schema': {...}}")
            opts["json_schema"] = spec.get("schema") or {}
    try:
        Options.parse(**opts)                  # the SDK's own checks (names the field)
    except STError as e:
        raise sdk_error(e) from None
    return Job(kind, prompts, opts, n=n, stream=stream, include_usage=include_usage,
               logprobs=lp, echo=kind == "completion" and _flag(body, "echo"), model=model)


#: the SDK's argument names -> the request fields they come from
FIELDS = {"max_new_tokens": "max_tokens", "json_schema": "response_format", "prompt": "prompt",
          "logit_bias": "logit_bias", "stop": "stop", "seed": "seed"}


def sdk_error(e: Exception) -> APIError:
    """An SDK InputError as a 400 naming the request field its message starts with."""
    msg = str(e)
    head = msg.split(":")[0].split("[")[0].split(" ")[0]
    if msg.startswith("prompt of") and "max_new_tokens" in msg:
        head = "max_new_tokens"
    param = FIELDS.get(head, head if head.isidentifier() else None)
    if param and not msg.startswith(param):
        msg = f"{param}: {msg}"
    return APIError(400, msg, param=param, code="invalid_value")


def messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "expected an object with a 'role'")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):   # content parts: only text ones
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"expected a string or a list of text parts, got {content!r}")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompts(value) -> list:
    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str) and value:
        return [value]
    if ids_ok(value):
        return [value]
    if isinstance(value, list) and value and all((isinstance(p, str) and p) or ids_ok(p) for p in value):
        return list(value)
    raise bad("prompt", "expected a non-empty string, a list of token ids, or a list of those")


def logit_bias(value, vocab_size: int) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", f"expected an object mapping token ids to biases, got {value!r}")
    out = {}
    for k, v in value.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"key {k!r} is not a token id") from None
        if not 0 <= tok < vocab_size:
            raise bad("logit_bias", f"token id {tok} is outside the vocabulary (0..{vocab_size - 1})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", f"bias of token {tok} must be a number in [-100, 100], got {v!r}")
        out[tok] = float(v)
    return out


# ---- responses ----------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([int(tok)], skip_special_tokens=False) if tokenizer is not None else str(tok)


def chat_logprobs(tokenizer, ids, lps, tops) -> dict:
    def entry(tok, lp):
        s = token_text(tokenizer, tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for j, (tok, lp) in enumerate(zip(ids, lps)):
        e = entry(tok, lp)
        e["top_logprobs"] = [entry(t, v) for t, v in (tops[j].items() if tops else ())]
        content.append(e)
    return {"content": content}


def completion_logprobs(tokenizer, ids, lps, tops, offset: int) -> dict:
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": list(lps),
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in row.items()} for row in tops] if tops
            else [None] * len(tokens), "text_offset": offsets}


def envelope(kind: str, rid: str, model: str, created: int, chunk: bool = False) -> dict:
    obj = {"chat": ("chat.completion", "chat.completion.chunk"),
           "completion": ("text_completion", "text_completion")}[kind][chunk]
    return {"id": rid, "object": obj, "created": created, "model": model}


def now() -> int:
    return int(time.time())
