"""OpenAI-compatible HTTP server (`selfspec serve`): /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events when asked), /health and /metrics, and the
playground page at / (selfspec/server/static/). Stream chunks carry which tokens were accepted drafts in
the extension field `selfspec` (selfspec/draftview.py).

One worker thread runs every generation in arrival order: the model and its KV cache are not
thread-safe, and on a CPU two generations at once would only share the same cores. It is fed by a
bounded queue; a full queue answers 429 with Retry-After. Handlers parse, validate and tokenise
before queueing, so a bad request is refused at once, never after waiting its turn; the worker
only decodes. A client that disconnects, or a request older than --request-timeout, sets its job's
cancel flag and the worker drops that generation at the end of the current round.

The wire format (schemas, bodies, error object) is in `selfspec/server/api.py`; status codes
are OpenAI's, so OpenAI clients handle our errors as they handle theirs.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources

from selfspec.errors import require_extra

require_extra("server", "fastapi", "uvicorn", "prometheus_client", what="selfspec serve")

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfspec.errors import InvalidParameterError, SelfspecError  # noqa: E402 (after the extra's check)
from selfspec.generation import Generation, GenerationResult, stream
from selfspec.drafters.base import declared
from selfspec.drafters.factory import ALIASES, build_drafter
from selfspec.prefix import PrefixCache
from selfspec.sampling import SamplingParams
from selfspec.server.api import ApiError, ChatRequest, CompletionRequest, Reply, parse_request, usage_of
from selfspec.server.worker import POLL_SECONDS, Job, Metrics, Worker

log = logging.getLogger("selfspec.server.app")

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # the name clients pass as "model"
    api_key: str | None = None
    max_queue: int = 8  # requests waiting for the worker (the one decoding is not counted)
    request_timeout: float = 300.0  # seconds from arrival to the last token, queueing included
    max_body: int = 1 << 20
    defaults: SamplingParams = field(default_factory=SamplingParams)  # for parameters a request omits
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
    # Drafters a request may pick with `"selfspec": {"draft": NAME}` besides the server's own, built
    # on first use with `build_drafter(NAME, model, **draft_options)`.
    draft_choices: tuple[str, ...] = ()
    draft_options: dict = field(default_factory=dict)
    # Copies of earlier sequences' KV kept for prompt-prefix reuse (selfspec/prefix.py), least
    # recently used dropped first; the live KV cache is reused on top. 0 turns prefix reuse off.
    prefix_cache_mb: int = 512
    # Origins (scheme://host[:port], or "*") of web pages that may call /v1 besides the server's
    # own (the playground); a request with any other Origin header gets 403. Requests without an
    # Origin header (curl, SDKs, scripts) are not browsers' cross-site requests: always allowed.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for origin in self.cors_origins:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
                raise InvalidParameterError(f"--cors-origin must be an origin such as http://localhost:3000 "
                                            f"(scheme://host[:port], no path) or *, got {origin!r}")
        if self.max_queue < 1:
            raise InvalidParameterError(f"--max-queue must be >= 1, got {self.max_queue}")
        if not self.request_timeout > 0:
            raise InvalidParameterError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if self.prefix_cache_mb < 0:
            raise InvalidParameterError(f"--prefix-cache-mb must be >= 0 (0 turns prefix reuse off), "
                                        f"got {self.prefix_cache_mb}")
        if self.max_body < 1:
            raise InvalidParameterError(f"--max-body must be >= 1 byte, got {self.max_body}")


# ---------------------------------------------------------------------------------------- the app
class Server:
    """Routes and their state: the model, the shared drafter, the worker and the metrics.

    One drafter serves every request: each drafter's `reset()` (called by the decode loop at the
    start of every generation) clears its per-sequence state; what carries over is adaptive state
    meant to carry over (layer-skip's draft-exit threshold, as in Draft & Verify's evaluation) and
    what is expensive to rebuild (a draft model and its cache, layer-skip's int8 weights)."""

    def __init__(self, model, drafter, settings: ServerSettings) -> None:
        self.model = model
        self.drafter = drafter
        self.settings = settings
        self.drafters = {getattr(drafter, "name", "none") if drafter is not None else "none": drafter}
        self._drafters_lock = threading.Lock()
        self.metrics = Metrics(lambda: self.worker.jobs.qsize())
        self.worker = Worker(settings.max_queue, self.metrics)
        self.started = int(time.time())
        # Used by the worker thread only (the decode loop), one generation at a time.
        self.prefix = PrefixCache(model, settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else None

    # ----------------------------------------------------------------- request -> generation
    async def read_body(self, request: Request) -> object:
        limit = self.settings.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                raise _too_large(limit)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # e.g. 200k nested `[`: a client's fault, not ours
            raise ApiError(400, "the request body is not valid JSON: it is nested too deeply",
                           code="invalid_json") from None

    def check_model(self, name: str) -> None:
        if name != self.settings.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.settings.model_id!r} (see /v1/models)", param="model", code="model_not_found")

    def prepare(self, req, chat: bool) -> Generation:
        """Tokenise and check a validated request (runs in a thread pool: tokenising is CPU work)."""
        model, settings = self.model, self.settings
        param = "messages" if chat else "prompt"
        try:
            sampling = req.sampling(settings.defaults)
            if chat:
                if not model.has_chat_template:
                    raise ApiError(400, f"model {settings.model_id!r} has no chat template; use /v1/completions",
                                   param="messages")
                ids = model.encode_messages([m.as_template_dict() for m in req.messages])
            else:
                prompt = req.text_or_ids()
                ids = model.encode(prompt, chat=False) if isinstance(prompt, str) else prompt
        except ApiError:
            raise
        except SelfspecError as e:
            raise ApiError(400, str(e), param=_param_of(str(e), param)) from None
        except Exception as e:  # e.g. a chat template that refuses the conversation (roles out of order)
            what = "apply the model's chat template" if chat else "tokenise the prompt"
            raise ApiError(400, f"cannot {what}: {type(e).__name__}: {e}", param=param) from None
        if not ids:
            raise ApiError(400, f"the {param} is empty; give at least one token of text", param=param)
        room = model.ctx_size - len(ids)
        wanted = req.requested_tokens
        if room < 1:  # whatever max_tokens is (or is not) given
            raise ApiError(400, f"the {param} {'are' if chat else 'is'} {len(ids)} tokens, but the model's context is {model.ctx_size} "
                                f"tokens and must leave room for at least 1 new token; shorten the {param} "
                                f"to at most {model.ctx_size - 1} tokens", param=param, code="context_length_exceeded")
        if wanted is None:
            wanted = settings.completion_max_tokens if not chat else room
            if wanted > room:  # the default of /v1/completions: what fits
                wanted = room
        if wanted > room:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise ApiError(400, f"this request needs {len(ids)} prompt tokens + {name} {wanted} (as sent) = "
                                f"{len(ids) + wanted} tokens, but the model's context is {model.ctx_size} "
                                f"tokens: at most {room} new tokens fit after this {param}; lower {name} "
                                f"or shorten the {param}", param=name, code="context_length_exceeded")
        drafter = self.drafter_for(req.selfspec.draft if req.selfspec is not None else None)
        try:
            return stream(model, ids, drafter=drafter, sampling=sampling, max_new_tokens=wanted,
                          stop=req.stops, ignore_eos=req.ignore_eos, prefix=self.prefix)
        except SelfspecError as e:
            raise ApiError(400, str(e), param=_param_of(str(e), param)) from None

    @property
    def draft_choices(self) -> list[str]:
        return list(dict.fromkeys([*self.drafters, *self.settings.draft_choices]))

    def drafter_for(self, name: str | None):
        """The drafter a request asked for (None: the server's own)."""
        if name is None:
            return self.drafter
        name = ALIASES.get(name, name)
        with self._drafters_lock:
            if name not in self.drafters:
                if name not in self.settings.draft_choices:
                    raise ApiError(400, f"the drafter {name!r} is not available on this server; choose one of "
                                        f"{', '.join(self.draft_choices)}", param="selfspec.draft",
                                   code="invalid_value")
                self.drafters[name] = None if name == "none" else _BuiltOnFirstUse(
                    name, partial(build_drafter, name, self.model, **self.settings.draft_options))
            return self.drafters[name]

    # ----------------------------------------------------------------------- the two endpoints
    async def generate(self, request: Request, chat: bool) -> Response:
        deadline = time.monotonic() + self.settings.request_timeout
        req = parse_request(ChatRequest if chat else CompletionRequest, await self.read_body(request))
        self.check_model(req.model)
        gen = await run_in_threadpool(self.prepare, req, chat)
        job = Job(gen, asyncio.get_running_loop(), self.metrics)
        self.worker.submit(job)
        reply = Reply(chat, self.settings.model_id)
        try:
            # Errors before the first token are real HTTP errors, also when streaming.
            event = await self._next_event(job, request, deadline)
            if req.stream and event[0] != "error":
                return StreamingResponse(self._sse(job, request, reply, req, event, deadline),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while event[0] == "text":
                event = await self._next_event(job, request, deadline)
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except BaseException:  # timeout (already cancelled), or the server is stopping
            job.cancel("shutdown")
            raise
        job.finished = True
        if event[0] == "error":
            raise event[1]
        result: GenerationResult = event[1]
        stats = self._stats(job, result, request)
        return JSONResponse(reply.full(result.text, result.finish_reason, _usage(result), stats))

    async def _sse(self, job: Job, request: Request, reply: Reply, req, first, deadline: float):
        event = first
        try:
            if reply.chat:
                yield _sse(reply.chunk("", first=True))
            while True:
                kind, payload = event
                if kind == "text":
                    text, extension = payload
                    yield _sse({**reply.chunk(text), "selfspec": extension})
                elif kind == "error":
                    job.finished = True
                    request.state.selfspec_error = payload.message
                    yield _sse(payload.body())
                    break
                else:
                    job.finished = True
                    chunk = reply.chunk(None if reply.chat else "", payload.finish_reason)
                    chunk["selfspec"] = self._stats(job, payload, request)
                    if req.include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                    if req.include_usage:
                        yield _sse(reply.usage_chunk(_usage(payload)))
                    break
                try:  # disconnects: Starlette cancels this generator (the finally below)
                    event = await self._next_event(job, None, deadline)
                except ApiError as e:  # timed out mid-stream: the status line is long gone
                    event = ("error", e)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel("disconnect")  # a no-op once finished

    async def _next_event(self, job: Job, request: Request | None, deadline: float):
        """The job's next event; on the way, every POLL_SECONDS, whether its client is still there
        (`request`; None while streaming, where Starlette notices) and within its deadline."""
        while True:
            now = time.monotonic()
            if now > deadline:
                job.cancel("timeout")
                raise ApiError(504, f"the request did not finish within the server's --request-timeout of "
                                    f"{self.settings.request_timeout:g} s", type="timeout_error",
                               code="request_timeout")
            if request is not None and now >= job.next_check:
                job.next_check = now + POLL_SECONDS
                if await request.is_disconnected():
                    job.cancel("disconnect")
                    raise _ClientGone
            try:
                return await asyncio.wait_for(job.events.get(), min(POLL_SECONDS, deadline - now))
            except asyncio.TimeoutError:
                pass

    def _stats(self, job: Job, result: GenerationResult, request: Request) -> dict:
        stats = result.stats.to_dict()
        stats["queue_seconds"] = round((job.started or job.created) - job.created, 4)
        request.state.selfspec = stats  # for the request's log line
        return stats

    # -------------------------------------------------------------------------------- the app
    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app):
            self.worker.start()
            try:
                yield
            finally:
                self.worker.stop()

        app = FastAPI(title="selfspec", lifespan=lifespan, docs_url=None, redoc_url=None)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self.guard)])

        @v1.get("/models")
        async def list_models():
            return {"object": "list", "data": [self._model_card()]}

        @v1.get("/models/{model_id:path}")
        async def get_model(model_id: str):
            self.check_model(model_id)
            return self._model_card()

        @v1.post("/completions")
        async def completions(request: Request):
            return await self.generate(request, chat=False)

        @v1.post("/chat/completions")
        async def chat_completions(request: Request):
            return await self.generate(request, chat=True)

        @app.get("/", include_in_schema=False)
        async def playground():
            return HTMLResponse(_static("index.html"), headers=_STATIC_HEADERS)

        @app.get("/static/{name}", include_in_schema=False)
        async def static(name: str):
            if name not in _STATIC_TYPES:
                raise StarletteHTTPException(404)
            return Response(_static(name), media_type=_STATIC_TYPES[name], headers=_STATIC_HEADERS)

        @app.get("/health")
        async def health():
            ok = self.worker.alive
            body = {"status": "ok" if ok else "worker stopped", "model": self.settings.model_id,
                    "queue_depth": self.worker.jobs.qsize(), "busy": self.worker.current is not None}
            return JSONResponse(body, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        app.include_router(v1)
        app.add_exception_handler(ApiError, _api_error)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        if self.settings.cors_origins:  # answers preflights and lets the allowed pages read replies
            from starlette.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.settings.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        app.add_middleware(RequestLog, metrics=self.metrics)
        return app

    def guard(self, request: Request) -> None:
        """Every /v1 request, in CONVENTIONS' order (the size and the body come after, in
        read_body): the origin, the API key, then a POST's content type."""
        self.check_origin(request)
        self.authorize(request)
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', "
                                    f"got {kind or 'no Content-Type'!r}", code="unsupported_media_type")

    def check_origin(self, request: Request) -> None:
        """A browser names the page that sent a request in `Origin`: the server's own page (the
        playground) and --cors-origin ones may call the API; any other web page may not (it could
        not read the answers, but it could fill the queue and burn the CPU)."""
        origin = request.headers.get("origin")
        if origin is None:
            return
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        allowed = self.settings.cors_origins
        if origin.rstrip("/") == own or "*" in allowed or origin.rstrip("/") in allowed:
            return
        raise ApiError(403, f"requests from the web page origin {origin!r} are not allowed; start the server with "
                            f"--cors-origin {origin} to allow them", code="origin_not_allowed")

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                "with the key the server was started with", code="invalid_api_key")

    def _model_card(self) -> dict:
        return {"id": self.settings.model_id, "object": "model", "created": self.started, "owned_by": "selfspec",
                "context_length": self.model.ctx_size, "draft": getattr(self.drafter, "name", "none"),
                "drafts": self.draft_choices}


class _BuiltOnFirstUse:
    """A drafter that a request chose, built when its first generation starts (`reset`, called by
    the decode loop): in the worker thread, because building `auto` times forward passes of the
    model (on a cache of its own), which the worker may be running while a request is being prepared."""

    def __init__(self, name: str, build) -> None:
        self.name, self._build, self._drafter = name, build, None

    def reset(self) -> None:
        if self._drafter is None:
            self._drafter = self._build()
        self._drafter.reset()

    def propose(self, ctx, max_tokens):
        return self._drafter.propose(ctx, max_tokens)

    def update(self, accepted: int, proposed: int) -> None:
        self._drafter.update(accepted, proposed)

    def extra_stats(self) -> dict:
        return self._drafter.extra_stats() if self._drafter is not None else {}

    # The optional members of the Drafter protocol, the built drafter's (defaults before it is built).
    @property
    def wants_hidden(self) -> bool:
        return declared(self._drafter, "wants_hidden")

    @property
    def last_level(self) -> int | None:
        return declared(self._drafter, "last_level")

    @property
    def costs(self):
        return declared(self._drafter, "costs")


# The playground (`/`): static files shipped as package data, no build step, nothing fetched from
# elsewhere (the policy below forbids it, so the page works offline).
_STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
                 "playground.css": "text/css; charset=utf-8"}
_STATIC_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                              "frame-ancestors 'none'",
                   "Cache-Control": "no-cache"}


def _static(name: str) -> str:
    return resources.files("selfspec.server").joinpath("static", name).read_text(encoding="utf-8")


class _ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


_EVERY_RESPONSE = [(b"x-content-type-options", b"nosniff")]  # no content sniffing, on every response


class RequestLog:
    """ASGI middleware: per-request metrics and one log line (with speculation stats when a
    generation finished), written when the response is complete, streamed ones included."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *_EVERY_RESPONSE]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if endpoint not in ("/health", "/metrics"):
                state = scope.get("state", {})
                error = f" error: {state['selfspec_error']}" if "selfspec_error" in state else ""
                log.info("%s %s %d %.2fs%s%s", scope["method"], path, status[0], seconds,
                         _stats_line(state.get("selfspec")), error)


def _stats_line(s: dict | None) -> str:
    if not s:
        return ""
    line = (f" prompt={s['prompt_tokens']} new={s['new_tokens']} {s['tokens_per_s']:.1f} tok/s "
            f"prefill={s['prefill_seconds']:.2f}s queued={s['queue_seconds']:.2f}s draft={s['drafter']}")
    if s["drafter"] != "none":
        line += (f" tau={s['mean_accepted_tokens']:.2f} accepted={s['accepted']}/{s['drafted']}"
                 f" ({100 * s['acceptance_rate']:.0f}%)")
    return line


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(result: GenerationResult) -> dict:
    return usage_of(len(result.prompt_ids), len(result.token_ids))


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's --max-body of {limit} bytes",
                    code="request_too_large")


def _param_of(message: str, default: str) -> str:
    """The parameter a library error message names (they start with it), else `default`."""
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_new_tokens"):
        if message.startswith(name):
            return "max_tokens" if name == "max_new_tokens" else name
    return default


async def _api_error(request, e: ApiError):
    if request is not None:
        request.state.selfspec_error = e.message  # for the request's log line
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _validation_error(_request, e: RequestValidationError):
    err = (e.errors() or [{}])[0]
    param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
    return await _api_error(_request, ApiError(400, f"invalid request: {err.get('msg', e)}", param=param))


async def _http_error(request, e: StarletteHTTPException):
    where = f"{request.method} {request.url.path}"
    message = {404: f"no such endpoint: {where}", 405: f"method not allowed: {where}"}.get(e.status_code, str(e.detail))
    return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


async def _internal_error(_request, e: Exception):
    # Starlette re-raises the exception after this answer, so uvicorn logs the traceback.
    return JSONResponse(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error").body(),
                        status_code=500, headers={k.decode(): v.decode() for k, v in _EVERY_RESPONSE})


def create_app(model, drafter=None, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app serving `model` (a loaded `Model`), drafting with `drafter` (None: plain
    decoding). Run it with uvicorn; the worker thread starts and stops with the app's lifespan."""
    return Server(model, drafter, settings or ServerSettings(model_id=model.name)).app()


def choosable_drafts(model, skip_config=None) -> tuple[str, ...]:
    """Drafters a request may pick on `selfspec serve`, besides the server's own: plain decoding,
    prompt lookup, `auto` (with the server's drafter flags: a draft model only when the server was
    started with one), and layer-skip where a skip config is given or ships for the model. `model`
    and `quantized` are offered only as the server's own drafter: each keeps a second set of weights."""
    from selfspec.drafters.layerskip import shipped_config

    layer_skip = skip_config is not None or shipped_config(model.name) is not None
    return ("none", "ngram", "auto") + (("layer-skip",) if layer_skip else ())


def warm_up(model, drafter) -> None:
    """The first forward passes pay one-off kernel set-up; pay it before the first client does."""
    from selfspec.progress import Bar

    prompt = model.encode("Hello", chat=False) or [0]
    n = min(4, model.ctx_size - len(prompt))
    with Bar(f"warming up (draft {getattr(drafter, 'name', 'none')}; the first passes set up kernels)", n) as bar:
        for _ in stream(model, prompt, drafter=drafter, max_new_tokens=n):
            bar.advance()


def log_to_stderr() -> None:
    """selfspec's log lines (INFO and up) on stderr while serving, unless the program already
    configured logging; only selfspec's loggers, never the process's root logger."""
    ours = logging.getLogger("selfspec")
    if logging.getLogger().handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def run(model, drafter, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    log_to_stderr()
    app = create_app(model, drafter, settings)
    log.info("serving %s (draft %s, ctx %d) on http://%s:%d/v1%s", settings.model_id,
             getattr(drafter, "name", "none"), model.ctx_size, host, port,
             " (API key required)" if settings.api_key else "")
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5)
