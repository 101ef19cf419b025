"""A local OpenAI-compatible HTTP server over the model: `qwen2-scratch serve`.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each streamed as
server-sent events with "stream": true, ending in `data: [DONE]`), GET /health.

One worker thread owns the model: requests queue in arrival order and generate one at a time,
and a request whose messages extend the previous conversation reuses the KV cache of the
prefix they share, as the chat does. A streaming client that goes away stops its generation at
the next token. Errors use OpenAI's format, {"error": {"message", "type", "param", "code"}},
and never carry a stack trace.
"""

import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import asyncio
import hmac
import ipaddress
import json
import math
import queue
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

import mlx.core as mx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import prompts
import weights

__all__ = ["Engine", "app", "listen", "serve", "ApiError", "exposure_warning", "MAX_BODY_BYTES", "DEFAULT_MAX_TOKENS"]

MAX_BODY_BYTES = 1 << 20  # a whole 32k-token context is ~130 KB of text; 1 MiB leaves room for JSON escapes
DEFAULT_MAX_TOKENS = 512  # when a request sets none, as the chat and mlx_lm.server
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def exposure_warning(host: str) -> str | None:
    """One warning line when host is not a loopback address (the API then answers the network)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"warning: listening on {host}, not 127.0.0.1: anyone who can reach this machine can use the API"
            " (set --api-key)")


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's format
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request that cannot be served; becomes {"error": {...}} with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------------------------------
# Reading a request: the same checks as the command line
# ---------------------------------------------------------------------------------------------


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def number(body: dict, name: str, default, low=-math.inf, high=math.inf, low_open=False, integer=False):
    """body[name] checked to lie in [low, high] (or (low, high]), finite; default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    bounds = f"{'(' if low_open else '['}{low}, {high}]"
    if not is_number(v) or (integer and not float(v).is_integer()):
        raise ApiError(400, f"{name} must be {'a whole number' if integer else 'a number'}, not {v!r}", name)
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
        raise ApiError(400, f"{name} must be finite and in {bounds}, not {v!r}", name)
    return int(v) if integer else float(v)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return stops


def generation_options(body: dict, defaults: dict) -> dict:
    """The request's sampling fields (the rest from defaults) -> Sampling, max_tokens, stop strings and seed."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: this server generates one choice per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):  # 0 is what many clients send: it means off
            raise ApiError(400, f"{name} is not supported (only 0); use repetition_penalty, a multiplicative "
                                f"penalty on recent tokens, instead", name)
    sampling = weights.sampling_for(
        defaults,
        temp=number(body, "temperature", None, low=0),
        top_p=number(body, "top_p", None, low=0, high=1, low_open=True),
        top_k=number(body, "top_k", None, low=0, integer=True),
        min_p=number(body, "min_p", None, low=0, high=1),
        repetition_penalty=number(body, "repetition_penalty", None, low=0, low_open=True),
    )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = number({name: max_tokens}, name, DEFAULT_MAX_TOKENS, low=1, integer=True)
    seed = number(body, "seed", None, low=0, high=2**63 - 1, integer=True)  # MLX seeds are unsigned
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    return {"sampling": sampling, "max_tokens": max_tokens, "stops": stop_strings(body), "seed": seed}


def message_text(content, param: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "content must be a string or a list of text parts", param)


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"each message needs a role, one of {', '.join(ROLES)}", f"messages[{i}].role")
        clean.append({"role": ROLES[m["role"]], "content": message_text(m.get("content"), f"messages[{i}].content")})
    return clean


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", "prompt")
    return prompt


# ---------------------------------------------------------------------------------------------
# Stop strings: hold back what may begin one, cut at the first
# ---------------------------------------------------------------------------------------------


class StopText:
    """Streams text with the stop strings cut out: text that may begin a stop string waits."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, segment: str) -> tuple[str, bool]:
        """The text safe to send now, and whether a stop string was reached."""
        text = self.pending + segment
        found = [i for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            self.pending = ""
            return text[: min(found)], True
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


# ---------------------------------------------------------------------------------------------
# The engine: the model, its prompt cache, and the one thread that runs it
# ---------------------------------------------------------------------------------------------


class Engine:
    """The model behind the API. One worker thread runs every generation, in arrival order.

    defaults: the sampling values a request does not set (weights.sampling_defaults: the model's
    generation_config.json), as Sampling's field names.
    """

    def __init__(self, params, config, tokenizer, name: str, defaults: dict, kernels="reference",
                 max_kv_size=None):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.name, self.defaults, self.kernels = name, defaults, kernels
        self.max_kv = max_kv_size or config.max_position_embeddings
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # FIFO: requests generate in arrival order
        self.closing = threading.Event()
        # a daemon thread that never ends: MLX aborts the process at exit when a thread that ran
        # async_eval has ended (measured with MLX 0.32.4: "terminate called without an active exception")
        threading.Thread(target=self.work, name="generate", daemon=True).start()
        # the KV cache of the tokens last run through the model, reused for a shared prefix as in the chat
        self.cache = q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        self.cached: list[int] = []
        mx.eval(params, self.cache)  # MLX streams are per thread: the worker must find nothing left to compute

    def work(self) -> None:
        while True:
            self.jobs.get()()

    def check_fits(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.max_kv:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, but the context holds {self.max_kv} "
                                "(and at least one token must be generated)", param, "context_length_exceeded")

    def run(self, ids: list[int], options: dict, emit, cancelled: threading.Event) -> dict | None:
        """On the worker thread: generate for ids, emit(text) as it comes; the finish reason and usage."""
        if cancelled.is_set() or self.closing.is_set():
            return None  # the client left while queued
        if options["seed"] is not None:
            mx.random.seed(options["seed"])
        reuse = min(q.common_prefix(self.cached, ids), len(ids) - 1)
        cache = {"layers": self.cache["layers"], "offset": mx.array(reuse)}
        report, stop, count, finish = {}, StopText(options["stops"]), 0, None
        detokenizer = self.tokenizer.detokenizer
        tokens = q.generate_tokens(self.params, self.config, ids[reuse:], cache, options["sampling"],
                                   options["max_tokens"], self.max_kv, frozenset(self.tokenizer.eos_token_ids),
                                   self.kernels, report)
        for token in tokens:
            count += 1
            detokenizer.add_token(token)
            text, hit = stop.feed(detokenizer.last_segment)
            if text:
                emit(text)
            if hit or cancelled.is_set() or self.closing.is_set():
                finish = "stop" if hit else "cancelled"
                break
        tokens.close()
        if finish is None:  # ran to its end: the report is complete and the cache can be kept
            detokenizer.finalize()
            text, hit = stop.feed(detokenizer.last_segment)
            emit(text if hit else text + stop.flush())
            finish = "stop" if hit or report["finish_reason"] == "stop" else "length"
            count = report["generation_tokens"]  # the end-of-sequence token included, as the stats line
            self.cache = report["cache"]
            self.cached = (ids + report["generated"])[: len(ids) + report["cached_new"]]
        return {"finish_reason": finish, "usage": {
            "prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count,
            "prompt_tokens_details": {"cached_tokens": reuse}}}

    async def generate(self, ids: list[int], options: dict, cancelled: threading.Event):
        """Yield the text pieces of one generation, then its result dict; queued behind earlier ones."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(text):
            if text:
                loop.call_soon_threadsafe(queue.put_nowait, text)

        def job():
            try:
                result = self.run(ids, options, emit, cancelled)
            except Exception as e:  # reaches the client as a one-line error, never a traceback
                result = e
            loop.call_soon_threadsafe(queue.put_nowait, result)

        self.jobs.put(job)
        try:
            while isinstance(item := await queue.get(), str):
                yield item
        finally:
            cancelled.set()  # the client left (or the stream ended): stop at the next token
        if isinstance(item, Exception):
            log(f"error: generation failed: {type(item).__name__}: {item}")
            raise ApiError(500, f"generation failed: {item}")
        if item is None:  # never started: the server is stopping
            raise ApiError(503, "the server is stopping")
        yield item

    def close(self) -> None:
        """Stop: a running generation ends at its next token, queued ones never start."""
        self.closing.set()


# ---------------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------------


async def read_json(request) -> dict:
    """The request body as a JSON object, at most MAX_BODY_BYTES long."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None, "request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def check_model(engine: Engine, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != engine.name:
        raise ApiError(404, f"no model {model!r}: this server serves {engine.name!r} (GET /v1/models)", "model",
                       "model_not_found")


def check_key(request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no timing hint at the key
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key")


def endpoint(handler, api_key, engine):
    """Key check, OpenAI-format errors, and no stack trace in any response."""
    async def wrapped(request):
        try:
            check_key(request, api_key)
            return await handler(request, engine)
        except ApiError as e:
            return e.response()
        except Exception as e:
            log(f"error: {request.url.path}: {type(e).__name__}: {e}")
            return ApiError(500, f"internal error: {type(e).__name__}").response()
    return wrapped


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generation stops when the response ends, the client gone or not."""

    def __init__(self, events, cancelled: threading.Event):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancelled = cancelled

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancelled.set()


async def respond(engine, body, ids, options, chunk, final):
    """Stream or collect one generation; chunk(text, finish) and final(text, result) shape the JSON."""
    cancelled = threading.Event()
    pieces = engine.generate(ids, options, cancelled)

    async def events():
        try:
            async for item in pieces:
                if isinstance(item, str):
                    yield sse(chunk(item, None))
                else:
                    yield sse(chunk("", item["finish_reason"]))
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield sse({**chunk("", None), "choices": [], "usage": item["usage"]})
        except ApiError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    if body.get("stream"):
        return EventStream(events(), cancelled)
    text = []
    async for item in pieces:
        if isinstance(item, str):
            text.append(item)
        else:
            return JSONResponse(final("".join(text), item))


def envelope(engine, kind):
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": engine.name}


async def chat_completions(request, engine: Engine):
    body = await read_json(request)
    check_model(engine, body)
    messages, options = chat_messages(body), generation_options(body, engine.defaults)
    try:
        ids = prompts.encode_chat(engine.tokenizer, messages)
    except prompts.PromptError as e:  # the template is missing, refused the messages or ran past its limits
        raise ApiError(400, str(e), "messages") from None
    engine.check_fits(ids, "messages")
    head = envelope(engine, "chat")
    sent_role = []

    def chunk(text, finish):
        delta = {"content": text} if text or finish is None else {}
        if not sent_role:  # the first chunk names the role, as OpenAI's do
            sent_role.append(True)
            delta = {"role": "assistant", **delta}
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def final(text, result):
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": result["finish_reason"]}],
                "usage": result["usage"]}

    return await respond(engine, body, ids, options, chunk, final)


async def completions(request, engine: Engine):
    body = await read_json(request)
    check_model(engine, body)
    prompt, options = completion_prompt(body), generation_options(body, engine.defaults)
    ids = prompts.encode_text(engine.tokenizer, prompt)
    engine.check_fits(ids, "prompt")
    head = envelope(engine, "text")

    def chunk(text, finish):
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def final(text, result):
        return {**chunk(text, result["finish_reason"]), "usage": result["usage"]}

    return await respond(engine, body, ids, options, chunk, final)


async def models(request, engine: Engine):
    return JSONResponse({"object": "list", "data": [
        {"id": engine.name, "object": "model", "created": int(time.time()), "owned_by": "qwen2-scratch"}]})


async def health(request, engine: Engine):
    return JSONResponse({"status": "ok"})


async def http_error(request, exc: HTTPException):
    """Starlette's own errors (unknown route, wrong method) in OpenAI's format."""
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()


def app(engine: Engine, api_key: str | None = None) -> Starlette:
    """The ASGI application over engine; /health answers without the key."""
    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()  # stop a running generation at its next token when the server stops

    routes = [
        Route("/v1/models", endpoint(models, api_key, engine), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions, api_key, engine), methods=["POST"]),
        Route("/v1/completions", endpoint(completions, api_key, engine), methods=["POST"]),
        Route("/health", endpoint(health, None, engine), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(engine: Engine, sock: socket.socket, api_key: str | None = None) -> None:
    """Answer on sock until Ctrl-C; uvicorn's own logging only for warnings and errors."""
    config = uvicorn.Config(app(engine, api_key), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: stopping is the normal end
        pass
