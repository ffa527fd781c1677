"""`nectar serve`: compiled documents behind an OpenAI-compatible HTTP API, one decode batch for all.

FastAPI routes and validates (with the pydantic models of `api`), uvicorn runs the event loop, and
the `Engine` thread decodes. A request's tokens travel from the engine's thread to its handler
through an asyncio queue, so a slow client never holds up the batch.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from tqdm.auto import tqdm

from . import api
from ..artifact import Artifact
from .engine import Delta, Engine, Request
from ..errors import NectarError
from ..manifest import useless_warning
from ..model.templates import encode, question_ids

log = logging.getLogger("nectar.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 32  # rows decoded together
    max_tokens: int = 512  # the largest answer a request may ask for, and the default
    max_body: int = 1 << 20  # bytes of a request body

    def __post_init__(self):
        for name in ("max_batch", "max_tokens", "max_body"):
            if getattr(self, name) < 1:
                raise NectarError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise NectarError(f"--port must be in 0..65535, got {self.port}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, api.error(message, code=code, param=param)


@dataclass
class Served:
    """What serving needs of a compiled document: its length, question layout and modules in inference
    form. The training-form bank the artifact also holds is dropped, halving the memory per document."""

    n: int
    question_template: str
    _providers: tuple

    @classmethod
    def of(cls, artifact: Artifact, model) -> "Served":
        return cls(artifact.n, artifact.question_template, artifact.providers(model))

    def providers(self, model) -> tuple:
        return self._providers


class Library:
    """The compiled documents served, by id (the artifact's file name without `.nectar`)."""

    def __init__(self, paths: list[Path], model, tokenizer):
        self.paths, self.model, self.tokenizer = paths, model, tokenizer
        self.documents: dict[str, Served] = {}
        self._stamps: dict[str, tuple[Path, float]] = {}

    def files(self) -> list[Path]:
        found = []
        for path in self.paths:
            found += sorted(path.glob("*.nectar")) if path.is_dir() else [path]
        return found

    def reload(self) -> dict:
        """Load new or changed artifacts, forget removed ones; a bad file is skipped with its reason."""
        seen, loaded, skipped = {}, [], []
        for path in tqdm(self.files(), desc="loading compiled documents", unit="doc", leave=False):
            name, stamp = path.stem, path.stat().st_mtime if path.exists() else 0.0
            if name in seen:
                skipped.append({"path": str(path), "reason": f"id '{name}' is taken by {seen[name]}"})
                continue
            seen[name] = path
            if self._stamps.get(name) == (path, stamp):
                continue
            try:
                artifact = Artifact.load(path)
                artifact.check_compatible(self.model, self.tokenizer)
            except NectarError as e:
                skipped.append({"path": str(path), "reason": str(e)})
                self.documents.pop(name, None)
                continue
            warning = useless_warning(artifact.manifest)
            if warning:
                log.warning("%s: %s", path, warning.removeprefix("[nectar] warning: "))
            self.documents[name], self._stamps[name] = Served.of(artifact, self.model), (path, stamp)
            loaded.append(name)
        removed = sorted(set(self.documents) - set(seen))
        for name in removed:
            del self.documents[name], self._stamps[name]
        for s in skipped:
            log.warning("skipped %s: %s", s["path"], s["reason"])
        return {"loaded": loaded, "skipped": skipped, "removed": removed, "documents": sorted(self.documents)}

    def created(self, name: str) -> int:
        return int(self._stamps[name][1])

    def get(self, name: str) -> Served:
        if name not in self.documents:
            raise ApiError(404, f"no compiled document '{name}'; this server has: {', '.join(sorted(self.documents))}",
                           code="model_not_found", param="model")
        return self.documents[name]


def create_app(engine: Engine, library: Library, config: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nectar", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=config.api_key, max_body=config.max_body)
    _handle_errors(app)
    window = engine.window

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": library.created(name),
                                            "owned_by": "nectar", "tokens": a.n} for name, a in
                                           sorted(library.documents.items())]}

    @app.post("/v1/reload")
    def reload():
        return library.reload()

    @app.get("/v1/stats")
    def stats():
        s = engine.stats
        return {"documents": len(library.documents), "active": len(engine.rows), "waiting": engine.waiting,
                "steps": s.steps, "prefills": s.prefills, "mean_batch": s.rows / max(1, s.steps),
                "largest_batch": s.largest}

    def admit(body: api.Sampling, artifact: Served, prompt: list[int], emit) -> Request:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = window - artifact.n - len(prompt)
        cap = body.answer_cap()
        if cap is not None and not 1 <= cap <= config.max_tokens:
            raise ApiError(400, f"max_tokens must be in 1..{config.max_tokens}, got {cap}", param="max_tokens")
        wanted = cap or min(config.max_tokens, room)
        if room < 1 or wanted > room:
            raise ApiError(400, f"the document's {artifact.n} tokens, the prompt's {len(prompt)} and {wanted} answer "
                           f"tokens pass the model's window of {window}: shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="messages")
        request = Request(artifact, prompt, wanted, emit, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=body.stops())
        engine.submit(request)
        return request

    async def run(body: api.Sampling, prompt_of, respond, chunk, kind: str):
        artifact = library.get(body.model)
        prompt = prompt_of(artifact)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = admit(body, artifact, prompt, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
        rid = api.new_id(kind)
        if body.stream:
            def chunks(delta: Delta) -> list[dict]:
                out = chunk(rid, body.model, delta)
                if delta.finish and (body.stream_options or {}).get("include_usage"):
                    out.append({**out[-1], "choices": [], "usage": api.usage(len(prompt), delta.tokens)})
                return out
            return StreamingResponse(_events(request, queue, chunks), media_type="text/event-stream")
        text, delta = [], Delta("", 0)
        while delta.finish is None:
            delta = await queue.get()
            text.append(delta.text)
        _raise_if_failed(delta)
        return respond(rid, body.model, "".join(text), delta.finish, len(prompt), delta.tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest):
        try:
            question = body.question()
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await run(body, lambda a: question_ids(engine.tokenizer, a.question_template, question),
                         api.chat_response, _chat_chunks, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest):
        return await run(body, lambda a: encode(engine.tokenizer, body.prompt), api.completion_response,
                         lambda rid, model, d: [api.completion_response(rid, model, d.text, d.finish, chunk=True)],
                         "cmpl")

    return app


def _chat_chunks(rid: str, model: str, delta: Delta) -> list[dict]:
    chunks = [api.chat_chunk(rid, model, {"role": "assistant", "content": ""})] if delta.tokens <= 1 else []
    if delta.text:
        chunks.append(api.chat_chunk(rid, model, {"content": delta.text}))
    if delta.finish:
        chunks.append(api.chat_chunk(rid, model, {}, delta.finish))
    return chunks


async def _events(request: Request, queue: asyncio.Queue, chunks):
    """Server-sent events of one streamed request; a client that leaves frees its row."""
    try:
        while True:
            delta = await queue.get()
            if delta.finish in ("error", "cancelled"):
                yield f"data: {json.dumps(api.error(delta.error or 'the server is shutting down', 'server_error'))}\n\n"
                break
            for body in chunks(delta):
                yield f"data: {json.dumps(body)}\n\n"
            if delta.finish:
                break
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True  # no-op once finished; frees the row if the client disconnected


def _raise_if_failed(delta: Delta) -> None:
    if delta.finish == "error":
        raise ApiError(500, delta.error or "decoding failed")
    if delta.finish == "cancelled":
        raise ApiError(503, "the server is shutting down")


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        return JSONResponse(api.error(f"{where + ': ' if where else ''}{first['msg']}", param=where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(api.error(str(e.detail)), status_code=e.status_code)


class _Guard:
    """ASGI middleware: the bearer token (when the server has one) and the body-size cap, checked before
    a body is read."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self._problem(dict(scope["headers"]), scope["method"])
            if problem is not None:
                await JSONResponse(api.error(problem[1], code=problem[2]), status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: dict, method: str) -> tuple[int, str, str] | None:
        # compare_digest: a plain != returns sooner the earlier a guess goes wrong, which leaks the key by timing.
        if self.api_key and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                    f"Bearer {self.api_key}".encode()):
            return 401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key"
        if method != "POST":
            return None
        length = headers.get(b"content-length", b"")
        if not length.isdigit():
            return 411, "send the body with a Content-Length header", "length_required"
        if int(length) > self.max_body:
            return 413, f"the body is {int(length)} bytes, over the cap of {self.max_body}", "body_too_large"
        return None


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, except that a stop asked for by SIGINT/SIGTERM ends in exit code 0: uvicorn
    would raise the signal again once it has shut down."""

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(model, tokenizer, paths: list[Path], config: ServeConfig) -> None:
    """Load every artifact under `paths`, then answer on config.host:config.port until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    library = Library(paths, model, tokenizer)
    report = library.reload()
    log.info("serving %d compiled document(s): %s", len(library.documents), ", ".join(report["documents"]) or "none "
             "yet (compile some into the folder, then POST /v1/reload)")
    app = create_app(Engine(model, tokenizer, config.max_batch), library, config)
    _Uvicorn(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                            timeout_graceful_shutdown=10)).run()
