"""`nextmm serve`: the model behind OpenAI's API (FastAPI + uvicorn), its requests decoded in batches (batching.py).

- `POST /v1/chat/completions`: messages with text and `image_url` parts (schema.py); greedy decoding, so sampling
  fields (temperature, top_p, ...) are accepted and ignored. A reply that draws carries the picture as an
  `image_url` part with a PNG data URL: the non-streamed message's content is then a list of parts (text, then the
  pictures); a stream sends it as a chunk of its own whose `delta.content` is that list, after the text and before
  the chunk with `finish_reason`. A model without a visual decoder that begins a drawing says so in one sentence
  at the end of its text. A reply cut short by the server's time limit ends as if by max_tokens
  (finish_reason "length").
- `POST /v1/images/generations`: `n` drawings of a text prompt, as `b64_json` PNGs at the model's own size.
- `GET /v1/models`, `GET /health` (no key needed; with the batcher's counts), and `GET /` the web page
  (static/index.html) when there is one.
Every refusal is OpenAI's error body with one sentence, and the server goes on serving the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nextmm.chat import ContextFull
from nextmm.errors import UserError
from nextmm.serve.batching import Batcher, Job, QueueTimeout
from nextmm.serve.schema import (
    ApiError, ChatRequest, ImagesRequest, Limits, chunk, completion, finish_reason, image_part, max_new_tokens, new_id,
    parse, png_base64, to_messages, usage,
)

STATIC = Path(__file__).parent / "static"
# The worker stops a reply at its deadline between two decoding steps; a handler gives up on its job this much later,
# for work the worker cannot cut (a long prompt's prefill, a drawing).
GRACE_S = 5.0
POLL_S = 0.5  # how often a non-streamed request looks whether its client is still there
NO_DECODER = "(This model has no visual decoder, so it cannot draw the picture it began.)"


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)


def create_app(m, settings: Settings) -> FastAPI:
    """The server's app around a loaded model (`nextmm.load`); its worker thread runs while the app does."""
    batcher = Batcher(m, settings.max_batch, settings.batch_wait_ms / 1000)
    limits, name = settings.limits, settings.model_name

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="nextmm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def refused(_request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, err: StarletteHTTPException):
        message = f"there is no {request.method} {request.url.path} on this server; the API is under /v1 (GET /v1/models lists the model)"
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def failed(_request, err: Exception):  # a bug, answered in OpenAI's shape too (uvicorn logs its traceback)
        return JSONResponse(ApiError(500, f"the server failed on this request ({type(err).__name__}: {err})").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "this server needs an API key; send it as the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "the API key is wrong; send the key the server was started with (--api-key or NEXTMM_API_KEY)", code="invalid_api_key")

    def check_model(asked: str | None) -> None:
        if asked != name:
            raise ApiError(404, f"the model '{asked}' does not exist on this server, which serves '{name}'; ask for that one", code="model_not_found", param="model")

    def card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nextmm"}

    def deadline() -> float:
        return time.monotonic() + limits.timeout_s

    async def follow(job: Job, request: Request | None = None):
        """The job's items as they come, up to its closing one; ends early when the client of a non-streamed
        request (`request`) goes away."""
        while True:
            left = job.deadline + GRACE_S - time.monotonic()
            if left <= 0:
                job.cancelled = True
                raise ApiError(504, f"the request took longer than this server's limit of {limits.timeout_s:g} s; ask for less or try again when it is less busy", code="timeout")
            try:
                kind, value = await asyncio.wait_for(job.items.get(), min(left, POLL_S) if request is not None else left)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancelled = True
                    return
                continue
            if kind == "error":
                raise as_api_error(value)
            yield kind, value
            if kind != "event" or value.kind == "end":
                return

    def as_api_error(err: Exception) -> ApiError:
        if isinstance(err, ApiError):
            return err
        if isinstance(err, QueueTimeout):
            return ApiError(504, f"the request waited longer than this server's limit of {limits.timeout_s:g} s for the model; try again when it is less busy", code="timeout")
        if isinstance(err, UserError):
            return ApiError(400, str(err), code="context_length_exceeded" if isinstance(err, ContextFull) else None)
        return ApiError(500, f"the model failed on this request ({type(err).__name__}: {err}); the server goes on serving others")

    def prompt_tokens(messages: list, wanted: int) -> int:
        """The prompt's length, checked against the model's context before the request is queued."""
        try:
            return m.prompt_tokens(messages, wanted)
        except UserError as err:
            raise as_api_error(err) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse(ChatRequest, await read_json(request, limits.max_body_bytes))
        check_model(req.model)
        if req.n != 1:
            raise ApiError(400, f"n is {req.n} but this server writes one choice per chat request; send n=1 or leave it out", param="n")
        wanted = max_new_tokens(req, limits)
        messages = await run_in_threadpool(to_messages, req.messages, limits)
        length = await run_in_threadpool(prompt_tokens, messages, wanted)
        job = Job("chat", messages, deadline(), asyncio.get_running_loop(), wanted)
        batcher.submit(job)
        id_ = new_id()
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return JobStream(job, stream(job, id_, length, include_usage))
        reply = Gathered()
        async for kind, value in follow(job, request):
            reply.add(kind, value)
        return completion(id_, name, reply.text + reply.note(m), reply.images, reply.reason, length, reply.tokens)

    async def stream(job: Job, id_: str, prompt_tokens: int, include_usage: bool):
        def sse(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        yield sse(chunk(id_, name, {"role": "assistant", "content": ""}))
        reply = Gathered()
        try:
            async for kind, value in follow(job):
                reply.add(kind, value)
                if kind == "event" and value.kind == "text" and value.text:
                    yield sse(chunk(id_, name, {"content": value.text}))
            if reply.note(m):
                yield sse(chunk(id_, name, {"content": reply.note(m)}))
            for image in reply.images:
                yield sse(chunk(id_, name, {"content": [image_part(image)]}))
            yield sse(chunk(id_, name, {}, finish_reason(reply.reason)))
            if include_usage:
                yield sse(chunk(id_, name, None, usage_=usage(prompt_tokens, reply.tokens)))
        except ApiError as err:  # the response has begun: the error is an event of the stream, as OpenAI sends one
            yield sse(err.body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        authorize(request)
        req = parse(ImagesRequest, await read_json(request, limits.max_body_bytes))
        if req.model is not None:
            check_model(req.model)
        side = m.config.decoder.image_size
        size = f"{side}x{side}"
        if m.decoder is None:
            raise ApiError(400, "this model has no visual decoder, so it draws no images; serve a model directory with a decoder/ folder")
        if not req.prompt.strip():
            raise ApiError(400, "the prompt is empty; say what to draw", param="prompt")
        if not 1 <= req.n <= limits.max_images:
            raise ApiError(400, f"n is {req.n}; this server draws from 1 to {limits.max_images} images per request", param="n")
        if req.size not in (None, "auto", size):
            raise ApiError(400, f"this model draws {size} images only; ask for size {size} or leave size out", param="size")
        if req.response_format not in (None, "b64_json"):
            raise ApiError(400, "this server returns images inline only; ask for response_format b64_json or leave it out", param="response_format")
        job = Job("draw", [req.prompt] * req.n, deadline(), asyncio.get_running_loop())
        batcher.submit(job)
        drawn = []
        async for kind, value in follow(job, request):
            if kind == "images":
                drawn = value
        encoded = await run_in_threadpool(lambda: [png_base64(image) for image in drawn])
        return {"created": int(time.time()), "data": [{"b64_json": b64} for b64 in encoded], "size": size, "output_format": "png"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str, request: Request):
        authorize(request)
        check_model(model)
        return card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "batches": batcher.batches, "requests": batcher.requests,
                "largest_batch": batcher.largest_batch, "stopped": batcher.stopped, "queued": batcher.queued}

    @app.get("/")
    async def page():
        if not (STATIC / "index.html").is_file():
            raise ApiError(404, "this nextmm has no web page (serve/static/index.html); use the API under /v1")
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Gathered:
    """A reply put together from its job's items: the "end" event's Reply when it came, else what was streamed
    before the row was stopped."""

    def __init__(self):
        self.texts: list[str] = []
        self.streamed_images: list = []
        self.reply = None

    def add(self, kind: str, value) -> None:
        if kind != "event":
            return
        if value.kind == "text":
            self.texts.append(value.text)
        elif value.kind == "image":
            self.streamed_images.append(value.image)
        elif value.kind == "end":
            self.reply = value.reply

    @property
    def text(self) -> str:
        return self.reply.text if self.reply is not None else "".join(self.texts)

    @property
    def images(self) -> list:
        return list(self.reply.images) if self.reply is not None else self.streamed_images

    @property
    def reason(self) -> str:
        return self.reply.finish_reason if self.reply is not None else "length"  # stopped by the time limit

    @property
    def tokens(self) -> int:
        return self.reply.completion_tokens if self.reply is not None else len(self.texts)

    def note(self, m) -> str:
        """What a model without a decoder says when it begins a drawing it cannot make."""
        drew_nothing = self.reply is not None and self.reply.finish_reason == "image" and not self.reply.images
        return (" " + NO_DECODER if self.text else NO_DECODER) if drew_nothing and m.decoder is None else ""


class JobStream(StreamingResponse):
    """Server-sent events whose job is cancelled when the response ends, however it ends: a client that goes away
    mid-stream has its row stopped at once."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


async def read_json(request: Request, limit: int):
    """The request body as JSON, refused (413) when it is longer than `limit` bytes. A body up to twice the limit is
    read to its end (and dropped), so that a client still sending it gets the 413 rather than a reset connection."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 2 * limit:
        raise _body_too_large(limit)
    body, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            body += part
        elif size > 2 * limit:
            break
    if size > limit:
        raise _body_too_large(limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object") from None


def _body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MiB; send smaller images or fewer of them", code="request_too_large")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the address is known and checked before the server
    starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None
    sock.listen(2048)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(m, settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `m` until interrupted; prints where it listens."""
    import uvicorn

    sock = listen(host, port)
    print(f"nextmm: serving '{settings.model_name}' at {address(sock)}/v1 (OpenAI's API; web page at {address(sock)}/)", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(m, settings), log_level=log_level)).run(sockets=[sock])
