"""`mlx-redrafter serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over the speculative engine.

    GET  /health               {"status": "ok", "active", "queued", ...}
    GET  /v1/models            the served model
    POST /v1/chat/completions  messages -> an answer (stream: server-sent events)
    POST /v1/completions       prompt -> a continuation

Why Starlette + uvicorn rather than the standard library's ThreadingHTTPServer (mlx-lm's): an ASGI
server tells the application the moment a client disconnects (an `http.disconnect` event), also
while its request waits in the queue or is being prefilled, where a thread-per-connection server
only finds out when a write fails; waiting clients cost a coroutine, not a thread; and the
generation stays on one worker thread that owns MLX (`serving.Worker`), fed by the event loop.
"""

import asyncio
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_api import ApiError, Reply, Served, error_body, parse_request
from .serving import Delta, Done, Failed, Job, Worker

MAX_BODY = 16 << 20  # bytes; a longer body is refused before it is read to the end
log = logging.getLogger("mlx_redrafter.serve")


class _AsciiJSON(JSONResponse):
    """Errors may quote the request, and JSON's escapes let a request carry a lone surrogate, which
    UTF-8 cannot encode: errors are sent as ASCII with escapes."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(e: ApiError, headers: Optional[dict] = None) -> JSONResponse:
    return _AsciiJSON(e.body(), status_code=e.status, headers=headers)


def _json_content_type(request: Request):
    """Only JSON bodies: a browser page may send a text/plain or form POST to this machine
    cross-origin without asking first (there is no authentication), never an application/json one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"send the body as JSON with the header Content-Type: application/json (got "
                            f"{ascii(kind) if kind else 'none'}; curl: -H 'Content-Type: application/json')")


def create_app(served: Served, worker: Worker, allowed_origins=()) -> Starlette:
    # one thread: some tokenizers are not safe to call from two threads at once (transformers 5.x)
    parsing = ThreadPoolExecutor(1, thread_name_prefix="mlx-redrafter-parse")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": served.id, **worker.status()})

    async def models(request: Request):
        return JSONResponse(served.listing())

    async def chat_completions(request: Request):
        return await _complete(request, True)

    async def completions(request: Request):
        return await _complete(request, False)

    async def _complete(request: Request, chat: bool):
        loop = asyncio.get_running_loop()
        try:
            _json_content_type(request)
            raw = await _body(request)
            # in a thread: tokenizing a long prompt takes seconds and would stall every client
            req = await loop.run_in_executor(parsing, parse_request, raw, chat, served)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            log.info("client disconnected while sending its request")
            return Response(status_code=400)  # nobody reads it
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        if not worker.submit(job):
            busy = ApiError(503, f"the server is busy: {worker.capacity} requests are already queued or running; "
                                 "retry later", None, "server_busy", "server_error")
            return error_response(busy, {"Retry-After": "1"})
        reply = Reply(req, served.id)
        if req.stream:
            return StreamingResponse(_sse(job, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, job, events, reply)

    async def not_found(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path} (see /v1/models, "
                        "/v1/chat/completions, /v1/completions, /health)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, message, kind=kind), exc.headers)  # 405: Allow

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    middleware = []
    if allowed_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


async def _body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _whole(request: Request, job: Job, events: asyncio.Queue, reply: Reply):
    """Collect the answer; a client that goes away meanwhile cancels it."""
    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(lambda task: task.cancelled() or job.cancel())  # stop the worker at once
    text = []
    try:
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Done):
                return JSONResponse(reply.whole("".join(text), event.finish_reason, event.usage, event.speculative))
            else:
                return error_response(ApiError(500, event.message, kind="server_error"))
    finally:
        watch.cancel()
        job.cancel()  # no-op once done; stops the worker if the client left


async def _disconnected(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client disconnected")


def _data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(job: Job, events: asyncio.Queue, reply: Reply):
    """Server-sent events; Starlette cancels this when the client disconnects, which cancels the job."""
    try:
        if reply.chat:
            yield _data(reply.chunk(role=True))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _data(reply.chunk(event.text))
                continue
            if isinstance(event, Done):
                yield _data(reply.chunk(finish=event.finish_reason, speculative=event.speculative))
                if reply.include_usage:
                    yield _data(reply.usage_chunk(event.usage))
            elif isinstance(event, Failed):
                yield _data(error_body(event.message, "server_error"))
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()


def serve(served: Served, worker: Worker, host: str, port: int, allowed_origins=(), log_level: str = "info"):
    """Run until interrupted (Ctrl-C)."""
    import uvicorn

    config = uvicorn.Config(create_app(served, worker, allowed_origins), host=host, port=port,
                            log_level=log_level.lower(), access_log=log_level.lower() == "debug",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    local = host in ("127.0.0.1", "localhost", "::1")
    print(f"serving {served.id} at http://{host}:{port}/v1 "
          + ("(this machine only; --host 0.0.0.0 listens on every interface)" if local
             else "(reachable from other machines: there is no authentication)"), file=sys.stderr, flush=True)
    server.run()


def check_port(host: str, port: int):
    """Refuse a host:port this process cannot listen on, before the model loads (OSError)."""
    import socket

    if not host.strip():
        raise OSError("--host is empty: give an address (127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None
