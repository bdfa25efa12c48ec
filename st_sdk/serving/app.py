"""The OpenAI-compatible HTTP layer: `create_app(model_or_engine)` returns a FastAPI app whose routes
turn request bodies into requests on the model's engine and its events into answers. Nothing here
schedules or samples: a deployment (uvicorn here, Ray Serve replicas elsewhere) wraps this app.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/chat/completions,
POST /v1/completions (plain JSON, or server-sent events with "stream": true).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from sse_starlette.sse import EventSourceResponse

from ..errors import BusyError, InputError, STError
from ..generation.conversation import chat_prompt_ids
from ..generation.engine import Engine
from ..generation.loop import submit_cached
from ..generation.options import Options, encode_prompt
from . import protocol as P
from .metrics import Metrics

log = logging.getLogger("st_sdk.serving")
RETRY_AFTER_S = 1
#: how often a non-streamed request checks that its client is still there
DISCONNECT_POLL_S = 0.5


class _Sink:
    """Engine events (engine thread) into an asyncio queue (the event loop), tagged with the run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))


def create_app(target, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The app serving `target` (a Model, or its Engine). model_name: what /v1/models lists and requests
    must name (default: the model file's name); api_key: when set, /v1 routes need
    `Authorization: Bearer <api_key>`."""
    engine = target if isinstance(target, Engine) else target.engine
    model = engine.model
    name = model_name or (Path(model.path).name if model.path else "st-sdk")
    created = int(time.time())
    metrics = Metrics(engine)
    app = FastAPI(title="st-sdk", version="1", docs_url=None, redoc_url=None)
    app.state.engine, app.state.model_name, app.state.metrics = engine, name, metrics

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        err = P.APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                         code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def count_and_authorise(request: Request, call_next):
        path = request.url.path
        if api_key is not None and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                e = P.APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
                metrics.http(path, 401)
                return JSONResponse(e.body(), status_code=401)
        response = await call_next(request)
        metrics.http(path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != name:
            raise _not_found(model_id, name)
        return _model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, "completion")

    async def _handle(request: Request, kind: str):
        try:
            body = await request.json()
        except Exception:
            raise P.APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        job = P.parse(body, kind, model.config.vocab_size)
        if job.model and job.model != name:
            raise _not_found(job.model, name)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        runs = _submit(job, loop, queue)
        rid, t = P.new_id(kind), P.now()
        if job.stream:
            return EventSourceResponse(_stream(job, runs, queue, rid, t), ping=15, sep="\n")
        return await _answer(request, job, runs, queue, rid, t)

    def _submit(job: P.Job, loop, queue) -> list:
        prompts = []
        try:
            for p in job.prompts:
                ids = chat_prompt_ids(model, p) if job.kind == "chat" else encode_prompt(model, p)
                text = p if isinstance(p, str) else (model.tokenizer.decode(ids) if model.tokenizer else "")
                prompts.append((ids, text))
        except InputError as e:
            raise P.APIError(400, str(e), param="messages" if job.kind == "chat" else "prompt",
                             code="invalid_value") from None
        runs = []
        try:
            for ids, text in prompts:
                for j in range(job.n):
                    kw = dict(job.options)
                    if j and "seed" in kw:
                        kw["seed"] = (kw["seed"] + j) % 2**64   # n choices with one seed still differ
                    opts = Options.parse(**kw)
                    req = submit_cached(model, ids, opts, events=_Sink(loop, queue, len(runs)))
                    req.prompt_text = text
                    runs.append(req)
        except BusyError as e:
            _cancel(runs)
            raise P.APIError(503, str(e), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except STError as e:
            _cancel(runs)
            raise P.sdk_error(e) from None
        metrics.submitted(len(runs))
        return runs

    async def _answer(request: Request, job: P.Job, runs: list, queue: asyncio.Queue, rid: str, t: int):
        left = len(runs)
        try:
            while left:
                try:
                    i, (kind, value, _) = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        _cancel(runs)
                        metrics.disconnected += 1
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    raise value
                left -= kind == "done"
        except STError as e:
            raise P.sdk_error(e) from None
        except P.APIError:
            raise
        except Exception as e:
            log.exception("generation failed")
            raise P.APIError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error") from None
        finally:
            _cancel(runs)
        out = P.envelope(job.kind, rid, name, t)
        out["choices"] = [_choice(job, i, r) for i, r in enumerate(runs)]
        out["usage"] = _usage(job, runs)
        metrics.finished(runs)
        return out

    def _choice(job: P.Job, index: int, r) -> dict:
        res = r.result
        tok = model.tokenizer
        lp = None
        if job.logprobs is not None:
            lp = (P.chat_logprobs(tok, res.token_ids, res.logprobs, res.top_logprobs) if job.kind == "chat" else
                  P.completion_logprobs(tok, res.token_ids, res.logprobs, res.top_logprobs,
                                        len(r.prompt_text) if job.echo else 0))
        finish = P.FINISH[res.finish_reason]
        if job.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": res.text}, "logprobs": lp,
                    "finish_reason": finish}
        text = (r.prompt_text if job.echo else "") + res.text
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def _usage(job: P.Job, runs: list) -> dict:
        prompt = sum(len(r.prompt_ids) for r in runs[::job.n])   # each prompt counted once
        return P.usage(prompt, sum(len(r.generated) for r in runs))

    async def _stream(job: P.Job, runs: list, queue: asyncio.Queue, rid: str, t: int):
        chat = job.kind == "chat"
        sent = [0] * len(runs)   # tokens whose logprobs went out

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False, upto: int | None = None) -> str:
            c = P.envelope(job.kind, rid, name, t, chunk=True)
            r = runs[i]
            lp = None
            if job.logprobs is not None and upto is not None and upto > sent[i]:
                a, b = sent[i], upto
                lp = (P.chat_logprobs if chat else
                      lambda tk, ids, lps, tops: P.completion_logprobs(tk, ids, lps, tops, 0))(
                    model.tokenizer, r.generated[a:b], r.logprobs[a:b], r.top_logprobs[a:b] if r.top_logprobs else None)
                sent[i] = b
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                c["choices"] = [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]
            else:
                c["choices"] = [{"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}]
            if job.include_usage:
                c["usage"] = None
            return json.dumps(c, ensure_ascii=False)

        left = len(runs)
        try:
            if chat:
                for i in range(len(runs)):
                    yield {"data": chunk(i, None, None, role=True)}
            elif job.echo:
                for i, r in enumerate(runs):
                    yield {"data": chunk(i, r.prompt_text, None)}
            while left:
                i, (kind, value, n) = await queue.get()
                if kind == "piece":
                    yield {"data": chunk(i, value, None, upto=n)}
                elif kind == "error":
                    err = P.APIError(400 if isinstance(value, STError) else 500, f"generation failed: {value}")
                    yield {"data": json.dumps(err.body())}
                    return
                else:
                    left -= 1
                    c = json.loads(chunk(i, None, P.FINISH[runs[i].result.finish_reason], upto=n))
                    if not job.include_usage:   # usage in every answer, on the last chunk of each choice
                        c["usage"] = P.usage(len(runs[i].prompt_ids), len(runs[i].generated))
                    yield {"data": json.dumps(c, ensure_ascii=False)}
            if job.include_usage:
                c = P.envelope(job.kind, rid, name, t, chunk=True)
                c["choices"] = []
                c["usage"] = _usage(job, runs)
                yield {"data": json.dumps(c)}
            metrics.finished(runs)
            yield {"data": "[DONE]"}
        finally:   # the client went away (the task is cancelled) or we are done: let go of the requests
            if any(r.result is None for r in runs):
                metrics.disconnected += 1
            _cancel(runs)

    return app


def _cancel(runs) -> None:
    """Cancel what still runs; a finished request's session goes back to the prompt cache."""
    for r in runs:
        r.cancel.set()
        if r.result is not None and not getattr(r, "given_back", False):
            r.given_back = True
            r.on_done(r.result)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "st-sdk"}


def _not_found(asked: str, name: str) -> P.APIError:
    return P.APIError(404, f"model {asked!r} not found; this server serves {name!r}", param="model",
                       code="model_not_found")


def serve(target, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(target, model_name=model_name, api_key=api_key), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=5)
