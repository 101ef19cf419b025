"""A local OpenAI-compatible HTTP server over the model: `qwen2-scratch serve`.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each streamed as
server-sent events with "stream": true, ending in `data: [DONE]`), POST /tokenize and
/detokenize (llama-server's shapes), GET /metrics (Prometheus), GET /health.

One worker thread steps the generation engine (engine.py): up to --parallel requests decode
together in one batch, the rest wait in arrival order, and every request reuses the prompt
cache's keys and values of any earlier prompt it starts with (sent with the same API key). A
client that goes away, streaming or not, frees its row at the next step. Each request body
becomes one checked Options (parse_options); errors use OpenAI's format, {"error": {"message",
"type", "param", "code"}}, and never carry a stack trace. Who may call (Host, Origin, key) and
the limits: docs/server-security.md.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen2s import engine as generation
from qwen2s import grammar, prompts, tool_calls, weights
from qwen2s.say import say

__all__ = ["Engine", "app", "listen", "serve", "ApiError", "exposure_warning", "Settings", "Defaults", "Options",
           "Metrics", "new_metrics", "parse_options", "MAX_BODY_BYTES", "DEFAULT_MAX_TOKENS"]

MAX_BODY_BYTES = 1 << 20  # a whole 32k-token context is ~130 KB of text; 1 MiB leaves room for JSON escapes
BODY_SECONDS = 30.0  # the most a request body may take to arrive: a client that trickles it is cut off
HEADER_SECONDS = 10.0  # the most a connection may sit without beginning a request (or trickle its headers)
WRITE_SECONDS = 60.0  # the most a client may read nothing of an answer that waits for it before it is dropped
STOP_SECONDS = 5.0  # stopping, the most the answers' clients get to read what was sent before they are cut
MAX_CONNECTIONS = 64  # a 503 beyond (HeaderDeadline): slow clients cannot take every socket
KEEP_ALIVE_SECONDS = 5  # an idle kept-alive connection is closed after this
DEFAULT_MAX_TOKENS = 512  # when a request sets none, as the chat and mlx_lm.server
MAX_STOPS, MAX_STOP_CHARS = 4, 1024  # OpenAI's count; a length far past any real stop word
MAX_INT, MAX_FLOAT = 2**63 - 1, sys.float_info.max  # no larger number reaches MLX


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

    TYPES = {500: "server_error", 503: "server_error"}  # every 4xx: invalid_request_error

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


def number(body: dict, name: str, default, low=-MAX_FLOAT, high=MAX_FLOAT, low_open=False, integer=False):
    """body[name] checked to lie in [low, high] (or (low, high]), finite; default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    bounds = f"{'(' if low_open else '['}{low}, {high}]"
    if not is_number(v) or (integer and isinstance(v, float) and not v.is_integer()):
        raise ApiError(400, f"{name} must be {'a whole number' if integer else 'a number'}, not {short(v)}", name)
    # ints compare exactly with floats whatever their size, so 10**400 is refused here, never converted
    if (isinstance(v, float) and not math.isfinite(v)) or v < low or v > high or (low_open and v == low):
        raise ApiError(400, f"{name} must be finite and in {bounds}, not {short(v)}", name)
    return int(v) if integer else float(v)


def short(v) -> str:
    """A value for an error message, cut to 40 characters (a field may hold a megabyte)."""
    try:
        text = repr(v)
    except ValueError:  # an integer past Python's 4300 digits
        text = "a number too long to print"
    return text if len(text) <= 40 else text[:37] + "..."


def short_line(text: str, most: int = 300) -> str:
    """A message from elsewhere (the grammar engine's) cut to most characters."""
    return text if len(text) <= most else text[: most - 3] + "..."


def flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, not {short(v)}", name)
    return v


def stop_strings(body: dict) -> tuple[str, ...]:
    """At most MAX_STOPS non-empty strings of at most MAX_STOP_CHARS each (they are held back while they may begin)."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"each stop string must be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


class Defaults(NamedTuple):
    """What a request does not set: the sampling defaults (Sampling's field names: the model's
    generation_config.json under the serve flags), max_tokens, and the vocabulary size that bounds
    token ids."""

    sampling: dict
    vocab_size: int
    max_tokens: int = DEFAULT_MAX_TOKENS


class Options(NamedTuple):
    """One request's generation options, checked: what the engine reads."""

    sampling: q.Sampling
    max_tokens: int
    stops: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # the chosen token's log-probability, from the model's distribution before sampling
    top_logprobs: int = 0  # and this many likeliest alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit before sampling)
    constraint: grammar.Constraint | None = None  # response_format's grammar (structured output)


def logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in [-100, 100]} -> sorted (id, bias) pairs."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > vocab_size:
        raise ApiError(400, "logit_bias must be an object of token ids to numbers in [-100, 100]", "logit_bias")
    pairs = []
    for key, value in bias.items():
        # a token's own decimal form only: "5" and "05" would both name token 5, their biases added past 100
        if not (key.isascii() and key.isdigit() and len(key) < 12 and key == str(int(key)) and int(key) < vocab_size):
            raise ApiError(400, f"logit_bias: {short(key)} is not a token id below {vocab_size}", "logit_bias")
        pairs.append((int(key), number({"logit_bias": value}, "logit_bias", 0.0, low=-100, high=100)))
    return tuple(sorted(pairs))


def log_probabilities(body: dict, kind: str) -> tuple[bool, int]:
    """(logprobs, top_logprobs): chat has a flag and top_logprobs 0-20; completions one number 0-5."""
    if kind == "text":
        n = number(body, "logprobs", None, low=0, high=5, integer=True)
        return n is not None, n or 0
    wanted = flag(body, "logprobs")
    top = number(body, "top_logprobs", None, low=0, high=20, integer=True)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return wanted, top or 0


def keep_k(k: int, vocab_size: int) -> int:
    """top_k as the sampler takes it: k at or past the vocabulary keeps every token, which 0 says."""
    return 0 if k >= vocab_size else k


def parse_options(body: dict, kind: str, defaults: Defaults) -> Options:
    """A request body's generation fields, checked -> Options; ApiError (400) for any bad value.

    kind is "chat" (/v1/chat/completions) or "text" (/v1/completions): they spell logprobs differently.
    """
    if number(body, "n", 1, integer=True) != 1:
        raise ApiError(400, "n must be 1: this server generates one choice per request", "n")
    top_k = number(body, "top_k", None, low=0, high=MAX_INT, integer=True)
    sampling = weights.sampling_for(
        defaults.sampling,
        temp=number(body, "temperature", None, low=0),
        top_p=number(body, "top_p", None, low=0, high=1, low_open=True),
        top_k=None if top_k is None else keep_k(top_k, defaults.vocab_size),
        min_p=number(body, "min_p", None, low=0, high=1),
        repetition_penalty=number(body, "repetition_penalty", None, low=0, low_open=True),
        presence_penalty=number(body, "presence_penalty", None, low=-2, high=2),  # OpenAI's range
        frequency_penalty=number(body, "frequency_penalty", None, low=-2, high=2),
    )
    max_tokens = number(body, "max_tokens", defaults.max_tokens, low=1, high=MAX_INT, integer=True)
    # OpenAI's newer name wins; both are checked (a bad max_tokens beside it was ignored)
    max_tokens = number(body, "max_completion_tokens", max_tokens, low=1, high=MAX_INT, integer=True)
    stream = flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
        raise ApiError(400, "stream_options must be an object, and only with stream: true", "stream_options")
    wanted, top = log_probabilities(body, kind)
    try:
        constraint = grammar.from_response_format(body.get("response_format"))
    except ValueError as e:
        raise ApiError(400, str(e), "response_format") from None
    return Options(
        sampling=sampling, max_tokens=max_tokens, stops=stop_strings(body),
        seed=number(body, "seed", None, low=0, high=MAX_INT, integer=True),  # MLX seeds are unsigned
        stream=stream, include_usage=flag(stream_options or {}, "include_usage"),
        logprobs=wanted, top_logprobs=top, logit_bias=logit_bias(body, defaults.vocab_size), constraint=constraint)


def unsupported(options: Options, body: dict, features: frozenset) -> None:
    """Refuse (400) a field this engine cannot honour rather than ignore it; features: what it can."""
    asked = {"logprobs": options.logprobs, "logit_bias": bool(options.logit_bias),
             "response_format": body.get("response_format") not in (None, {"type": "text"}),
             "tools": bool(body.get("tools")) or body.get("tool_choice") not in (None, "none", "auto")}
    for name, wanted in asked.items():
        if wanted and name not in features:
            raise ApiError(400, f"{name} is not supported by this server yet", name)


# OpenAI's fields that an endpoint does not honour, each with the one value that changes nothing: any other is a 400
NOT_HONOURED = {
    "text": {"echo": False, "best_of": 1, "suffix": "", "tools": None, "tool_choice": None, "functions": None,
             "function_call": None, "top_logprobs": None},  # (completions spell top log-probabilities logprobs)
    "chat": {"functions": None, "function_call": None},  # the legacy spelling of tools and tool_choice
}


def not_honoured(body: dict, kind: str) -> None:
    """Refuse (400) a field of OpenAI's that this endpoint would otherwise ignore (echo, best_of, tools on
    completions...): the client would take the answer for one that honoured it."""
    path = "/v1/completions" if kind == "text" else "/v1/chat/completions"
    for name, neutral in NOT_HONOURED[kind].items():
        value = body.get(name)
        if value is not None and (type(value) is not type(neutral) or value != neutral):  # True == 1: not best_of
            raise ApiError(400, f"{name} is not supported on {path}", name)


def chat_messages(body: dict) -> list[dict]:
    """The request's messages in the chat template's shapes (tool calls and results included); 400 if malformed."""
    try:
        return tool_calls.normalize_messages(body.get("messages"))
    except tool_calls.RequestError as e:
        raise ApiError(400, str(e), e.param) from None


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", "prompt")
    return prompt


# ---------------------------------------------------------------------------------------------
# The engine: the model, its prompt cache, and the one thread that runs it
# ---------------------------------------------------------------------------------------------


class Piece(NamedTuple):
    """What one step of a generation adds to the answer: its text, and its tokens' log-probabilities
    in OpenAI's chat shape (token, logprob, bytes, top_logprobs), when the request asked for them."""

    text: str
    logprobs: tuple[dict, ...] = ()


LEFT = object()  # in a generation's queue of events: its client went away
STOPPING = object()  # and: the server is stopping


class Outbox:
    """Events from the engine's thread to the event loop's queues, one wake-up for as many as come before the loop
    takes them: a step's 32 rows wake the loop once, not 32 times (each wake-up a write to its pipe and a turn of
    the loop, under the GIL the engine's thread needs too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def put(self, events: asyncio.Queue, event) -> None:
        """From any thread."""
        with self.lock:
            self.items.append((events, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """On the loop."""
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for events, event in items:
            events.put_nowait(event)


class Engine:
    """The model behind the API: the generation engine, stepped by a worker thread of its own, with
    up to `parallel` requests decoding together; the rest wait in arrival order.

    defaults: the sampling values a request does not set (weights.sampling_defaults: the model's
    generation_config.json), as Sampling's field names.
    """

    features = frozenset({"logprobs", "logit_bias", "response_format", "tools"})  # the optional fields it honours

    def __init__(self, params, config, tokenizer, name: str, defaults: dict, kernels="reference",
                 max_kv_size=None, parallel: int = 8, proposer=None, num_draft: int = 8):
        self.tokenizer, self.name, self.defaults = tokenizer, name, defaults
        self.engine = generation.Engine(params, config, tokenizer, kernels, max_batch=parallel,
                                        max_kv_size=max_kv_size, proposer=proposer, num_draft=num_draft)
        self.max_kv = self.engine.max_kv
        self.outbox: Outbox | None = None  # made on the event loop's first request
        self.streams: set[asyncio.Queue] = set()  # the event queues of the generations under way
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")  # prompts.ENCODE_LOCK: one at a time
        self.engine.start()

    async def tokenized(self, f, *args):
        """f(tokenizer, *args) (an encoding, the chat template) in a thread: a megabyte body takes the tokenizer 1-3 s,
        which on the event loop had stalled every other client (streams, key checks, /health) meanwhile."""
        call = functools.partial(f, self.tokenizer, *args)
        return await asyncio.get_running_loop().run_in_executor(self.encoder, call)

    def check_fits(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.max_kv:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, but the context holds {self.max_kv} "
                                "(and at least one token must be generated)", param, "context_length_exceeded")

    def token_logprob(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    def piece(self, event: generation.Event, options: Options) -> Piece:
        if not options.logprobs or event.token is None or event.token in self.engine.eos:
            return Piece(event.text)
        entry = {**self.token_logprob(event.token, event.logprob),
                 "top_logprobs": [self.token_logprob(t, lp) for t, lp in event.top_logprobs]}
        return Piece(event.text, (entry,))

    async def generate(self, ids: list[int], options: Options, cancelled: asyncio.Event, scope: str = ""):
        """Yield the Pieces of one generation, then its result dict."""
        loop = asyncio.get_running_loop()
        if self.outbox is None or self.outbox.loop is not loop:
            self.outbox = Outbox(loop)
        outbox, events = self.outbox, asyncio.Queue()
        self.streams.add(events)
        request = generation.Request(tuple(ids), options.sampling, options.max_tokens, options.stops, options.seed,
                                     scope, options.logit_bias, options.top_logprobs, options.constraint)
        # in a thread: a first grammar builds the grammar engine's view of the vocabulary (seconds). Shielded: a
        # stream whose client leaves meanwhile is cancelled here, but the thread still submits; its handle is then
        # cancelled as it comes, or the request would run to its last token with no one to read it
        submitting = asyncio.ensure_future(asyncio.to_thread(self.engine.submit, request,
                                                             lambda e: outbox.put(events, e)))
        try:
            handle = await asyncio.shield(submitting)
        except ValueError as e:
            self.streams.discard(events)
            raise ApiError(400, str(e)) from None
        except asyncio.CancelledError:
            self.streams.discard(events)
            submitting.add_done_callback(lambda s: s.cancelled() or s.exception() or s.result().cancel())
            raise
        # the client left: free its row. The engine then ends the request with a "cancelled" event; until then
        # the queue's only other reader is this marker (an asyncio event: a thread a request waiting on it would
        # exhaust the default executor's few threads, and requests beyond them would wait for others to end)
        watch = asyncio.ensure_future(cancelled.wait())
        watch.add_done_callback(lambda w: w.cancelled() or events.put_nowait(LEFT))
        try:
            while True:
                event = await events.get()
                if event is LEFT:
                    handle.cancel()
                    continue
                if event is STOPPING:
                    raise ApiError(503, "the server is stopping, or the request was cancelled")
                if self.engine.closing and not event.finish_reason:
                    continue  # stopping: what the client was not sent yet is dropped, the stopping error goes now
                piece = self.piece(event, options)
                if piece.text or piece.logprobs:
                    yield piece
                if event.finish_reason:
                    break
        finally:
            handle.cancel()  # the stream ended early, or the client left: its row is freed at the next step
            cancelled.set()
            watch.cancel()
            self.streams.discard(events)
        if event.finish_reason == "cancelled":
            raise ApiError(503, "the server is stopping, or the request was cancelled")
        if event.finish_reason == "grammar":  # the request's schema or tools, too complex to follow to the end
            raise ApiError(400, f"the answer cannot follow its grammar: {short_line(event.error)}", None,
                           "grammar_too_complex")
        if event.finish_reason == "error":  # the engine's step failed (logged there); the server goes on
            raise ApiError(500, "internal error: the generation step failed")
        usage, stats = event.usage, event.stats
        yield {"finish_reason": "length" if event.finish_reason == "context" else event.finish_reason,
               "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                         "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}},
               "timings": {"prefill_seconds": stats.prefill_seconds, "decode_seconds": stats.decode_seconds}}

    def stop(self) -> None:
        """On the event loop, as the server begins to stop: every generation under way ends now with the stopping
        error, without waiting for the worker's next step (seconds, where a fresh GPU process builds its kernels: the
        streams had been cut by uvicorn's graceful timeout instead); the engine ends them too at its next step."""
        self.engine.close(wait=0)
        for events in self.streams:
            events.put_nowait(STOPPING)

    def close(self) -> None:
        """Stop: running and queued generations end at the next step; wait for the worker's last step."""
        self.engine.close()


# ---------------------------------------------------------------------------------------------
# The HTTP side: settings, metrics, the Host and Origin guard
# ---------------------------------------------------------------------------------------------

LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"  # pages served from this machine
HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::\d{1,5})?")


class Settings(NamedTuple):
    """How the API answers: its names, defaults, key, and who may reach it."""

    names: tuple[str, ...]  # the model's ids; responses carry the first, requests may use any
    defaults: Defaults
    api_keys: tuple[str, ...] = ()  # any of them opens the API; each key's prompt-cache entries are its own
    bind: str = "127.0.0.1"  # the address served: always an accepted Host
    hosts: tuple[str, ...] = ()  # more Host names: exact, "*.suffix", or "*" for any
    origins: tuple[str, ...] = ()  # more page origins than localhost's, or "*" for any
    body_seconds: float = BODY_SECONDS
    write_seconds: float = WRITE_SECONDS


class Metrics(NamedTuple):
    """The Prometheus series of /metrics, in a registry of their own (no global state).

    The server counts requests and tokens from each result's usage, and the prefill and decode
    seconds from its "timings" when the engine reports them; the engine keeps queue_length.
    """

    registry: CollectorRegistry
    requests: Counter  # labels: endpoint, status
    prompt_tokens: Counter
    generated_tokens: Counter
    cached_tokens: Counter  # prompt tokens taken from the prompt cache
    cache_hits: Counter  # generations that reused at least one cached token
    prefill_seconds: Histogram
    decode_seconds: Histogram
    queue_length: Gauge  # generations waiting for the model
    running: Gauge  # generation requests being answered


def new_metrics() -> Metrics:
    r = CollectorRegistry()
    seconds = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    return Metrics(
        r,
        Counter("qwen2_scratch_requests", "HTTP requests answered, by endpoint and status",
                ["endpoint", "status"], registry=r),
        Counter("qwen2_scratch_prompt_tokens", "Prompt tokens of finished generations", registry=r),
        Counter("qwen2_scratch_generated_tokens", "Tokens generated", registry=r),
        Counter("qwen2_scratch_cached_prompt_tokens", "Prompt tokens reused from the prompt cache", registry=r),
        Counter("qwen2_scratch_prompt_cache_hits", "Generations that reused cached prompt tokens", registry=r),
        Histogram("qwen2_scratch_prefill_seconds", "Seconds to process a prompt", buckets=seconds, registry=r),
        Histogram("qwen2_scratch_decode_seconds", "Seconds to generate after the prompt", buckets=seconds,
                  registry=r),
        Gauge("qwen2_scratch_queue_length", "Generations waiting for the model", registry=r),
        Gauge("qwen2_scratch_requests_running", "Generation requests being answered", registry=r),
    )


def record(metrics: Metrics, result: dict) -> None:
    """A finished generation's usage (and timings, when the engine gives them) into the metrics."""
    usage = result["usage"]
    metrics.prompt_tokens.inc(usage["prompt_tokens"])
    metrics.generated_tokens.inc(usage["completion_tokens"])
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    metrics.cached_tokens.inc(cached)
    if cached:
        metrics.cache_hits.inc()
    timings = result.get("timings") or {}
    for name in ("prefill_seconds", "decode_seconds"):
        if name in timings:
            getattr(metrics, name).observe(timings[name])


def host_name(header: str) -> str | None:
    """A Host header -> its name or address, lowercased, without port, brackets or final dot; None if malformed."""
    found = HOST.fullmatch(header.strip().lower())
    if not found:
        return None
    return found["v6"] or found["name"].removesuffix(".") or None


def host_allowed(header: str | None, bind: str, hosts: tuple[str, ...]) -> bool:
    """Whether a request's Host names this server: a loopback name or address, the address served
    (with a wildcard bind, any address: an IP literal cannot be rebound), or one of hosts.

    A page that rebinds its own name to 127.0.0.1 (DNS rebinding) still sends that name: refused.
    """
    name = host_name(header or "")
    if name is None:
        return False
    hosts = tuple(h.lower().removesuffix(".") for h in hosts)  # "Box.Example.org." names what the Host's name does
    if "*" in hosts or name in hosts or any(h.startswith("*.") and name.endswith(h[1:]) for h in hosts):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name == "localhost" or name.endswith(".localhost") or name == bind.lower().removesuffix(".")
    try:
        served = ipaddress.ip_address(bind)
    except ValueError:
        served = None
    return address.is_loopback or address == served or (served is not None and served.is_unspecified)


class Guard:
    """ASGI middleware: refuse (403) a Host that is not this server's and an Origin that is not
    allowed, before anything else; then CORS headers and preflight answers (Starlette's CORS
    middleware, whose origin rule is the one refused here too)."""

    METHODS = ("GET", "POST")
    ONCE = ("origin", "authorization", "content-type", "content-length")  # each checked here or in read_json

    def __init__(self, app, settings: Settings):
        self.settings = settings
        self.cors = CORSMiddleware(app, allow_origins=settings.origins, allow_origin_regex=LOCAL_ORIGINS,
                                   allow_methods=self.METHODS, allow_headers=["*"], max_age=600)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            hosts, origin = headers.getlist("host"), headers.get("origin")
            asked = headers.get("access-control-request-method") if scope["method"] == "OPTIONS" else None
            twice = [name for name in self.ONCE if len(headers.getlist(name)) > 1]
            refusal = None
            if twice:  # checked on the first, acted on by another reader (a proxy) on the second
                refusal = ApiError(400, f"the {twice[0]} header is sent more than once", None, "duplicate_header")
            elif len(hosts) != 1 or not host_allowed(hosts[0], self.settings.bind, self.settings.hosts):
                refusal = ApiError(403, f"Host {short(hosts[0] if hosts else '')} is not this server's "
                                        "(serve --allowed-hosts adds names)", None, "host_not_allowed")
            elif origin is not None and not self.cors.is_allowed_origin(origin):
                refusal = ApiError(403, f"requests from pages at {short(origin)} are not allowed "
                                        "(serve --allowed-origins adds origins)", None, "origin_not_allowed")
            elif origin is not None and asked is not None and asked not in self.METHODS:  # else CORS's text/plain 400
                refusal = ApiError(400, f"a preflight for {short(asked)}: only GET and POST are served", None,
                                   "method_not_allowed")
            if refusal:
                return await refusal.response()(scope, receive, send)
        await self.cors(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The HTTP side: requests
# ---------------------------------------------------------------------------------------------


class Context(NamedTuple):
    """What every endpoint reads."""

    engine: Engine
    settings: Settings
    metrics: Metrics


async def read_json(request, seconds: float = BODY_SECONDS) -> dict:
    """The request body as a JSON object: sent as application/json, at most MAX_BODY_BYTES long, within seconds."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":  # a form or text/plain POST is what a cross-site page can send unasked
        raise ApiError(415, "send the request body as JSON, with Content-Type: application/json", None,
                       "unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None, "request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_big
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {seconds:g} s", None, "timeout") from None
    except ClientDisconnect:  # nobody reads the answer: counted as the client's (nginx's 499), not the server's 500
        raise ApiError(499, "the client closed the connection before its body arrived", None, "client_closed") \
            from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):  # ValueError too for an integer literal of over 4300 digits
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:  # arrays or objects nested past Python's recursion limit: "[" * 100_000
        raise ApiError(400, "the request body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # "\ud800" is valid JSON but no text: the tokenizer raises a TypeError on it (a 500)
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request body's strings hold a lone surrogate (\\ud800-\\udfff): not text") from None
    return data


def check_model(names: tuple[str, ...], body: dict) -> None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model not in names):
        raise ApiError(404, f"no model {short(model)}: this server serves {', '.join(map(repr, names))} "
                            "(GET /v1/models)", "model", "model_not_found")


def check_key(request, keys: tuple[str, ...]) -> str:
    """The request's prompt-cache scope: Authorization must be exactly "Bearer KEY" for one of keys, compared in
    constant time with every one of them (no hint at a key, nor at which one matched). "" when no key is set."""
    if not keys:
        return ""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    same = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    if scheme != "Bearer" or not any(same):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key")
    return f"key {same.index(True)}"  # a request never reuses another key's cached prompt (docs/server-security.md)


def endpoint(handler, ctx: Context, keyed: bool = True):
    """Key check, OpenAI-format errors, no stack trace in any response, and the count by status."""
    async def wrapped(request):
        try:
            if keyed:
                request.state.scope = check_key(request, ctx.settings.api_keys)
            response = await handler(request, ctx)
        except ApiError as e:
            response = e.response()
            if e.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
        except Exception as e:
            say(f"error: {request.url.path}: {type(e).__name__}: {e}")
            response = ApiError(500, f"internal error: {type(e).__name__}").response()
        ctx.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response
    return wrapped


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generation stops when the response ends, the client gone or not."""

    def __init__(self, events, cancelled: asyncio.Event):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancelled = cancelled

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancelled.set()


async def cancel_on_disconnect(request, cancelled: asyncio.Event) -> None:
    """Set cancelled when the client goes away (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancelled.set()


async def respond(request, ctx: Context, ids, options: Options, chunks, final):
    """Stream or collect one generation; chunks(piece, finish) -> the JSON chunks of one piece (or of the
    finish, with finish set), final(piece, result) the whole answer's."""
    cancelled = asyncio.Event()  # set on the event loop only
    pieces = ctx.engine.generate(ids, options, cancelled, request.state.scope)
    metrics = ctx.metrics

    async def events():
        try:
            with metrics.running.track_inprogress():
                async for item in pieces:
                    if isinstance(item, Piece):
                        for c in chunks(item, None):
                            yield sse(c)
                    else:
                        record(metrics, item)
                        finished = chunks(Piece(""), item["finish_reason"])  # never empty: it carries the finish
                        for c in finished:
                            yield sse(c)
                        if options.include_usage:  # (a piece with no text may have no chunk: a tool call's parser)
                            yield sse({**finished[-1], "choices": [], "usage": item["usage"]})
        except ApiError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    if options.stream:
        return EventStream(events(), cancelled)
    watcher = asyncio.create_task(cancel_on_disconnect(request, cancelled))  # a client that leaves frees the model
    collected = []
    try:
        with metrics.running.track_inprogress():
            async for item in pieces:
                if isinstance(item, Piece):
                    collected.append(item)
                else:
                    record(metrics, item)
                    whole = Piece("".join(p.text for p in collected), tuple(e for p in collected for e in p.logprobs))
                    return JSONResponse(final(whole, item))
    except ApiError as e:
        if e.status == 503 and watcher.done() and not watcher.cancelled():  # cancelled since the client left: its
            raise ApiError(499, "the client closed the connection before its answer", None,  # (nginx's 499), not
                           "client_closed") from None  # the server's 503
        raise
    finally:
        watcher.cancel()


def envelope(ctx: Context, kind):
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": ctx.settings.names[0]}


def request_options(ctx: Context, body: dict, kind: str) -> Options:
    check_model(ctx.settings.names, body)
    not_honoured(body, kind)
    options = parse_options(body, kind, ctx.settings.defaults)
    unsupported(options, body, getattr(ctx.engine, "features", frozenset()))
    return options


async def tool_plan(ctx: Context, body: dict) -> tool_calls.ToolPlan:
    """The request's tools and tool_choice -> what the template renders and how the answer is constrained."""
    if body.get("tools") is None and body.get("tool_choice") in (None, "none", "auto"):
        return tool_calls.ToolPlan(None, None)
    parallel = flag(body, "parallel_tool_calls", True)
    vocabulary = await asyncio.to_thread(ctx.engine.engine.grammar_tokenizer)  # built once (seconds)
    return tool_calls.tool_plan(body.get("tools"), body.get("tool_choice"), vocabulary, parallel)


async def chat_completions(request, ctx: Context):
    body = await read_json(request, ctx.settings.body_seconds)
    options = request_options(ctx, body, "chat")
    messages = chat_messages(body)
    try:
        plan = await tool_plan(ctx, body)
    except tool_calls.RequestError as e:
        raise ApiError(400, str(e), e.param) from None
    if plan.constraint is not None:
        if options.constraint is not None:
            raise ApiError(400, "response_format and a required tool call cannot both shape the answer",
                           "tool_choice")
        options = options._replace(constraint=plan.constraint)
    try:
        ids = await ctx.engine.tokenized(functools.partial(prompts.encode_chat, tools=plan.tools), messages)
    except prompts.PromptError as e:  # the template is missing, refused the messages or ran past its limits
        raise ApiError(400, str(e), "messages") from None
    ctx.engine.check_fits(ids, "messages")
    head = envelope(ctx, "chat")
    sent_role = []
    calls = tool_calls.ToolCallParser() if plan.tools is not None else None  # the answer's <tool_call> blocks

    def logprobs(piece: Piece):
        return {"content": list(piece.logprobs)} if options.logprobs else None

    def deltas(piece: Piece, finish) -> list[dict]:
        if calls is None:
            return [{"content": piece.text}] if piece.text or finish is None else [{}]
        return calls.feed(piece.text) + (calls.finish() if finish is not None else [])

    def chunks(piece, finish):
        found = deltas(piece, finish) or ([{}] if finish is not None or piece.logprobs else [])
        if finish is not None and calls is not None:
            finish = calls.finish_reason(finish)
        out = []
        for i, delta in enumerate(found):
            if not sent_role:  # the first chunk names the role, as OpenAI's do
                sent_role.append(True)
                delta = {"role": "assistant", **delta}
            last = i == len(found) - 1
            out.append({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs(piece) if last else None,
                                     "finish_reason": finish if last else None}]})
        return out

    def final(piece, result):
        message = {"role": "assistant", "content": piece.text}
        finish = result["finish_reason"]
        if calls is not None:
            calls.feed(piece.text)
            calls.finish()
            message, finish = calls.message(), calls.finish_reason(finish)
        return {**head, "choices": [{"index": 0, "message": message, "logprobs": logprobs(piece),
                                     "finish_reason": finish}], "usage": result["usage"]}

    return await respond(request, ctx, ids, options, chunks, final)


async def completions(request, ctx: Context):
    body = await read_json(request, ctx.settings.body_seconds)
    options = request_options(ctx, body, "text")
    ids = await ctx.engine.tokenized(prompts.encode_text, completion_prompt(body))
    ctx.engine.check_fits(ids, "prompt")
    head = envelope(ctx, "text")

    def logprobs(piece: Piece):  # the legacy completions shape
        if not options.logprobs:
            return None
        entries = piece.logprobs
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    def chunks(piece, finish):
        return [{**head, "choices": [{"index": 0, "text": piece.text, "logprobs": logprobs(piece),
                                      "finish_reason": finish}]}]

    def final(piece, result):
        return {**chunks(piece, result["finish_reason"])[0], "usage": result["usage"]}

    return await respond(request, ctx, ids, options, chunks, final)


def text_ids(tokenizer, text: str, add_special: bool) -> list[int]:
    """Text as text: a literal "<|im_start|>" gives the tokens of its characters, never the control token."""
    return tokenizer.encode(text, add_special_tokens=add_special, split_special_tokens=True)


async def tokenize(request, ctx: Context):
    """llama-server's POST /tokenize: {"content": str, "add_special": bool} -> {"tokens": [...]}."""
    body = await read_json(request, ctx.settings.body_seconds)
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(400, "content must be a string", "content")
    return JSONResponse({"tokens": await ctx.engine.tokenized(text_ids, content, flag(body, "add_special"))})


async def detokenize(request, ctx: Context):
    """llama-server's POST /detokenize: {"tokens": [...]} -> {"content": str}."""
    body = await read_json(request, ctx.settings.body_seconds)
    tokens, vocab = body.get("tokens"), ctx.settings.defaults.vocab_size
    if not isinstance(tokens, list) or not all(is_number(t) and isinstance(t, int) and 0 <= t < vocab
                                               for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
    return JSONResponse({"content": await ctx.engine.tokenized(lambda tokenizer: tokenizer.decode(tokens))})


async def models(request, ctx: Context):
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": int(time.time()), "owned_by": "qwen2-scratch"}
        for name in ctx.settings.names]})


async def health(request, ctx: Context):
    return JSONResponse({"status": "ok"})


async def metrics_text(request, ctx: Context):
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def http_error(request, exc: HTTPException):
    """Starlette's own errors (unknown route, wrong method) in OpenAI's format."""
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()


def app(engine: Engine, settings: Settings, metrics: Metrics | None = None) -> Starlette:
    """The ASGI application over engine; /health answers without the key."""
    ctx = Context(engine, settings, metrics or new_metrics())
    ctx.metrics.queue_length.set_function(lambda: engine.engine.load[1])  # requests waiting for a row

    routes = [
        Route("/v1/models", endpoint(models, ctx), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions, ctx), methods=["POST"]),
        Route("/v1/completions", endpoint(completions, ctx), methods=["POST"]),
        Route("/tokenize", endpoint(tokenize, ctx), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize, ctx), methods=["POST"]),
        Route("/metrics", endpoint(metrics_text, ctx), methods=["GET"]),
        Route("/health", endpoint(health, ctx, keyed=False), methods=["GET"]),
    ]
    served = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                       middleware=[Middleware(Guard, settings=settings)])
    # a path with a trailing slash is a 404, not Starlette's 307 to the path without it (whose client may send a
    # POST's body again, or not follow at all)
    served.router.redirect_slashes = False
    return served


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


async def busy(scope, receive, send) -> None:
    """The answer on a connection over MAX_CONNECTIONS: a JSON 503, and the connection closed."""
    response = ApiError(503, f"the server has {MAX_CONNECTIONS} connections open; try again shortly", None,
                        "server_busy").response()
    response.headers.update({"connection": "close", "retry-after": "1"})
    await response(scope, receive, send)


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that begins no request within HEADER_SECONDS:
    uvicorn has no deadline for request headers, so a client that connects and sends nothing, or
    trickles its headers, would hold a socket for ever (MAX_CONNECTIONS of them: the server).
    And one whose client reads nothing of its answer for write_seconds while the answer waits (the socket's
    buffers full): it had held its socket and what was left of its answer for ever, its generation run to the end."""

    write_seconds = WRITE_SECONDS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS or len(self.tasks) >= MAX_CONNECTIONS:
            self.app = busy  # in place of uvicorn's limit_concurrency, whose 503 is text, logged at every request
        self.seen = None  # the request being answered at the last check
        self.timer = self.loop.call_later(HEADER_SECONDS, self.check)
        self.stalled: asyncio.TimerHandle | None = None  # set while the transport's buffer is full

    def _unsupported_upgrade_warning(self) -> None:
        """An Upgrade header (a WebSocket's) is answered as plain HTTP; uvicorn warned twice a request in the log."""

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stalled is None:
            self.stalled = self.loop.call_later(self.write_seconds, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None

    def check(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if not answering and self.cycle is self.seen:  # no new request since the last check
            self.transport.close()
            return
        if answering and self.client_left():
            self.transport.abort()  # connection_lost: the request's answer, and its generation, end
            return
        self.seen = self.cycle
        self.timer = self.loop.call_later(HEADER_SECONDS, self.check)

    def client_left(self) -> bool:
        """Whether the client closed its end. uvicorn stops reading while it holds a pipelined request, so it saw no
        close: a client that sent its next request during an answer, then left, had its generation run to the end."""
        sock = self.transport.get_extra_info("socket")
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as s:  # a copy: asyncio's own may not recv
            try:
                return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:  # reset
                return True

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: OpenAI's JSON error rather than uvicorn's text, unless an answer already went
        out (a 401, then a malformed body), and the request's own answer goes to no one. uvicorn's 400 raised in the
        first case, the app's answer in the second: tracebacks in the log."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = ApiError(400, "the request is not valid HTTP/1.1").response().body
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.transport.close()
        if self.cycle is not None:  # as connection_lost does, now: the app may answer before the loop calls that
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def connection_lost(self, exc) -> None:
        self.timer.cancel()
        if self.stalled is not None:
            self.stalled.cancel()
        super().connection_lost(exc)


class Stopping(uvicorn.Server):
    """uvicorn's server, ending every generation as it begins to stop (Ctrl-C, SIGTERM). uvicorn waited up to its
    graceful timeout for the answers still streaming, then cancelled them, each a traceback in the log; and a
    second Ctrl-C skipped the lifespan's close (the worker stepping as Python exited) and cancelled the lifespan's
    task, with a traceback: so no lifespan, and the engine closed here."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop()  # running and queued answers end now, as the server stopping (a 503)
        await self.answers_sent(STOP_SECONDS)
        await super().shutdown(sockets)
        self.engine.close()  # the worker's last step, waited for: the process exits with the worker parked

    def sending(self) -> bool:
        """Whether an answer is still being made or written: a response not complete, or bytes the socket has
        not taken yet (a client reading slowly)."""
        def busy(c) -> bool:
            cycle, transport = getattr(c, "cycle", None), getattr(c, "transport", None)
            return ((cycle is not None and not cycle.response_complete)
                    or (transport is not None and not transport.is_closing() and transport.get_write_buffer_size() > 0))
        return any(busy(c) for c in self.server_state.connections)

    async def answers_sent(self, seconds: float) -> None:
        """Wait, up to seconds of the loop's time, until every answer has ended (each woken by stop()) and been
        handed to the kernel. uvicorn gives them 0.1 s after a second Ctrl-C, and its loop then ends with what
        asyncio still buffers unsent: on the H200 under a loaded test suite the three streams of
        test_stopping_ends_the_running_streams_at_once were cut ("Connection error.") without their error."""
        end = time.monotonic() + seconds
        while self.sending() and time.monotonic() < end:
            await asyncio.sleep(0.01)

    @contextmanager
    def capture_signals(self):
        """SIGHUP (the terminal closed) stops the server as SIGTERM does, answers ended with the stopping error;
        uvicorn takes only SIGINT and SIGTERM, and SIGHUP had ended the process with the streams cut off. Once
        stopped, uvicorn raises the signal again: the process ends by it, as by SIGTERM. Unless SIGHUP was ignored
        when the server started (`nohup qwen2-scratch serve`): then it keeps serving, as asked."""
        with super().capture_signals():
            if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)


class OncePerMinute(logging.Filter):
    """uvicorn's warning for a request it cannot parse, once a minute at most, with how many came since: a client
    sending garbage in a loop had written a line to the log for each request."""

    def __init__(self, message: str, seconds: float = 60.0):
        super().__init__()
        self.message, self.seconds, self.quiet_until, self.held = message, seconds, -math.inf, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.message:
            return True
        now = time.monotonic()
        if now < self.quiet_until:
            self.held += 1
            return False
        if self.held:
            record.msg, record.args = f"{self.message} (and {self.held} more since the last such line)", ()
        self.quiet_until, self.held = now + self.seconds, 0
        return True


def serve(engine: Engine, sock: socket.socket, settings: Settings, metrics: Metrics | None = None) -> None:
    """Answer on sock until Ctrl-C; uvicorn's own logging only for warnings and errors."""
    config = uvicorn.Config(app(engine, settings, metrics), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=STOP_SECONDS, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            http=type("Deadlines", (HeaderDeadline,), {"write_seconds": settings.write_seconds}))
    invalid = OncePerMinute("Invalid HTTP request received.")
    logging.getLogger("uvicorn.error").addFilter(invalid)
    try:
        Stopping(config, engine).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: stopping is the normal end
        pass
    finally:
        logging.getLogger("uvicorn.error").removeFilter(invalid)
