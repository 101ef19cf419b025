"""The generation engine: many sequences at once, one batched decode step, typed events.

Every front end (generate, chat, serve, bench, the Python API) hands the engine a `Request` and
reads `Event`s back. The engine holds the rows being decoded and, each `step()`:

    admit     one prefill chunk of the oldest waiting request; chunks interleave with decode
              steps, so a long prompt never freezes the rows already streaming. A prompt whose
              last chunk is in samples its first token and joins the batch as a new row.
    decode    one compiled step over every row ([B, 1] -> [B, V]); a row alone with a proposer
              verifies k speculative proposals in the same step instead ([1, k + 1]).
    sample    each row with its own settings and its own random key (seed, position).
    retire    rows that ended (end-of-sequence, a stop string, max_tokens, the context) or were
              cancelled: their cache rows are dropped at once.

One request, one answer: a request's tokens do not depend on what else is in the batch, on what
the prompt cache holds, or on speculation. The rows of the model's products are computed one by
one in a fixed order (see blas_adapter.c), prompts are cut into prefill chunks at fixed
positions, the prompt cache gives back whole chunks only, a row's draws come from a key made of
its seed and the token's position, and speculation keeps a proposal only where the row's own
draw equals it.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import atexit
import math
import os
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple

import mlx.core as mx

from qwen2s import grammar, speculative
from qwen2s.say import say

__all__ = ["Request", "Event", "Usage", "Stats", "Handle", "Engine", "PromptCache", "StopMatcher", "stats_line"]


class Request(NamedTuple):
    """What to generate: prompt token ids and how to draw the answer."""

    prompt: tuple[int, ...]
    sampling: q.Sampling = q.Sampling()
    max_tokens: int = 256
    stops: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    seed: int | None = None  # None: a fresh random seed
    cache_scope: str = ""  # prompt-cache entries are shared only within a scope (the server: per API key)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before sampling
    top_logprobs: int = 0  # how many of the likeliest tokens each event lists with their log-probabilities
    constraint: grammar.Constraint | None = None  # a grammar the answer must follow (structured output)


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int  # every token drawn, an end-of-sequence one included (as mlx_lm counts)
    cached_tokens: int  # prompt tokens whose keys and values came from the prompt cache


class Stats(NamedTuple):
    """A request's timings (mlx_lm's definitions) and, when it speculated, its proposals."""

    prompt_tps: float  # prompt tokens per second of prefill (cached tokens not counted)
    generation_tps: float  # tokens per second after the first
    time_to_first_token: float  # seconds from submission
    peak_memory: float  # GB, the process's peak so far
    prefill_seconds: float = 0.0  # in this request's prefill chunks
    decode_seconds: float = 0.0  # from its first token to its last
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0


class Event(NamedTuple):
    """One step of one request: a token and its text, or (last) the finish reason with usage and stats."""

    token: int | None
    text: str
    logprob: float | None  # the model's log-probability of token: before bias, penalty, filters and grammar
    finish_reason: str | None = None  # "stop", "length", "context", "cancelled", "grammar" or "error", last
    usage: Usage | None = None
    stats: Stats | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the likeliest tokens there and their log-probabilities
    error: str | None = None  # why a "grammar" finish (the grammar engine gave up) or an "error" (a step failed)


def stats_line(stats: Stats, usage: Usage) -> str:
    """One line, as the commands print it after an answer."""
    line = (f"prefill: {usage.prompt_tokens - usage.cached_tokens} tokens, {stats.prompt_tps:.2f} tok/s | "
            f"decode: {usage.completion_tokens} tokens, {stats.generation_tps:.2f} tok/s | "
            f"peak memory: {stats.peak_memory:.2f} GB")
    if usage.cached_tokens:
        line += f" | prompt cache: {usage.cached_tokens} tokens"
    if stats.verify_steps:
        accepted = stats.accepted / stats.proposed if stats.proposed else 0.0
        line += (f" | speculative: {accepted:.0%} of {stats.proposed} proposed accepted, "
                 f"{(stats.accepted + stats.verify_steps) / stats.verify_steps:.2f} tokens per verifier step")
    return line


# ---------------------------------------------------------------------------------------------
# Stop strings, matched as the text streams
# ---------------------------------------------------------------------------------------------


def prefix_function(s: str) -> list[int]:
    """Knuth-Morris-Pratt: f[i] is the longest proper prefix of s[: i + 1] that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        k += s[i] == s[k]
        f[i] = k
    return f


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back only a tail that may begin one.

    One matcher per stop string (KMP) reads each character once, so the work is linear in the
    text whatever the stops. The text ends before the stop string that is complete first (of two
    complete at the same character, the longer), so the cut never depends on how the text arrives.
    """

    def __init__(self, stops):
        self.stops = [(s, prefix_function(s)) for s in stops if s]
        self.matched = [0] * len(self.stops)  # per stop: how many of its first characters end the text
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text safe to send now, and whether a stop string was reached."""
        text = self.held + piece
        for end, c in enumerate(piece, len(self.held) + 1):
            starts = []
            for j, (s, f) in enumerate(self.stops):
                k = self.matched[j]
                while k and c != s[k]:
                    k = f[k - 1]
                k = self.matched[j] = k + (c == s[k])
                if k == len(s):
                    starts.append(end - k)
            if starts:
                self.held = ""
                return text[: min(starts)], True
        keep = max(self.matched, default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


# ---------------------------------------------------------------------------------------------
# The prompt cache: keys and values of whole prefill chunks, many entries, least recently used out
# ---------------------------------------------------------------------------------------------


class PromptCache:
    """Keys and values of prompts already prefilled, to reuse for any prompt that starts the same.

    Prefixes are kept and reused in whole granules: one token where rows are exact (any prefix is
    computed as it would be from nothing), else whole prefill chunks (the same chunks at the same
    positions). Bounded in bytes (of the positions the entries hold; an entry's arrays may run up to a
    cache block and a granule past them) and in entries (a lookup compares the prompt with each
    entry); the least recently used entry goes first. Entries are shared only within a scope.

    Nothing is copied: arrays are immutable, so an entry keeps the arrays it was given (arrays of their
    own, never views into a batch's cache), and a prompt that goes on from all of an entry (a chat's
    next turn) gets them whole, room to grow included; a row's first write into them copies them
    once, and every later step writes in place.
    """

    def __init__(self, max_bytes: int, max_entries: int = 64):
        self.max_bytes, self.max_entries, self.bytes = max_bytes, max_entries, 0
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], list] = OrderedDict()  # -> [(keys, values)]
        self.lock = threading.Lock()

    def lookup(self, scope: str, prompt: tuple[int, ...], granule: int) -> tuple[int, list | None]:
        """How many leading tokens of prompt to reuse (whole granules, one token left at least), and layers whose
        first that many positions hold their keys and values ([1, K, >= reuse, D] each)."""
        with self.lock:
            best, best_key = 0, None
            # the newest first, and no entry compared that is no longer than the best so far: a chat's newest entry
            # holds its whole history, the older ones (up to 64, of tens of thousands of tokens) are then skipped
            for key in reversed(self.entries):
                if key[0] == scope and len(key[1]) > best and (n := q.common_prefix(key[1], prompt)) > best:
                    best, best_key = n, key
            reuse = min(best, len(prompt) - 1) // granule * granule
            if reuse == 0:
                return 0, None
            self.entries.move_to_end(best_key)
            layers = self.entries[best_key]
            if reuse == len(best_key[1]):  # the prompt goes on from the whole entry: its arrays, room to grow included
                return reuse, layers
            return reuse, [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in layers]  # (not a long entry's capacity)

    def store(self, scope: str, prompt: tuple[int, ...], layers: list, granule: int) -> None:
        """Keep the whole granules of prompt's keys and values: layers [1, K, >= n, D] of their own, as they are."""
        n = len(prompt) // granule * granule
        if n == 0:
            return
        tokens = tuple(prompt[:n])
        size = n * position_bytes(layers)
        if size > self.max_bytes:
            return
        with self.lock:
            # an entry's last token compared first: most entries are no prefix of this one, and slicing costs
            for key in [k for k in self.entries if k[0] == scope and len(k[1]) <= n
                        and tokens[len(k[1]) - 1] == k[1][-1] and tokens[: len(k[1])] == k[1]]:
                self.drop(key)  # an entry this one extends says nothing more
            if (scope, tokens) in self.entries:
                self.drop((scope, tokens))
            self.entries[(scope, tokens)] = layers
            self.bytes += size
            while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
                self.drop(next(iter(self.entries)))

    def drop(self, key) -> None:
        self.bytes -= len(key[1]) * position_bytes(self.entries.pop(key))


def position_bytes(layers: list) -> int:
    """Bytes of one position's keys and values over every layer ([1, K, S, D] each)."""
    return sum(k.nbytes // k.shape[2] + v.nbytes // v.shape[2] for k, v in layers)


# ---------------------------------------------------------------------------------------------
# Requests in flight
# ---------------------------------------------------------------------------------------------


class Handle:
    """A submitted request: its events arrive through `deliver` (by default a queue read by `events`)."""

    def __init__(self, request: Request, deliver: Callable[[Event], None] | None = None):
        self.request = request
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.deliver = deliver or self.queue.put
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.grammar = None  # the request's grammar state, started at submission

    def cancel(self) -> None:
        """Stop at the next step: a waiting request never starts, a running row is retired."""
        self.cancelled.set()


class Row:
    """One sequence being generated: its request, its tokens so far and its text state."""

    def __init__(self, handle: Handle, tokenizer, eos: frozenset, reused: int, grammar_state=None):
        self.handle, self.request = handle, handle.request
        self.grammar = grammar_state  # its place in the request's grammar, or None
        self.seed = self.request.seed if self.request.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.tokens = list(self.request.prompt)  # the prompt, then every token drawn
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stop = StopMatcher(self.request.stops)
        self.eos, self.reused = eos, reused
        self.cache: dict | None = None  # its own cache while its prompt is prefilled
        self.prefilled = reused
        self.submitted = time.perf_counter()
        self.t_prefill = 0.0  # seconds spent in its prefill chunks
        self.t_first = self.t_last = 0.0
        self.generated = 0
        self.proposed = self.accepted = self.verify_steps = 0
        self.misses = self.rest = 0  # speculation: fruitless verifier steps in a row, plain steps left
        self.error: str | None = None  # why it ended early: its grammar gave up, or a step failed

    @property
    def position(self) -> int:
        """Where the next token's keys and values go: every token but the last drawn is in the cache."""
        return len(self.tokens) - 1

    @property
    def penalized(self) -> bool:
        """Whether a penalty on recent tokens is on (then each draw needs the tokens before it)."""
        s = self.request.sampling
        return s.repetition_penalty != 1 or bool(s.presence_penalty) or bool(s.frequency_penalty)

    def window(self, extra: list[int] = ()) -> mx.array | None:
        """The recent tokens the penalties look at, [1, n] (None when no penalty is on)."""
        if not self.penalized:
            return None
        return mx.array([(self.tokens + list(extra))[-self.request.sampling.repetition_context :]])

    def before(self, ahead: int) -> list[int]:
        """The ids a penalty window holds before a step's input token (the last token drawn, or the draw not yet
        handed out when ahead): the window but its last (none when no penalty is on). A context of 0 or less is
        the whole history, as `window`'s slice makes it."""
        if not self.penalized:
            return []
        context = self.request.sampling.repetition_context
        known = len(self.tokens) - 1 + ahead  # tokens before the input
        return self.tokens[max(known - context + 1, 0) if context > 0 else 0 : known]


class Draw(NamedTuple):
    """A row's drawn token and what its event reports of the model's distribution there (arrays, lazily)."""

    token: mx.array  # [1]
    logprob: mx.array  # [1]
    top: tuple[mx.array, mx.array] | None  # the likeliest ids [n] and their log-probabilities [n]


def penalized_draw(logits: mx.array, biased: mx.array | None, window: mx.array | None, key: mx.array,
                   s: q.Sampling, top: int = 0) -> tuple[mx.array, mx.array]:
    """One row's logits [1, V] -> its token [1], then the `top` likeliest tokens: ids [1 + top] and their
    log-probabilities [1 + top] in the model's distribution.

    biased: the logits with the request's bias and grammar mask applied (None: none), which the penalties over
    the window of recent ids [1, n] and then the sampler see. Compiled once per sampling setting
    (`compiled_draw`): a sampled token was ~25 graph nodes built and run one by one."""
    logits32 = logits.astype(mx.float32)  # what the events report, before biases and penalties
    logits = logits if biased is None else biased
    if window is not None and s.repetition_penalty != 1:
        logits = q.apply_repetition_penalty(logits, window, s.repetition_penalty)
    if window is not None and (s.presence_penalty or s.frequency_penalty):
        logits = q.apply_presence_and_frequency(logits, window[0], s.presence_penalty, s.frequency_penalty)
    token = q.sample(logits, s, key)
    ids = mx.concatenate([token, mx.argsort(-logits32[0])[:top].astype(token.dtype)]) if top else token
    # one gather and one expression for the token and the list (and greedy_draws' the same): a token listed has
    # the value it has when drawn (computed apart, eagerly, a GPU's differed in the last bit)
    return ids, mx.take_along_axis(logits32, ids[None], axis=-1)[0] - q.logsumexp(logits32)[0]


compiled_draw = mx.compile(penalized_draw)


def draw(logits: mx.array, row: Row, window: mx.array | None, position: int) -> Draw:
    """One row's logits [1, V] -> its token: bias, penalties over the window of recent ids [1, n], grammar, then the
    sampler with the row's key for this position."""
    request = row.request
    biased = None
    if request.logit_bias:
        ids, bias = zip(*request.logit_bias, strict=True)
        biased = logits.at[:, mx.array(ids)].add(mx.array(bias, logits.dtype))
    if row.grammar is not None:
        biased = grammar.mask_logits(logits if biased is None else biased, grammar.allowed(row.grammar)[None])
    ids, logprobs = compiled_draw(logits, biased, window, q.sampling_key(row.seed, position), request.sampling,
                                  request.top_logprobs)
    return Draw(ids[:1], logprobs[:1], (ids[1:], logprobs[1:]) if request.top_logprobs else None)


def plainly_greedy(row: Row) -> bool:
    """Whether the row draws the argmax of the model's own logits, a repetition penalty aside (nothing added, no
    other penalty, no top log-probabilities)."""
    r, s = row.request, row.request.sampling
    return (s.temp < q.GREEDY_BELOW and not r.logit_bias and not s.presence_penalty and not s.frequency_penalty
            and row.grammar is None and not r.top_logprobs)


def greedy_draws(logits: mx.array, windows: mx.array | None = None, penalties: mx.array | None = None
                 ) -> tuple[mx.array, mx.array]:
    """Greedy rows drawn together, in one graph: [B, V] -> tokens [B] and their log-probabilities [B] (each row's
    argmax, as `draw` takes it, whatever the rows beside it); windows [B, n] and penalties [B, 1]: each row's
    repetition penalty (1 leaves a row's logits as they are)."""
    logits32 = logits.astype(mx.float32)  # what the events report, before the penalty
    if windows is not None:
        logits = q.apply_repetition_penalty(logits, windows, penalties)
    token = mx.argmax(logits.astype(mx.float32), axis=-1)  # [B]
    return token, mx.take_along_axis(logits32, token[:, None], axis=-1)[:, 0] - q.logsumexp(logits32)[:, 0]


compiled_greedy_draws = mx.compile(greedy_draws)  # one graph a step's greedy rows, traced once per [B, n] shape


def penalty_windows(rows: list[Row], ahead: list[int], last: mx.array) -> mx.array:
    """Each row's penalty window, ending at its step input last [B, 1] (perhaps a draw not yet handed out, so the
    window is built on the device): [B, n + 1], n the longest `before`; a shorter window is padded with its last id
    (an id seen twice is penalized once)."""
    before = [row.before(a) for row, a in zip(rows, ahead, strict=True)]
    n = max(map(len, before))
    if n == 0:
        return last
    filled = mx.array([[True] * len(b) + [False] * (n - len(b)) for b in before])  # [B, n]
    ids = mx.array([b + [0] * (n - len(b)) for b in before], mx.int32)  # [B, n]
    return mx.concatenate([mx.where(filled, ids, last), last], axis=1)  # [B, n + 1]


def draw_rows(logits: mx.array, rows: list[Row], ahead: list[int], last: mx.array) -> list[Draw]:
    """Each row's draw from a step's logits [B, V] (a row `ahead` of its tokens by a draw not yet handed out, last
    [B, 1] the step's input): the greedy rows in one graph, the others one by one (their own settings and keys)."""
    greedy = [i for i, row in enumerate(rows) if plainly_greedy(row)]
    drawn = {}
    if greedy:
        every = len(greedy) == len(rows)
        pick = (lambda a: a) if every else (lambda a: a[mx.array(greedy)])
        windows = penalties = None
        if any(rows[i].penalized for i in greedy):
            windows = penalty_windows([rows[i] for i in greedy], [ahead[i] for i in greedy], pick(last))
            penalties = mx.array([[rows[i].request.sampling.repetition_penalty] for i in greedy], logits.dtype)
        tokens, logprobs = compiled_greedy_draws(pick(logits), windows, penalties)
        drawn = {i: Draw(tokens[j : j + 1], logprobs[j : j + 1], None) for j, i in enumerate(greedy)}
    return [drawn[i] if i in drawn else
            draw(logits[i : i + 1], row, penalty_windows([row], ahead[i : i + 1], last[i : i + 1])
                 if row.penalized else None, len(row.tokens) + ahead[i])
            for i, row in enumerate(rows)]


def verifier_draws(logits: mx.array, row: Row, proposal: list[int]) -> list[Draw]:
    """A verifier step's draws for one row, logits [k + 1, V]: position i as plain decoding draws it after the
    first i proposals. A greedy row's positions are drawn in one graph, as greedy rows in a batch are (one graph
    of draws, not k + 1: on a GPU each graph is its kernels' launches); other rows one by one."""
    positions = range(len(proposal) + 1)
    if not plainly_greedy(row):
        return [draw(logits[i : i + 1], row, row.window(proposal[:i]), len(row.tokens) + i) for i in positions]
    windows = penalties = None
    if row.penalized:  # each position's window, a shorter one padded with its last id (seen twice: penalized once)
        recent = [(row.tokens + proposal[:i])[-row.request.sampling.repetition_context :] for i in positions]
        n = max(map(len, recent))
        windows = mx.array([w + w[-1:] * (n - len(w)) for w in recent], mx.int32)  # [k + 1, n]
        penalties = mx.full((len(recent), 1), row.request.sampling.repetition_penalty, logits.dtype)
    tokens, logprobs = compiled_greedy_draws(logits, windows, penalties)
    return [Draw(tokens[i : i + 1], logprobs[i : i + 1], None) for i in positions]


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


RESERVED_AHEAD = 1024  # the most positions past its prompt a row decoding alone reserves at once (Engine.reach)


def is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_COUNT = 2**63 - 1  # the largest whole number an option may be (MLX's int64), as the server's and the command line's


def short(v) -> str:
    """A value for an error message: repr raises past 4300 digits, and a megabyte string is no message."""
    try:
        text = repr(v)
    except ValueError:
        return "a number too long to print"
    return text if len(text) <= 60 else text[:57] + "..."


def is_count(v) -> bool:
    """A whole number MLX can take: past 2**63 - 1 its step failed (std::bad_cast), the request ended empty."""
    return is_whole(v) and v <= MAX_COUNT


def is_finite(v) -> bool:
    """A finite int or float (math.isfinite(10**400) raises OverflowError: an int past a float's range is not)."""
    return (is_whole(v) and abs(v) <= sys.float_info.max) or (isinstance(v, float) and math.isfinite(v))


# A request's options and the values they may take: the server and the command line check theirs first, with
# their own messages; these are what reaches the engine from anywhere else (the Python API).
OPTION_RULES = {
    "temp": (is_finite, lambda v: v >= 0, "a number of at least 0"),
    "top_p": (is_finite, lambda v: 0 < v <= 1, "a number above 0 and at most 1"),
    "top_k": (is_count, lambda v: v >= 0, "a whole number from 0 (off) to 2**63 - 1"),
    "min_p": (is_finite, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "repetition_penalty": (is_finite, lambda v: v > 0, "a number above 0 (1 is off)"),
    "repetition_context": (is_count, lambda v: v >= 0, "a whole number from 0 to 2**63 - 1"),
    "presence_penalty": (is_finite, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
    "frequency_penalty": (is_finite, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
}


def check_options(request: Request) -> None:
    """A ValueError naming the first option of the request that is not of its kind or out of its range."""
    for name, (kind, within, expected) in OPTION_RULES.items():
        value = getattr(request.sampling, name)
        if not (kind(value) and within(value)):
            raise ValueError(f"{name} is {short(value)}: expected {expected}")
    if not is_whole(request.max_tokens):
        raise ValueError(f"max_tokens is {short(request.max_tokens)}: expected a whole number of at least 1")
    if request.seed is not None and not (is_whole(request.seed) and 0 <= request.seed < 2**64):  # as --seed
        raise ValueError(f"seed is {short(request.seed)}: expected a whole number from 0 to 2**64 - 1, or None for a "
                         "fresh one")
    if not isinstance(request.stops, tuple) or not all(isinstance(s, str) and s for s in request.stops):
        raise ValueError(f"stop is {short(request.stops)}: expected non-empty strings")


def work(engine_ref: Callable) -> None:
    """A worker's loop: step while there is work, else wait to be woken; at close, end every request and park for
    good (see Engine.start). It holds the engine only while it steps, so that an engine no one uses any more (a
    Python API model let go) is freed."""
    while (engine := engine_ref()) is not None and not engine.closing:
        busy, wake = engine.guarded_step(), engine.wake
        del engine
        if not busy:
            wake.wait(0.5)
            wake.clear()
    if engine is not None:
        engine.guarded_step()  # every request ends, cancelled
        engine.parked.set()
        del engine
    threading.Event().wait()


def close_if_alive(engine_ref: Callable) -> None:
    """At exit: the worker's last step taken before Python exits (see Engine.close)."""
    if (engine := engine_ref()) is not None:
        engine.close()


class Engine:
    """The model, its prompt cache and the rows being decoded; `step()` moves every row one token on.

    Driven by one thread: the caller's (`generate`), or a worker's (`start`, for the server).
    `submit` may be called from any thread.
    """

    def __init__(self, params, config, tokenizer, kernels: str = "reference", max_batch: int = 8,
                 max_kv_size: int | None = None, prompt_cache_bytes: int = 1 << 30, proposer=None,
                 num_draft: int = 8, chunk: int | None = None, step_rows: int | None = -1):
        if kernels not in q.KERNELS:
            raise ValueError(f"kernels is {kernels!r}: expected one of {', '.join(q.KERNELS)}")
        if max_kv_size is not None and not (is_count(max_kv_size) and max_kv_size >= 1):
            raise ValueError(f"max_kv_size is {short(max_kv_size)}: expected a whole number from 1 to 2**63 - 1, "
                             "or None")
        self.params, self.config, self.tokenizer, self.kernels = params, config, tokenizer, kernels
        self.max_batch, self.proposer, self.num_draft = max_batch, proposer, num_draft
        self.max_kv = max_kv_size or config.max_position_embeddings
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.dtype = params["model"]["norm"]["weight"].dtype
        self.chunk = chunk or q.prefill_chunk()  # prompt tokens per prefill step, cut at multiples of it
        # the prompt cache's unit: any token where rows are exact (then finished rows are kept too), else whole chunks
        self.granule = 1 if q.rows_exact(self.dtype, kernels, self.chunk) else self.chunk
        # decode and verifier steps with their products at multiples of this many rows (-1: the device's choice)
        self.step_rows = q.step_rows() if step_rows == -1 else step_rows
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.incoming: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[Row] = []  # admitted in order; the first is being prefilled
        self.rows: list[Row] = []  # the batch, in cache row order
        self.cache: dict | None = None  # the batch's cache: [B, K, S, D] per layer, offsets [B]
        self.pending: dict[Row, Draw] = {}  # the draws of the step sent off last, not yet handed out
        self.wake = threading.Event()
        self.closing = False
        self.parked = threading.Event()  # the worker, closing, computes nothing more
        self.worker: threading.Thread | None = None
        self.pipelined = True  # decode steps sent off before the last one's tokens are handed out (see start)
        self.grammar_vocab: grammar.GrammarTokenizer | None = None
        self.grammar_lock = threading.Lock()
        self.driver, self.drivers = None, 0  # the thread stepping for generate(), and its calls running (claim)
        self.driver_lock = threading.Lock()

    # -- the front ends' side ------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """A ValueError for a request that cannot run (the front ends turn it into their own error)."""
        check_options(request)
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(request.prompt) >= self.max_kv:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens, but the context holds {self.max_kv} "
                             "(and at least one token must be generated)")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= min(request.prompt) <= max(request.prompt) < self.config.vocab_size:  # in C: prompts are long
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0 to {self.config.vocab_size - 1})")
        if not all(0 <= t < self.config.vocab_size and -100 <= b <= 100 for t, b in request.logit_bias):
            raise ValueError(f"logit_bias maps token ids (0 to {self.config.vocab_size - 1}) to -100 .. 100")
        if not 0 <= request.top_logprobs <= 20:
            raise ValueError("top_logprobs must be from 0 to 20")

    def submit(self, request: Request, deliver: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request (any thread); its events go to deliver, or to the handle's queue."""
        self.check(request)
        handle = Handle(request, deliver)
        if request.constraint is not None:  # a grammar that cannot start is the caller's ValueError, here
            handle.grammar = grammar.start(request.constraint, self.grammar_tokenizer())
        self.incoming.put(handle)
        self.wake.set()
        return handle

    def generate(self, request: Request) -> Iterator[Event]:
        """Run one request in this thread, stepping the engine until it ends; its events as they come. With a
        worker (start), the worker steps it, beside any other thread's requests, and this thread reads its events.

        Closing the iterator early (or Ctrl-C) cancels the request and frees its row.
        """
        if self.worker is not None:
            yield from self.events(self.submit(request))
            return
        self.claim()
        try:
            handle = self.submit(request)
            try:
                while not handle.done.is_set():
                    self.step()
                    while not handle.queue.empty():
                        yield handle.queue.get()
                while not handle.queue.empty():
                    yield handle.queue.get()
            finally:
                if not handle.done.is_set():  # closed early, or interrupted (perhaps halfway through a step)
                    self.reset()
        finally:
            self.release()

    def events(self, handle: Handle) -> Iterator[Event]:
        """A submitted request's events as the worker delivers them, up to its last; closed early (or Ctrl-C), the
        request is cancelled and its row freed at the worker's next step."""
        try:
            while True:
                event = handle.queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    def claim(self) -> None:
        """Make this thread the one that steps the engine for generate(), or a RuntimeError if another does: two
        threads stepping one engine had raised (MLX's streams are per thread, the batch's lists changed under them)
        or, worse, answered garbage."""
        with self.driver_lock:
            if self.drivers and self.driver != threading.get_ident():
                raise RuntimeError("this model is generating in another thread: a model runs in one thread at a "
                                   "time; load one model per thread, or serve it (qwen2-scratch serve) to batch")
            self.driver, self.drivers = threading.get_ident(), self.drivers + 1

    def release(self) -> None:
        with self.driver_lock:
            self.drivers -= 1

    def reset(self, reason: str = "cancelled", error: str | None = None) -> None:
        """End every request (cancelled, or with an error) and empty the batch (after a step was interrupted or
        failed halfway)."""
        rows, self.rows, self.cache, self.pending = self.rows + self.waiting, [], None, {}
        self.waiting = []
        while not self.incoming.empty():
            rows.append(Row(self.incoming.get(), self.tokenizer, self.eos, 0))  # only to finish it
        for row in rows:
            if not row.handle.done.is_set():
                row.error = error
                self.finish(row, reason)

    def start(self) -> None:
        """Step in a worker thread of its own until close() (the server, the Python API): every thread's requests
        are then computed in that one thread, in one batch, and closed before the process exits."""
        mx.eval(self.params)  # MLX streams are per thread: leave the worker nothing to compute twice
        # requests now arrive while rows decode, and one arriving during step n would wait for step n + 1 too, sent
        # off before it: on the CPU, where a step is long (0.1-0.2 s) and Python's share of it 2-3%, each step is
        # waited for instead (a short request's first token while 8 stream: 1.3-1.5x its time alone against
        # 2.5-2.8x pipelined, `docs/engine.md`); on a GPU a step is short and mostly the host's: pipelined
        self.pipelined = mx.default_device() == mx.gpu
        # a daemon thread that never ends: MLX aborts the process at exit when a thread that ran
        # computations has ended (measured with MLX 0.32.4: "terminate called without an active exception")
        self.worker = threading.Thread(target=work, args=(weakref.ref(self),), name="engine", daemon=True)
        self.worker.start()
        atexit.register(close_if_alive, weakref.ref(self))

    def guarded_step(self) -> bool:
        """step(), for the worker: a step that fails ends every request with an "error" finish, not the thread
        (no request would end again)."""
        try:
            return self.step()
        except Exception as e:
            error = f"a generation step failed: {type(e).__name__}: {' '.join(str(e).split())}"
            say(f"error: {error}")
            self.reset("error", error)
            return True

    def close(self, wait: float = 10.0) -> None:
        """Stop: every request, running or waiting, ends as cancelled at the next step; with a worker, wait (up to
        `wait` seconds) until it has stepped for the last time and parked where it never wakes. The process may
        then exit. The worker had gone on stepping, or waking every half second, while Python exited: 3 server stops
        of one H200 test-suite run aborted ("terminate called without an active exception", exit -6; 2026-12-02), and
        a daemon thread that wakes during Python's finalization is ended there, with MLX's state in it (start() says
        why that aborts). Not reproduced on demand (a script's 5 stops mid-stream exited 0 before and after); the
        next whole run there, with this, passed."""
        self.closing = True
        self.wake.set()
        if self.worker is not None:
            self.parked.wait(wait)

    def grammar_tokenizer(self) -> grammar.GrammarTokenizer:
        """The tokenizer as the grammar engine sees it, built on the first constrained request (1-5 s)."""
        with self.grammar_lock:
            if self.grammar_vocab is None:
                self.grammar_vocab = grammar.grammar_tokenizer(self.tokenizer, self.config.vocab_size)
        return self.grammar_vocab

    @property
    def load(self) -> tuple[int, int]:
        """(rows decoding, requests waiting)."""
        return len(self.rows), len(self.waiting) + self.incoming.qsize()

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, decode, sample, retire: one step. False when there was nothing to do."""
        while not self.incoming.empty():
            handle = self.incoming.get()
            self.waiting.append(Row(handle, self.tokenizer, self.eos, 0, handle.grammar))
        for row in [r for r in self.waiting if r.handle.cancelled.is_set() or self.closing]:
            self.waiting.remove(row)
            self.finish(row, "cancelled")
        self.retire([r for r in self.rows if r.handle.cancelled.is_set() or self.closing], "cancelled")
        if not self.waiting and not self.rows:
            return False
        budget = self.chunk  # prompt tokens a step prefills: short prompts join together, a long one a chunk a step
        while self.waiting and len(self.rows) < self.max_batch and budget > 0:
            budget -= self.prefill_chunk(self.waiting[0])
        if self.rows:
            self.decode()
        return True

    def prefill_chunk(self, row: Row) -> int:
        """One chunk of row's prompt into its own cache (-> its tokens); the last draws a first token and joins."""
        tic = time.perf_counter()
        prompt = row.request.prompt
        if row.cache is None:
            reuse, layers = self.prompt_cache.lookup(row.request.cache_scope, prompt, self.granule)
            row.cache = q.new_cache(self.config, 1, self.dtype)
            if layers is not None:
                row.cache = {"layers": layers, "offset": mx.array([reuse], mx.int32)}
            row.reused = row.prefilled = reuse
        aligned = self.granule != 1  # where rows are exact, a chunk may start anywhere (a chat turn: one chunk)
        stop = min((row.prefilled // self.chunk + 1) * self.chunk if aligned else row.prefilled + self.chunk,
                   len(prompt))
        piece = mx.array(prompt[row.prefilled : stop])[None]
        logits, row.cache = q.prefill(self.params, self.config, piece, row.cache, self.kernels, self.chunk, aligned)
        row.prefilled = stop
        if stop < len(prompt):
            mx.eval(row.cache)
            row.t_prefill += time.perf_counter() - tic
            return piece.shape[1]
        first = draw(logits, row, row.window(), len(prompt))
        self.pretrace(row, first)
        mx.eval(first, row.cache)
        row.t_prefill += time.perf_counter() - tic
        if self.granule != 1:  # where rows are exact, retire keeps the whole row, answer included
            self.prompt_cache.store(row.request.cache_scope, prompt, row.cache["layers"], self.granule)
        self.waiting.remove(row)
        self.join(row)
        self.emit(row, [first])
        return piece.shape[1]

    def pretrace(self, row: Row, first: Draw) -> None:
        """Trace (and compile) the verifier step a row that will speculate takes first, without running it, while
        its prompt is being computed: a step of a new shape costs its trace once, 40-55 ms on the H200, which a
        one-shot command had paid inside its first verifier step (the plain step's first trace comes before the
        first token too). The step's outputs are dropped unevaluated."""
        if self.proposer is None or self.rows or row.grammar is not None:
            return
        mx.async_eval(first, row.cache)  # the prompt computes while the step is traced
        n = 1 + self.num_draft
        cache = q.reserve(row.cache, max(self.reach(row), len(row.request.prompt) + n + 1))
        q.compiled_decode_step(self.params, self.config, mx.zeros((1, n), mx.uint32), cache, self.kernels,
                               self.rows_for(n))

    def reach(self, row: Row) -> int:
        """Positions a row that decodes alone holds in its cache from the start: its prompt, its whole answer and a
        verifier step's proposals past it, at most RESERVED_AHEAD past the prompt; none beyond its prompt where
        finished rows are kept in the prompt cache (granule 1, the CPU: an entry's unused room would be memory the
        cache does not count). The cache grows in blocks (q.CACHE_BLOCK), and each new capacity is a new shape of
        the compiled step: a trace and, on a GPU, its graph built at its first evaluation, 40-50 ms on the H200
        each time, in the middle of a one-shot command's decode. Reserved at once, a one-shot command's steps keep
        one shape (and the verifier step traced during the prompt, `pretrace`, is the one it takes)."""
        if self.granule == 1:
            return len(row.request.prompt)
        answer = row.request.max_tokens + 1 + (self.num_draft if self.proposer is not None else 0)
        return len(row.request.prompt) + min(answer, RESERVED_AHEAD)

    def join(self, row: Row) -> None:
        """The row's cache becomes the batch's last row (alone, reserved to its `reach`)."""
        cache, row.cache = row.cache, None
        if self.cache is None:
            cache = q.reserve(cache, self.reach(row))
        else:
            batch = self.cache
            capacity = max(q.cache_capacity(batch), q.cache_capacity(cache))
            both = [q.reserve(c, capacity, block_size=1) for c in (batch, cache)]
            cache = {"layers": [(mx.concatenate([a[0], b[0]]), mx.concatenate([a[1], b[1]]))
                                for a, b in zip(both[0]["layers"], both[1]["layers"], strict=True)],
                     "offset": mx.concatenate([batch["offset"], cache["offset"]])}
        self.rows.append(row)
        self.cache = cache

    def decode(self) -> None:
        """One step for every row: a batched decode step, or a verifier step for a row alone that speculates.

        Pipelined (unless `start` chose otherwise): the step is sent off (mx.async_eval) before the previous
        step's tokens are handed out, so that the device computes while Python detokenizes and builds the next
        graph (as mlx_lm does). A row's next input is then its last draw, still an array, and so is the end of its
        penalties' window. Where the next step needs the last token's value (speculation's proposals, a grammar's
        mask) or a row's last draw ends it by length, the earlier draws are handed out first (`drain`) and the
        step waits for itself.
        """
        if (len(self.rows) == 1 and not self.waiting and self.proposer is not None and self.rows[0].grammar is None
                and self.rows[0].rest == 0 and self.may_propose(self.rows[0])):
            self.drain()
            return self.speculate(self.rows[0]) if self.rows else None
        for row in self.rows:  # a row backing off from speculation steps plainly, pipelined (see speculate)
            row.rest = max(row.rest - 1, 0)
        waits = not self.pipelined or any(row.grammar is not None for row in self.rows)
        if waits or any(self.ended_by_next(row) for row in self.pending):
            self.drain()
            if not self.rows:
                return
        ahead = [int(row in self.pending) for row in self.rows]  # a draw not yet handed out: one token further
        # uint32, the draws' own type: a step whose inputs are all ids from Python then has the type of one whose
        # inputs are draws, and is not traced again (int32 against uint32 made two traces of each step's shape)
        last = [self.pending[row].token if row in self.pending else mx.array([row.tokens[-1]], mx.uint32)
                for row in self.rows]
        tokens = mx.concatenate(last)[:, None]  # [B, 1]
        self.cache = q.reserve(self.cache, max(row.position + a for row, a in zip(self.rows, ahead, strict=True)) + 1)
        logits, self.cache = q.compiled_decode_step(self.params, self.config, tokens, self.cache, self.kernels,
                                                    self.rows_for(len(self.rows)))
        drawn = draw_rows(logits[:, -1], self.rows, ahead, tokens)
        if waits:
            mx.eval(drawn, self.cache)
            for row, d in zip(list(self.rows), drawn, strict=True):
                self.emit(row, [d])
            return
        mx.async_eval(drawn, self.cache)
        earlier, self.pending = self.pending, dict(zip(self.rows, drawn, strict=True))
        for row, d in earlier.items():
            if row in self.rows:
                self.emit(row, [d])  # may retire it: its draw just sent off is then dropped

    def may_propose(self, row: Row) -> bool:
        """Whether the proposer could propose after the row's next token (the one drawn last, perhaps not yet
        handed out): where it cannot, the step stays a plain one, pipelined, instead of waiting for that token."""
        return speculative.may_propose(self.proposer, row.tokens if row in self.pending else row.tokens[:-1])

    def ended_by_next(self, row: Row) -> bool:
        """Whether the row's next token ends it whatever it is (max_tokens, or the context)."""
        return row.generated + 1 >= row.request.max_tokens or row.position + 1 >= self.max_kv

    def drain(self) -> None:
        """Hand out the draws of the step sent off last (waiting for it)."""
        earlier, self.pending = self.pending, {}
        for row, d in earlier.items():
            if row in self.rows:
                self.emit(row, [d])

    def speculate(self, row: Row) -> None:
        """Verify k proposals in one step; keep those equal to the row's own draws, and the first draw that differs."""
        k = min(self.num_draft, row.request.max_tokens - row.generated - 1, self.max_kv - row.position - 1)
        proposal = self.proposer(row.tokens, k) if k > 0 else []
        # a short proposal is padded with dummies, whose draws are not looked at, to num_draft: every verifier step
        # then has one shape, traced once (each new length was a trace, 70-120 ms on the CPU, and the first time on
        # a machine a compile of MLX's fused CPU kernels, 1.4-3 s)
        verified = proposal + proposal[-1:] * (self.num_draft - len(proposal))
        pos = row.position
        self.cache = q.reserve(self.cache, pos + 1 + len(verified))
        tokens = mx.array([[row.tokens[-1], *verified]], mx.uint32)  # [1, k + 1], as a plain step's (decode)
        logits, self.cache = q.compiled_decode_step(self.params, self.config, tokens, self.cache, self.kernels,
                                                    self.rows_for(1 + len(verified)))
        drawn = verifier_draws(logits[0, : len(proposal) + 1], row, proposal)
        mx.eval(drawn)
        new = speculative.accept(proposal, [d.token.item() for d in drawn])
        if k > 0:  # a step that kept no proposal, none found or none right, backs off (speculative.BACKOFF_MAX)
            row.misses = 0 if len(new) > 1 else row.misses + 1
            row.rest = min(2 ** (row.misses - 1), speculative.BACKOFF_MAX) if row.misses else 0
        if proposal:
            row.proposed, row.accepted, row.verify_steps = (row.proposed + len(proposal),
                                                            row.accepted + len(new) - 1, row.verify_steps + 1)
        # the cache keeps the last token and the accepted proposals; the rest is rolled back
        self.cache = {"layers": self.cache["layers"], "offset": mx.array([pos + len(new)], mx.int32)}
        self.emit(row, drawn[: len(new)])  # the kept proposals are the draws at their positions

    def rows_for(self, n: int) -> int | None:
        """Query rows of a step over n tokens: n rounded up to whole step_rows, or None (the step as it comes)."""
        return None if self.step_rows is None else -(-n // self.step_rows) * self.step_rows

    # -- handing tokens out ----------------------------------------------------------------------

    def emit(self, row: Row, draws: list[Draw]) -> None:
        """Hand the row's new tokens (evaluated draws) out as events, and retire it if it ended."""
        now = time.perf_counter()
        if row.generated == 0:
            row.t_first = now
        row.t_last = now
        for d in draws:
            token, logprob = d.token.item(), d.logprob.item()
            top = tuple(zip(d.top[0].tolist(), d.top[1].tolist(), strict=True)) if d.top is not None else ()
            if row.grammar is not None and not self.advanced(row, token):
                return
            row.tokens.append(token)
            row.generated += 1
            ended = self.ending(row, token)
            if token in row.eos:
                text, hit = self.text(row, final=True)
            else:
                row.detokenizer.add_token(token)
                text, hit = self.text(row, final=ended is not None)
            ended = "stop" if hit else ended
            row.handle.deliver(Event(token, text, logprob, top_logprobs=top))
            if ended:
                self.retire([row], ended)
                return

    def advanced(self, row: Row, token: int) -> bool:
        """Move the row's grammar past token; if the grammar engine gives up (a schema that grows too complex as
        it goes), the row ends with its reason, and the other rows go on."""
        try:
            grammar.advance(row.grammar, token)
        except ValueError as e:
            row.error = str(e)
            self.retire([row], "grammar")
            return False
        return True

    def ending(self, row: Row, token: int) -> str | None:
        if token in row.eos:
            return "stop"
        if row.generated >= row.request.max_tokens:
            return "length"
        if row.position >= self.max_kv:
            return "context"
        return None

    @staticmethod
    def text(row: Row, final: bool) -> tuple[str, bool]:
        """The row's new printable text, stop strings cut out; at the end, everything held back."""
        if final:
            row.detokenizer.finalize()
        text, hit = row.stop.feed(row.detokenizer.last_segment)
        if final and not hit:
            text += row.stop.flush()
        return text, hit

    def retire(self, rows: list[Row], reason: str) -> None:
        """Drop rows from the batch (their cache rows go at once) and send their last event."""
        if not rows:
            return
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        for row in rows:
            self.pending.pop(row, None)  # a draw sent off after its last: dropped
        if self.granule == 1:  # its keys and values are those a prefill of its tokens would make: keep them
            for i, row in enumerate(self.rows):
                if row in rows:
                    self.prompt_cache.store(row.request.cache_scope, tuple(row.tokens[: row.position]),
                                            self.own_layers(i, row.position), 1)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.cache = q.take_rows(self.cache, mx.array(keep)) if keep else None
        for row in rows:
            self.finish(row, reason)

    def own_layers(self, i: int, n: int) -> list:
        """Row i's keys and values in arrays of its own: the batch's arrays when it is the only row (no copy, and
        none is made later: the batch lets them go), else a copy of its first n positions."""
        if self.cache["offset"].shape[0] == 1:
            return self.cache["layers"]
        layers = [(mx.contiguous(k[i : i + 1, :, :n]), mx.contiguous(v[i : i + 1, :, :n]))
                  for k, v in self.cache["layers"]]
        mx.eval(layers)  # copies now: the batch's arrays are not held
        return layers

    def finish(self, row: Row, reason: str) -> None:
        row.cache = None
        n = row.generated
        elapsed = row.t_last - row.t_first
        prefilled = len(row.request.prompt) - row.reused
        stats = Stats(prompt_tps=prefilled / row.t_prefill if row.t_prefill else 0.0,
                      generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                      time_to_first_token=(row.t_first - row.submitted) if n else 0.0,
                      peak_memory=mx.get_peak_memory() / 1e9, prefill_seconds=row.t_prefill, decode_seconds=elapsed,
                      proposed=row.proposed, accepted=row.accepted, verify_steps=row.verify_steps)
        usage = Usage(len(row.request.prompt), n, row.reused)
        row.handle.deliver(Event(None, "", None, reason, usage, stats, error=row.error))
        row.handle.done.set()
