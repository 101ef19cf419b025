"""The OpenAI-compatible server: the real openai client (and raw httpx or sockets for exact
statuses and bodies) against a live `qwen2-scratch serve` subprocess on 127.0.0.1, on the packaged
model for the text and on the tiny random model for the HTTP rules; the request parser and the
stop-string matcher without a server."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import COMMAND, run_cli
from qwen2s import engine, server, weights

KEY = "test-key-0123456789"
KEY2 = "another-key-9876543210"
TIMEOUT = 300  # seconds for any one request: the 2-core machine is shared, so generous but bounded
MESSAGES = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]


# ---------------------------------------------------------------------------------------------
# Without the model: stop strings and the exposure warning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stops", [["END"], ["xx", "lo w"], ["o"], ["d!"]])
def test_stop_text_cuts_at_the_first_stop_whatever_the_segments(stops):
    text = "hello world, the end! xx END"
    first = min(i for s in stops if (i := text.find(s)) >= 0)
    for size in (1, 2, 3, 7, len(text)):
        cut, sent, hit = engine.StopMatcher(stops), [], False
        for start in range(0, len(text), size):
            piece, hit = cut.feed(text[start : start + size])
            sent.append(piece)
            if hit:
                break
        assert hit and "".join(sent) == text[:first], (stops, size, sent)


def test_stop_text_holds_back_only_what_may_begin_a_stop():
    cut = engine.StopMatcher(["STOP"])
    assert cut.feed("abc ST") == ("abc ", False)
    assert cut.feed("x") == ("STx", False)
    assert cut.feed("S") == ("", False) and cut.flush() == "S"


def earliest_end_cut(text, stops):
    """The reference rule: the text before the stop string complete first (the longer one on a tie)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab", max_size=30), stops=st.lists(st.text("ab", min_size=1, max_size=5), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_stop_text_matches_the_reference_rule_whatever_the_segments(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher, sent, hit = engine.StopMatcher(stops), [], False
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, hit = matcher.feed(text[a:b])
        sent.append(piece)
        if hit:
            break
    if not hit:
        sent.append(matcher.flush())
    assert ("".join(sent), hit) == earliest_end_cut(text, stops)


def test_stop_text_is_linear_in_the_text_even_with_four_longest_stops():
    stops = ["a" * (server.MAX_STOP_CHARS - 1) + c for c in "bcde"]  # every "a" keeps each match alive
    matcher, sent, tic = engine.StopMatcher(stops), [], time.perf_counter()
    for _ in range(5000):  # 5000 tokens of 4 characters: the old matcher took seconds per token here
        text, hit = matcher.feed("aaaa")
        assert not hit and len(matcher.held) < server.MAX_STOP_CHARS
        sent.append(text)
    assert time.perf_counter() - tic < 5
    text, hit = matcher.feed("b")
    assert hit and "".join([*sent, text]) == "a" * (20000 - server.MAX_STOP_CHARS + 1)


# ---------------------------------------------------------------------------------------------
# The request parser: every JSON body parses or is a 4xx ApiError
# ---------------------------------------------------------------------------------------------

DEFAULTS = server.Defaults(sampling={"temp": 0.7, "top_p": 0.8}, vocab_size=300, max_tokens=64)
FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
          "max_tokens", "max_completion_tokens", "stop", "seed", "stream", "stream_options", "n", "logprobs",
          "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty", "response_format", "tools",
          "tool_choice"]
NUMBERS = st.one_of(st.integers(), st.sampled_from([10**400, -(10**400), 2**63, 2**64, 0, 1, -1, 5, 20, 21]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans())
JSON = st.recursive(st.none() | NUMBERS | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | JSON,
                                 "content": st.text(max_size=10) | JSON})
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                         JSON | st.lists(MESSAGE, max_size=3) | st.dictionaries(st.just("include_usage"), JSON),
                         max_size=8)


def parse(body, kind):
    """What a handler does with a body before the tokenizer: the messages or prompt, and the Options."""
    options = server.parse_options(body, kind, DEFAULTS)
    server.unsupported(options, body, frozenset())
    return (server.chat_messages(body) if kind == "chat" else server.completion_prompt(body)), options


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, kind=st.sampled_from(["chat", "text"]))
def test_any_json_body_parses_or_is_a_4xx(body, kind):
    body = json.loads(json.dumps(body))  # what read_json would hand over (NaN and huge integers survive)
    try:
        _, options = parse(body, kind)
    except server.ApiError as e:
        assert 400 <= e.status < 500 and "\n" not in e.message and len(e.message) < 400, e.message
        assert e.param is None or isinstance(e.param, str)
        return
    assert isinstance(options.sampling, server.q.Sampling) and 1 <= options.max_tokens <= server.MAX_INT
    assert all(math.isfinite(v) for v in options.sampling[:5]), options.sampling
    assert options.seed is None or 0 <= options.seed <= server.MAX_INT
    assert len(options.stops) <= server.MAX_STOPS and isinstance(options.stream, bool)


@settings(max_examples=200, deadline=None)
@given(temp=st.floats(0, 2), top_p=st.floats(0.01, 1), top_k=st.integers(0, 1000), max_tokens=st.integers(1, 10**6),
       stops=st.lists(st.text(min_size=1, max_size=20), max_size=4), seed=st.integers(0, 2**63 - 1),
       stream=st.booleans(), bias=st.dictionaries(st.integers(0, 299).map(str), st.floats(-100, 100), max_size=3))
def test_valid_fields_arrive_in_the_options_as_given(temp, top_p, top_k, max_tokens, stops, seed, stream, bias):
    body = {"prompt": "x", "temperature": temp, "top_p": top_p, "top_k": top_k, "max_tokens": max_tokens,
            "stop": stops, "seed": seed, "stream": stream, "logit_bias": bias, "logprobs": 3}
    if stream:
        body["stream_options"] = {"include_usage": True}
    o = server.parse_options(body, "text", DEFAULTS)
    assert o.sampling[:3] == (temp, top_p, top_k if top_k < 300 else 0)  # past the vocabulary: all kept
    assert (o.max_tokens, o.stops, o.seed, o.stream, o.include_usage) == (max_tokens, tuple(stops), seed, stream,
                                                                          stream)
    assert (o.logprobs, o.top_logprobs, dict(o.logit_bias)) == (True, 3, {int(k): v for k, v in bias.items()})


def test_the_defaults_fill_what_a_request_leaves_out():
    o = server.parse_options({"prompt": "x"}, "text", DEFAULTS)
    assert (o.sampling.temp, o.sampling.top_p, o.max_tokens, o.stops, o.seed) == (0.7, 0.8, 64, (), None)


@pytest.mark.parametrize("field, param", [
    ({"max_tokens": 10**400}, "max_tokens"), ({"temperature": 10**400}, "temperature"), ({"seed": 2**64}, "seed"),
    ({"top_k": 2**63}, "top_k"), ({"n": True}, "n"), ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": "usage"}, "stream_options"), ({"stream_options": {}}, "stream_options"),
    ({"stop": ["x" * (server.MAX_STOP_CHARS + 1)]}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"300": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"5": 100, "05": 100}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"presence_penalty": 10**400}, "presence_penalty"),
    ({"max_completion_tokens": 5, "max_tokens": "x"}, "max_tokens"),  # was ignored beside the newer name
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
])
def test_each_bad_field_is_a_400_naming_it(field, param):
    with pytest.raises(server.ApiError) as e:
        server.parse_options({"messages": MESSAGES, **field}, "chat", DEFAULTS)
    assert (e.value.status, e.value.param) == (400, param)


def test_a_field_the_engine_cannot_honour_is_refused_not_ignored():
    for body, name in [({"logprobs": True}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                       ({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
        options = server.parse_options(body, "chat", DEFAULTS)
        with pytest.raises(server.ApiError) as e:
            server.unsupported(options, body, frozenset())
        assert (e.value.status, e.value.param) == (400, name)
        server.unsupported(options, body, frozenset({name}))  # an engine that can: accepted


@pytest.mark.parametrize("kind, field", [
    ("text", {"echo": True}), ("text", {"best_of": 3}), ("text", {"best_of": True}), ("text", {"suffix": "}"}),
    ("text", {"tools": [{"type": "function", "function": {"name": "f"}}]}), ("text", {"tool_choice": "required"}),
    ("text", {"top_logprobs": 3}), ("chat", {"functions": [{"name": "f"}]}), ("chat", {"function_call": "auto"}),
])
def test_a_field_this_endpoint_does_not_honour_is_refused_not_ignored(kind, field):
    """These were answered 200 as if absent: completions with echo, best_of, a suffix or tools; chat with the legacy
    functions."""
    with pytest.raises(server.ApiError) as e:
        server.not_honoured(field, kind)
    assert (e.value.status, e.value.param) == (400, next(iter(field)))
    for neutral in ({"echo": False, "best_of": 1, "suffix": "", "tools": None}, {"functions": None}):
        server.not_honoured(neutral, "text" if "echo" in neutral else "chat")  # what changes nothing: accepted


# ---------------------------------------------------------------------------------------------
# Who may call: Host names (DNS rebinding)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, bind, extra, allowed", [
    ("127.0.0.1:8080", "127.0.0.1", (), True), ("localhost", "127.0.0.1", (), True),
    ("LOCALHOST.:80", "127.0.0.1", (), True), ("app.localhost:3000", "127.0.0.1", (), True),
    ("[::1]:8080", "127.0.0.1", (), True), ("127.5.5.5", "127.0.0.1", (), True),
    ("evil.example:8080", "127.0.0.1", (), False), ("", "127.0.0.1", (), False), (None, "127.0.0.1", (), False),
    ("localhost.evil.example", "127.0.0.1", (), False), ("evil@127.0.0.1", "127.0.0.1", (), False),
    ("127.0.0.1:8080/x", "127.0.0.1", (), False), ("2130706433", "127.0.0.1", (), False),
    ("192.168.1.5:8080", "127.0.0.1", (), False), ("192.168.1.5:8080", "192.168.1.5", (), True),
    ("192.168.1.5:8080", "0.0.0.0", (), True), ("myhost.lan", "0.0.0.0", (), False),
    ("myhost.lan:8080", "myhost.lan", (), True), ("box.example.org", "0.0.0.0", ("box.example.org",), True),
    ("a.example.org", "127.0.0.1", ("*.example.org",), True), ("example.org", "127.0.0.1", ("*.example.org",), False),
    ("anything.example", "127.0.0.1", ("*",), True), ("", "127.0.0.1", ("*",), False),
    ("box.example.org", "127.0.0.1", ("Box.Example.org.",), True), ("a.lan", "127.0.0.1", ("*.LAN",), True),
])
def test_host_allowed(host, bind, extra, allowed):
    assert server.host_allowed(host, bind, extra) is allowed


def test_only_a_non_loopback_host_gets_the_warning():
    assert server.exposure_warning("127.0.0.1") is None
    assert server.exposure_warning("localhost") is None and server.exposure_warning("::1") is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert "anyone who can reach this machine can use the API" in server.exposure_warning(host)


# ---------------------------------------------------------------------------------------------
# A live server on the packaged model
# ---------------------------------------------------------------------------------------------


class Served:
    """`qwen2-scratch serve --port 0 --api-key KEY` in a subprocess; its stderr is kept, with every thread's stack
    if it crashes (faulthandler: on the H200 a stop under a loaded suite ended the server by SIGSEGV, silently)."""

    def __init__(self, *args, env=None, hangup=signal.SIG_DFL):
        """hangup: SIGHUP's disposition in the server (SIG_IGN: as under nohup), whatever the tests' own is."""
        self.proc = subprocess.Popen([str(COMMAND), "serve", "--port", "0", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
                                     preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup))
        self.stderr: list[str] = []
        self.reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        end = time.time() + TIMEOUT
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", "".join(self.stderr))):
            assert self.proc.poll() is None and time.time() < end, f"the server did not start: {self.stderr}"
            time.sleep(0.2)
        self.url = found.group(1)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)

    def post(self, path, body=None, key=KEY, content=None, headers=None):
        sent = {"Authorization": f"Bearer {key}"} if key else {}
        if content is not None:
            sent["Content-Type"] = "application/json"
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers={**sent, **(headers or {})},
                          timeout=TIMEOUT)

    def get(self, path, key=KEY, headers=None):
        sent = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}{path}", headers={**sent, **(headers or {})}, timeout=TIMEOUT)

    def wait(self, timeout=60):
        """The exit code, once the process has ended and all its stderr is read: a crash's stacks come last, and
        a failure message built before the reader had them showed only the log's first line."""
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=TIMEOUT)
        return code

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        return self.wait()


@pytest.fixture(scope="module")
def served(packaged):
    s = Served("--api-key", KEY)
    yield s
    assert s.stop() == 0, s.stderr
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


def cacheable(n: int) -> int:
    """How many of n prompt tokens the served engine's prompt cache gives back: all on the CPU, whose rows are
    exact in float32 (the served default there), else whole prefill chunks."""
    chunk = q.prefill_chunk()
    return n if q.rows_exact(mx.float32, "reference", chunk) else n // chunk * chunk


def expected(packaged, messages=MESSAGES, max_tokens=12, raw=None):
    """What `generate --temp 0` gives for the same messages (or raw prompt): (text, prompt ids, report).

    As on the command line, the fields a request leaves out (here the repetition penalty) come
    from the model's generation_config.json.
    """
    folder, params, config, tokenizer = packaged
    sampling = weights.sampling_for(weights.sampling_defaults(folder), temp=0)
    ids = tokenizer.encode(raw) if raw else tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    events = list(engine.Engine(params, config, tokenizer).generate(engine.Request(tuple(ids), sampling, max_tokens)))
    last = events[-1]
    report = {"finish_reason": last.finish_reason, "generation_tokens": last.usage.completion_tokens}
    return "".join(e.text for e in events), ids, report


@pytest.mark.packaged_model
def test_models_and_health(served):
    assert [m.id for m in served.client().models.list().data] == ["qwen2.5-coder-0.5b-instruct"]
    assert httpx.get(f"{served.url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.packaged_model
def test_greedy_chat_equals_generate_streamed_or_not_with_usage(served, packaged):
    text, ids, report = expected(packaged)
    client = served.client()
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES, temperature=0,
                                       max_tokens=12)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if report["finish_reason"] == "stop" else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), report["generation_tokens"])
    assert r.usage.total_tokens == len(ids) + report["generation_tokens"]
    chunks = list(client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES,
                                                 temperature=0, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == report["generation_tokens"]
    # the same prompt again: all but its last token from the prompt cache on the CPU; elsewhere its whole chunks
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cacheable(len(ids) - 1)


@pytest.mark.packaged_model
def test_completions_continue_raw_text_as_generate_does(served, packaged):
    prompt = "def fibonacci(n):"
    text, ids, report = expected(packaged, raw=prompt, max_tokens=10)
    client = served.client()
    r = client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=prompt, temperature=0, max_tokens=10)
    assert r.choices[0].text == text and r.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=prompt, temperature=0,
                                         max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


@pytest.mark.packaged_model
def test_stop_cuts_before_the_stop_text(served, packaged):
    text, _, _ = expected(packaged)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"the greedy text is too short to cut: {text!r}"
    client = served.client()
    for stream in (False, True):
        r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES, temperature=0,
                                           max_tokens=12, stop=["never appears", stop], stream=stream)
        if stream:
            chunks = list(r)
            got, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (got, finish) == (text[: text.find(stop)], "stop"), (stop, text)


@pytest.mark.packaged_model
def test_an_extended_conversation_reuses_the_cached_prefix(served, packaged):
    client = served.client()
    chunk = q.prefill_chunk()  # 64 tokens on the CPU, 2,048 on a GPU (which reuses whole chunks only)
    system = [{"role": "system", "content": "You answer questions about Python. " * (chunk // 6 + 1)}]  # > a chunk
    first = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=system + MESSAGES,
                                           temperature=0, max_tokens=6)
    longer = system + MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                                  {"role": "user", "content": "Now the cube."}]
    second = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=longer, temperature=0,
                                            max_tokens=2)
    cached, before = second.usage.prompt_tokens_details.cached_tokens, first.usage.prompt_tokens
    if cacheable(before) == before:  # the first answer's tokens too, as far as its text encodes to them again
        assert before <= cached <= before + first.usage.completion_tokens - 1
    else:
        assert cached == cacheable(before) > 0
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.packaged_model
def test_four_clients_at_once_each_get_their_own_answer(served, packaged):
    questions = ["What is 2 + 3?", "Name a color.", "Say hello in French.", "What is the capital of Italy?"]
    conversations = [[{"role": "user", "content": x}] for x in questions]
    wanted = [expected(packaged, m, max_tokens=6)[0] for m in conversations]

    def ask(messages):
        r = served.client().chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=messages,
                                                    temperature=0, max_tokens=6)
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, conversations)) == wanted


@pytest.mark.packaged_model
def test_a_dropped_stream_frees_the_model_at_once(served):
    client = served.client()
    stream = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES, temperature=0,
                                            max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # drops the connection mid-answer
    tic = time.time()
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=[
        {"role": "user", "content": "Say yes."}], temperature=0, max_tokens=2)
    # 2000 more tokens would take at least 200 s even at this machine's best 10 tok/s
    assert r.choices[0].message.content and time.time() - tic < 100


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in response.text and "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.packaged_model
@pytest.mark.parametrize("field, param", [
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
])
def test_bad_values_are_400_in_openai_format(served, field, param):
    error = error_of(served.post("/v1/chat/completions", {"messages": MESSAGES, **field}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.packaged_model
def test_errors_have_their_status_and_openai_body(served):
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": 1e999}'):
        assert error_of(served.post("/v1/completions", content=raw), 400)["param"] == "temperature"
    assert error_of(served.post("/v1/chat/completions", content=b"{not json"), 400)["message"]
    too_long = error_of(served.post("/v1/completions", {"prompt": "hello " * 33000}), 400)
    assert too_long["code"] == "context_length_exceeded" and "32768" in too_long["message"]
    assert error_of(served.post("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}), 404)["code"] \
        == "model_not_found"
    assert error_of(served.post("/v1/nothing-here", {}), 404)["code"] == "not_found"
    big = b'{"prompt": "' + b"x" * server.MAX_BODY_BYTES + b'"}'
    assert error_of(served.post("/v1/completions", content=big), 413)["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES, top_p=2)


@pytest.mark.packaged_model
def test_the_api_key_is_required_when_set(served):
    assert error_of(served.post("/v1/chat/completions", {"messages": MESSAGES}, key=None), 401)["code"] \
        == "invalid_api_key"
    assert error_of(served.post("/v1/chat/completions", {"messages": MESSAGES}, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    r = served.post("/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    assert json.loads(httpx.get(f"{served.url}/health", timeout=30).text)["status"] == "ok"  # no key needed


# ---------------------------------------------------------------------------------------------
# A live server on the tiny random model: the HTTP rules
# ---------------------------------------------------------------------------------------------

TINY = "tiny"


@pytest.fixture(scope="module")
def tiny_served(tiny_folder):
    s = Served("--model", str(tiny_folder), "--api-key", KEY, "--served-model-name", f"{TINY},tiny-alias",
               "--allowed-origins", "https://app.example.org", "--allowed-hosts", "box.example.org",
               "--read-timeout", "2", "--max-tokens", "3")
    yield s
    assert s.stop() == 0, s.stderr
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


def raw_http(url, request: bytes, wait=0.0) -> bytes:
    """Send request bytes as they are (no client fixes them up), then read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        time.sleep(wait)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_trailing_slash_is_404_and_garbage_is_logged_once_a_minute(tiny_served):
    """A path with a trailing slash is a 404 in OpenAI's format (Starlette had redirected it, 307); requests that
    are not HTTP are each a 400, and uvicorn's warning for them a line a minute at most (a line each before)."""
    for method, path in (("post", "/v1/completions/"), ("post", "/v1/chat/completions/"), ("get", "/health/")):
        r = getattr(tiny_served, method)(path, {"prompt": "x"}) if method == "post" else tiny_served.get(path)
        assert error_of(r, 404)["code"] == "not_found", path
    logged = lambda: "".join(tiny_served.stderr).count("Invalid HTTP request received")  # noqa: E731
    before = logged()
    for _ in range(20):
        assert raw_http(tiny_served.url, b"\x16\x03\x01 not http\r\n\r\n").startswith(b"HTTP/1.1 400")
    time.sleep(0.5)  # the server's stderr read
    assert logged() - before <= 1


def test_invalid_requests_are_logged_once_a_minute_with_a_count():
    quiet = server.OncePerMinute("Invalid HTTP request received.", seconds=0.3)
    record = lambda message: logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, message, (), None)  # noqa: E731
    assert quiet.filter(record("Invalid HTTP request received."))
    assert not any(quiet.filter(record("Invalid HTTP request received.")) for _ in range(5))
    assert quiet.filter(record("something else"))
    time.sleep(0.35)
    later = record("Invalid HTTP request received.")
    assert quiet.filter(later) and later.getMessage().endswith("(and 5 more since the last such line)")


def test_hosts_not_this_servers_are_403(tiny_served):
    body = {"prompt": "hello", "max_tokens": 1}
    for host in ("evil.example:8080", "localhost.evil.example", "", "evil@127.0.0.1", "192.168.1.5"):
        assert error_of(tiny_served.post("/v1/completions", body, headers={"Host": host}), 403)["code"] \
            == "host_not_allowed", host
    assert error_of(tiny_served.get("/health", headers={"Host": "evil.example"}), 403)
    for host in ("localhost:1", "app.localhost", "127.0.0.1", "[::1]:8080", "box.example.org"):
        assert tiny_served.post("/v1/completions", body, headers={"Host": host}).status_code == 200, host
    for request in (b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.0\r\nHost:\r\n\r\n"):
        assert raw_http(tiny_served.url, request).startswith(b"HTTP/1.1 403"), request


def test_pages_of_other_origins_are_403_localhost_pages_get_cors(tiny_served):
    body = {"prompt": "hello", "max_tokens": 1}
    for origin in ("https://evil.example", "null", "http://localhost.evil.example", "http://127.0.0.1.evil.example"):
        r = tiny_served.post("/v1/completions", body, headers={"Origin": origin})
        assert error_of(r, 403)["code"] == "origin_not_allowed" and "access-control-allow-origin" not in r.headers
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:5173", "https://app.example.org"):
        r = tiny_served.post("/v1/completions", body, headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(f"{tiny_served.url}/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{tiny_served.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                      timeout=30)
    assert error_of(r, 403)["code"] == "origin_not_allowed"


def test_only_json_bodies_are_accepted(tiny_served):
    raw = json.dumps({"prompt": "hello", "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {"Content-Type": ""}
        assert error_of(tiny_served.post("/v1/completions", content=raw, headers=headers), 415)["code"] \
            == "unsupported_media_type", kind
    r = tiny_served.post("/v1/completions", content=raw, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_the_key_must_be_sent_exactly_as_bearer(tiny_served):
    for header in (KEY, f"bearer {KEY}", f"Bearer  {KEY}", f"Bearer {KEY}x", f"Basic {KEY}", "Bearer", ""):
        r = httpx.get(f"{tiny_served.url}/v1/models", headers={"Authorization": header}, timeout=30)
        assert error_of(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer", header
    for path in ("/metrics", "/tokenize"):
        assert tiny_served.post(path, {"content": "x"}, key=None).status_code in (401, 405)
    assert tiny_served.get("/metrics", key=None).status_code == 401


def test_a_body_that_trickles_in_is_cut_off(tiny_served):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    tic = time.time()
    answer = raw_http(tiny_served.url, head)  # the rest of the 100 bytes never comes
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in answer and time.time() - tic < 20, answer


def test_numbers_and_stream_options_beyond_reason_are_400_before_any_stream(tiny_served):
    for raw in (b'{"prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}", b'{"prompt": "x", "seed": 1e400}'):
        assert error_of(tiny_served.post("/v1/completions", content=raw), 400)["param"] in ("max_tokens", "seed")
    r = tiny_served.post("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": "usage"})
    assert error_of(r, 400)["param"] == "stream_options"
    for stop in (["a"] * 5, ["x" * 1025]):
        assert error_of(tiny_served.post("/v1/completions", {"prompt": "x", "stop": stop}), 400)["param"] == "stop"
    tic = time.time()  # four of the longest stops: answered as fast as none
    r = tiny_served.post("/v1/completions", {"prompt": "hello", "max_tokens": 50, "stop": ["a" * 1024] * 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 50 and time.time() - tic < 60
    for field in ({"logprobs": 6}, {"logit_bias": {"5": 101}}, {"response_format": {"type": "yaml"}}):
        error = error_of(tiny_served.post("/v1/completions", {"prompt": "x", **field}), 400)
        assert error["param"] == next(iter(field))


def test_names_defaults_tokenize_and_metrics(tiny_served):
    client = tiny_served.client()
    assert [m.id for m in client.models.list().data] == [TINY, "tiny-alias"]
    r = client.completions.create(model="tiny-alias", prompt="hello world")
    assert r.model == TINY and r.usage.completion_tokens == 3  # --max-tokens 3: a request that sets none
    assert error_of(tiny_served.post("/v1/completions", {"model": "other", "prompt": "x"}), 404)["code"] \
        == "model_not_found"
    tokens = tiny_served.post("/tokenize", {"content": "hello <|im_start|> world"}).json()["tokens"]
    assert 1 not in tokens and len(tokens) > 3, "the control token's text is text, not the control token"
    assert tiny_served.post("/detokenize", {"tokens": tokens}).json() == {"content": "hello <|im_start|> world"}
    assert r.usage.prompt_tokens == len(tiny_served.post("/tokenize", {"content": "hello world"}).json()["tokens"])
    for bad in ({"tokens": [10**9]}, {"tokens": "1 2"}, {"tokens": [1.5]}, {"tokens": [True]}):
        assert error_of(tiny_served.post("/detokenize", bad), 400)["param"] == "tokens"
    assert error_of(tiny_served.post("/tokenize", {"content": 5}), 400)["param"] == "content"

    def value(text, name):
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = tiny_served.get("/metrics").text
    # more than one prefill chunk of this device's (256 tokens on the CPU, 2048 on a GPU), as the served engine
    # has: its first chunk is cached by the first request
    long = "hello world " * (q.prefill_chunk() // 2)
    first = client.completions.create(model=TINY, prompt=long, max_tokens=1, temperature=0)
    r = client.completions.create(model=TINY, prompt=long, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > q.prefill_chunk()
    after = tiny_served.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    for name, grew in [("qwen2_scratch_prompt_tokens_total", 2 * r.usage.prompt_tokens),
                       ("qwen2_scratch_generated_tokens_total", 5),
                       ("qwen2_scratch_cached_prompt_tokens_total",
                        first.usage.prompt_tokens_details.cached_tokens + r.usage.prompt_tokens_details.cached_tokens),
                       ('qwen2_scratch_requests_total{endpoint="/v1/completions",status="200"}', 2)]:
        assert value(after.text, name) - value(before, name) == grew, name
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt as before: a cache hit
    assert value(after.text, "qwen2_scratch_prompt_cache_hits_total") >= 1
    assert "qwen2_scratch_queue_length 0.0" in after.text and "qwen2_scratch_prefill_seconds_bucket" in after.text


def test_a_client_that_leaves_a_long_answer_frees_the_model(tiny_served):
    """A non-streaming client that hangs up: its generation is cancelled, never finishing its 30,000 tokens (seen in
    the metrics, not in a time bound: a loaded GPU machine is slow to answer the next request either way)."""
    def metric(name):
        found = re.search(rf"^{re.escape(name)} (\S+)$", tiny_served.get("/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    def answered(status):
        return metric(f'qwen2_scratch_requests_total{{endpoint="/v1/completions",status="{status}"}}')

    generated, before = metric("qwen2_scratch_generated_tokens_total"), (answered("499"), answered("503"))
    with pytest.raises(httpx.TimeoutException):  # the tiny model never ends an answer by itself
        httpx.post(f"{tiny_served.url}/v1/completions", json={"prompt": "hello", "max_tokens": 30000},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=3)
    end = time.time() + TIMEOUT
    while metric("qwen2_scratch_requests_running") > 0 and time.time() < end:
        time.sleep(0.1)
    assert metric("qwen2_scratch_requests_running") == 0, "the generation went on after its client left"
    assert (answered("499"), answered("503")) == (before[0] + 1, before[1])  # the client's doing, not a server's 503
    r = tiny_served.post("/v1/completions", {"prompt": "hello", "max_tokens": 1})
    assert r.status_code == 200
    assert metric("qwen2_scratch_generated_tokens_total") - generated == 1  # the 30,000 were never finished


def test_serve_flags_set_the_default_sampling_and_the_template(tiny_folder, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}X{{ m['content'] }}{% endfor %}")
    s = Served("--model", str(tiny_folder), "--temp", "5", "--top-k", "0", "--chat-template", str(template))
    try:
        def chat(**fields):
            r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                "max_tokens": 12, **fields}, key=None)
            return r.json()

        hot = {chat(seed=seed)["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
        cold = {chat(seed=seed, temperature=0)["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
        assert len(hot) > 1 and len(cold) == 1  # --temp 5 samples; a request's own temperature wins
        assert chat()["usage"]["prompt_tokens"] == len(s.post("/tokenize", {"content": "Xhello"}, key=None)
                                                       .json()["tokens"])
    finally:
        assert s.stop() == 0, s.stderr


def test_serve_refuses_a_chat_template_that_is_not_one(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    for path in (str(broken), str(tmp_path / "missing.jinja")):
        r = run_cli("serve", "--chat-template", path, "--port", "0", timeout=120)
        assert r.returncode == 2 and "--chat-template" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_connection_that_begins_no_request_is_closed(tiny_served):
    host, port = tiny_served.url.removeprefix("http://").split(":")
    for first in (b"", b"GET /health HTTP/1.1\r\nHo"):  # silent, or headers that trickle and stop
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(first)
            tic = time.time()
            assert sock.recv(1024) == b"" and time.time() - tic < 3 * server.HEADER_SECONDS
    assert tiny_served.get("/health").status_code == 200


def test_logprobs_logit_bias_and_structured_output(tiny_served):
    """Log-probabilities in OpenAI's shapes (streamed or not, chat and completions), a logit bias that forces
    a token, and JSON output that parses and validates against its schema."""
    import jsonschema

    client = tiny_served.client()
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == max(t.logprob for t in c.top_logprobs)
        assert c.logprob <= 0 and c.logprob == c.top_logprobs[0].logprob  # greedy: the likeliest
        assert bytes(c.bytes).decode() == c.token
    chunks = list(client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=5, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    text = client.completions.create(model=TINY, prompt="hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == 3 and all(len(t) == 2 for t in text.choices[0].logprobs.top_logprobs)
    fox = tiny_served.post("/tokenize", {"content": "fox"}).json()["tokens"][0]
    forced = client.completions.create(model=TINY, prompt="hello", max_tokens=3, temperature=0,
                                       logit_bias={str(fox): 100})
    assert forced.choices[0].text == tiny_served.post("/detokenize", {"tokens": [fox] * 3}).json()["content"]
    schema = {"type": "object", "properties": {"animal": {"enum": ["fox", "dog"]}, "quick": {"type": "boolean"}},
              "required": ["animal", "quick"], "additionalProperties": False}
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=60, temperature=temperature,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "animal", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = tiny_served.post("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert error_of(bad, 400)["param"] == "response_format"


def test_tool_calls_forced_streamed_and_sent_back(tiny_served):
    """tools with tool_choice "required" or a named function: the answer is a call (constrained decoding),
    parsed into tool_calls with finish_reason "tool_calls", streamed as OpenAI's deltas; an assistant
    message with content null and tool_calls, and a tool message, are accepted in the history."""
    client = tiny_served.client()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=TINY, messages=MESSAGES, tools=tools, tool_choice=choice,
                                           max_tokens=80, temperature=0, parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls  # one call, then the grammar ends the answer
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome") and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(model=TINY, messages=MESSAGES, tools=tools, tool_choice="required",
                                                 max_tokens=80, temperature=0, stream=True, parallel_tool_calls=False))
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [t.function.name for t in streamed] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"}]
    r = client.chat.completions.create(model=TINY, messages=history, tools=tools, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    bad = tiny_served.post("/v1/chat/completions", {"messages": MESSAGES, "tools": tools,
                                                     "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert error_of(bad, 400)["param"] == "tool_choice"
    both = tiny_served.post("/v1/chat/completions", {"messages": MESSAGES, "tools": tools, "tool_choice": "required",
                                                      "response_format": {"type": "json_object"}})
    assert error_of(both, 400)["param"] == "tool_choice"


def test_a_request_starts_while_ten_others_stream(tiny_folder):
    """Every running request decodes at once (up to --parallel, 32 by default): a request that comes while ten
    others stream starts before any of them ends, however few threads the machine has (a thread per request waiting
    for its client to leave once filled the event loop's few worker threads, and later requests waited for others
    to end)."""
    s = Served("--model", str(tiny_folder), "--api-key", KEY)
    try:
        first, last, eleventh_ended = {}, {}, threading.Event()

        def one(i, max_tokens=4000):
            with s.client().chat.completions.create(model=str(tiny_folder), messages=MESSAGES, logprobs=True,
                                                    max_tokens=max_tokens, stream=True, temperature=0) as stream:
                for _chunk in stream:  # a chunk a token (the tiny model's text is held back as incomplete UTF-8)
                    first.setdefault(i, time.monotonic())
                    if eleventh_ended.is_set():
                        break  # read no further: closing the stream frees the row
            last[i] = time.monotonic()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(10)]
        for t in threads:
            t.start()
        end = time.monotonic() + TIMEOUT
        while len(first) < 10 and time.monotonic() < end and not last:
            time.sleep(0.01)
        assert len(first) == 10 and not last, "the ten did not all start before one ended"
        one(10, max_tokens=2)
        still_streaming = 10 - (len(last) - 1)
        eleventh_ended.set()
        for t in threads:
            t.join(TIMEOUT)
        assert still_streaming == 10, "it waited for the others to end"
        assert len(last) == 11, "a stream did not end once its client left"
    finally:
        assert s.stop() == 0, s.stderr


def test_under_nohup_a_hangup_leaves_the_server_serving(tiny_folder):
    """nohup ignores SIGHUP so that a server outlives its terminal: the server's own SIGHUP handling (stop, as on
    SIGTERM) is for a terminal that closed, not for this. Under nohup it had stopped, and exited 0."""
    s = Served("--model", str(tiny_folder), "--api-key", KEY, hangup=signal.SIG_IGN)
    try:
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        answer = s.client().completions.create(model=str(tiny_folder), prompt="hello", max_tokens=3, temperature=0)
        assert s.proc.poll() is None and answer.choices[0].finish_reason == "length"
    finally:
        assert s.stop() == 0, s.stderr


def test_ctrl_c_during_a_streamed_answer_stops_the_server_cleanly(tiny_folder):
    """Ctrl-C while a stream is running: exit code 0, no abort ("terminate called ...", exit -6), no traceback."""
    s = Served("--model", str(tiny_folder), "--api-key", KEY)
    stream = s.client().chat.completions.create(model=str(tiny_folder), messages=MESSAGES, max_tokens=5000,
                                                stream=True, temperature=0)
    next(iter(stream))  # the answer is under way
    code = s.stop()
    assert code == 0 and "terminate called" not in "".join(s.stderr), (code, "".join(s.stderr))
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM],
                                     [signal.SIGHUP]], ids=["ctrl-c", "ctrl-c twice", "sigterm", "sighup"])
def test_stopping_ends_the_running_streams_at_once(tiny_folder, signals):
    """Stopped while three answers stream: each ends now with the stopping error and [DONE], and the log holds no
    traceback. uvicorn waited 2 s for them, then cancelled each with a traceback; a second Ctrl-C, a traceback too."""
    s = Served("--model", str(tiny_folder), "--api-key", KEY)
    streams = [s.client().completions.create(model=str(tiny_folder), prompt="hello", max_tokens=20000, stream=True,
                                             temperature=0) for _ in range(3)]
    for stream in streams:
        next(iter(stream))  # each answer is under way
    def end(stream):
        try:
            list(stream)
        except openai.APIError as e:
            return e.message
    with ThreadPoolExecutor(3) as pool:
        ends = pool.map(end, streams)
        for sig in signals:
            s.proc.send_signal(sig)
        code = s.wait()
        ends = list(ends)
    print("".join(s.stderr))  # whole under "Captured stdout" where this fails (pytest shortens assertion messages)
    # not cut off after uvicorn's 2 s (on the H200 the server died by SIGSEGV: its log has every thread's stack)
    assert all("the server is stopping" in str(e) for e in ends), (ends, code)
    assert code == (0 if signals[0] == signal.SIGINT else -signals[0]), code  # by the signal, as conventional
    assert "Traceback" not in "".join(s.stderr) and "Cancel" not in "".join(s.stderr), "".join(s.stderr)


def test_an_ipv6_server_prints_a_url_that_works(tiny_folder):
    """--host ::1 printed http://::1:PORT/v1, which no client parses."""
    proc = subprocess.Popen([str(COMMAND), "serve", "--model", str(tiny_folder), "--host", "::1", "--port", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"on (\S+)/v1 ", proc.stderr.readline()).group(1)
        assert url.startswith("http://[::1]:") and httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_serve_speculates_and_answers_as_without(tiny_folder, tiny_served):
    """serve --speculate lookup (or --draft-model): a request alone is verified k tokens at a time, and
    its answer is the one the server without speculation gives."""
    s = Served("--model", str(tiny_folder), "--api-key", KEY, "--speculate", "lookup", "--num-draft", "4")
    try:
        for prompt in ("the quick brown fox the quick brown fox the quick", "hello world"):
            ours = s.client().completions.create(model=str(tiny_folder), prompt=prompt, max_tokens=24, temperature=0)
            plain = tiny_served.client().completions.create(model=TINY, prompt=prompt, max_tokens=24, temperature=0)
            assert ours.choices[0].text == plain.choices[0].text
    finally:
        assert s.stop() == 0, s.stderr


@pytest.mark.packaged_model
def test_the_listed_model_id_is_a_model_name_everywhere(packaged):
    listed = "qwen2.5-coder-0.5b-instruct"
    assert run_cli("pull", "--model", listed).stdout == run_cli("pull").stdout != ""


def test_the_outbox_hands_over_a_steps_events_in_order_with_one_wake_up():
    """Events put from the engine's thread reach each request's queue in order; all that come before the loop runs
    cost one wake-up of the loop (a step's 32 rows had woken it 32 times)."""
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        box, queues, wakes = server.Outbox(loop), [asyncio.Queue() for _ in range(3)], []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda f, *a: wakes.append(f == box.flush) or real(f, *a)
        putter = threading.Thread(target=lambda: [box.put(queues[i % 3], i) for i in range(30)])
        putter.start()
        putter.join()  # the loop blocked meanwhile (no await): nothing is taken before the last put
        got = [[await q.get() for _ in range(10)] for q in queues]
        putter = threading.Thread(target=box.put, args=(queues[0], "next"))  # after a flush, a new wake-up
        putter.start()
        putter.join()
        got.append(await queues[0].get())
        return got, sum(wakes)  # the Outbox's wake-ups only

    got, wakes = asyncio.run(main())
    assert got == [list(range(0, 30, 3)), list(range(1, 30, 3)), list(range(2, 30, 3)), "next"]
    assert wakes == 2


def test_a_stream_cancelled_while_its_request_is_submitted_still_frees_its_row():
    """A streamed client that leaves while its request is being submitted (in a thread: seconds for a first grammar)
    cancels the task awaiting the submission; the request the thread then submits is cancelled too (it had run to
    its last token with no one to read it: 200 quick hang-ups left 62 generations running and queued)."""
    import asyncio

    class Slow:  # an engine whose submit takes until told to go on
        def __init__(self):
            self.started, self.go, self.handles = threading.Event(), threading.Event(), []

        def submit(self, request, deliver):
            self.started.set()
            self.go.wait(TIMEOUT)
            self.handles.append(engine.Handle(request, deliver))
            return self.handles[-1]

    front = server.Engine.__new__(server.Engine)
    front.engine, front.outbox, front.streams = Slow(), None, set()
    options = server.Options(sampling=weights.sampling_for({}, temp=0), max_tokens=5)

    async def main():
        pieces = front.generate([1, 2], options, asyncio.Event())
        task = asyncio.ensure_future(pieces.__anext__())
        await asyncio.to_thread(front.engine.started.wait, TIMEOUT)
        task.cancel()  # the client left: Starlette cancels the stream's task
        with pytest.raises(asyncio.CancelledError):
            await task
        front.engine.go.set()
        for _ in range(100):
            if front.engine.handles:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert len(front.engine.handles) == 1 and front.engine.handles[0].cancelled.is_set()


def test_a_streamed_answer_with_tools_ends_with_its_usage(tiny_served):
    """stream_options.include_usage with tools: the usage chunk comes before [DONE] (it was made from an empty
    piece's chunks, which a tool-call parser has none of: an IndexError cut the stream short, a traceback logged)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = tiny_served.post("/v1/chat/completions", {"model": TINY, "messages": MESSAGES, "tools": tools, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    data = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and data[-1] == "[DONE]", r.text
    last = json.loads(data[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["object"] == "chat.completion.chunk"


def test_json_nested_past_the_recursion_limit_is_a_400(tiny_served):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001):
        assert "nested" in error_of(tiny_served.post("/v1/chat/completions", content=body), 400)["message"]


def test_a_client_that_leaves_before_its_body_arrives_is_not_a_server_error(tiny_served):
    """Headers promising a body, then a closed connection: nobody reads an answer, and the metrics count it as the
    client's (499), not as a 500 with an error line in the log."""
    def count(status):
        found = re.search(rf'^qwen2_scratch_requests_total{{endpoint="/v1/completions",status="{status}"}} (\S+)$',
                          tiny_served.get("/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count("500"), count("499")
    host, port = tiny_served.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"pro".encode())
    end = time.time() + TIMEOUT
    while count("499") < before[1] + 3 and time.time() < end:
        time.sleep(0.1)
    assert (count("500"), count("499")) == (before[0], before[1] + 3)


def test_a_client_that_reads_nothing_of_its_answer_is_dropped(tiny_folder):
    """A streamed answer whose client reads none of it (its buffers fill): the connection is dropped after the
    --write-timeout (2 s here) and the generation freed. It had held its socket and the rest of its answer for ever
    (a helper's campaign: +18 MB in 3 s for one such client, each one a socket of MAX_CONNECTIONS)."""
    served = Served("--model", str(tiny_folder), "--api-key", KEY, "--served-model-name", TINY, "--write-timeout", "2")

    def running():
        found = re.search(r"^qwen2_scratch_requests_running (\S+)$", served.get("/metrics").text, re.M)
        return float(found.group(1))

    host, port = served.url.removeprefix("http://").split(":")
    # 20 log-probabilities: a chunk of about 3 KB for every token (the tiny model's text is bytes that rarely make a
    # character), so that the socket's buffers fill in seconds (5 of them: a minute)
    body = json.dumps({"model": TINY, "messages": MESSAGES, "max_tokens": 30000, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    try:
        sock.connect((host, int(port)))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        end = time.time() + TIMEOUT
        while running() > 0 or time.time() < end - TIMEOUT + 1:  # the answer begins, and is dropped
            assert time.time() < end, "a client that reads nothing held its answer"
            time.sleep(0.2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received
        assert served.post("/v1/completions", {"model": TINY, "prompt": "hello", "max_tokens": 1}).status_code == 200
    finally:
        sock.close()
        assert served.stop() == 0, served.stderr
    assert "Traceback" not in "".join(served.stderr), "".join(served.stderr)


def test_a_lone_surrogate_in_a_string_is_a_400_not_a_500(tiny_served):
    """"\\ud800" is valid JSON but not text: the tokenizer raised a TypeError on it (a 500 with an error line)."""
    logged = len(tiny_served.stderr)
    for path, body in (("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 1}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                       ("/tokenize", b'{"content": "\\ud800x"}')):
        assert "surrogate" in error_of(tiny_served.post(path, content=body), 400)["message"], path
    time.sleep(0.5)  # the log's reader thread
    assert "error:" not in "".join(tiny_served.stderr[logged:])


def test_a_preflight_for_another_method_and_unparsable_http_are_json_errors(tiny_served):
    """Starlette's CORS and uvicorn answered these in plain text; and a malformed body sent after the answer (a 401
    for a wrong key) made uvicorn's own 400 raise: a traceback in the log."""
    r = httpx.options(f"{tiny_served.url}/v1/models", timeout=30,
                      headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "DELETE"})
    assert error_of(r, 400)["code"] == "method_not_allowed"
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for request in (b"GET /health HTTP/1.1\r\n\r\n", head + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
                    head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        answer = raw_http(tiny_served.url, request).decode()
        assert answer.startswith("HTTP/1.1 400") and json.loads(answer.partition("\r\n\r\n")[2])["error"], answer
    host, port = tiny_served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"Authorization: Bearer wrong\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")
        sock.sendall(b"zz\r\nnot a chunk\r\n")
        while sock.recv(65536):
            pass
    assert tiny_served.get("/health").status_code == 200
    time.sleep(0.5)  # the log's reader thread
    assert "Traceback" not in "".join(tiny_served.stderr), "".join(tiny_served.stderr)


def test_serve_refuses_an_api_key_a_request_cannot_send_exactly(tmp_path):
    """An empty key ("$UNSET") let `Authorization: Bearer` alone in; spaces or other bytes never match. An empty
    QWEN2_SCRATCH_API_KEYS is refused too (click reads it as unset: the server would have needed no key)."""
    for key in ("", " key", "key\t", "kéy", "two words"):
        r = run_cli("serve", "--api-key", key, "--port", "0", timeout=120)
        assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr, (key, r.stderr)
    for keys in ("", "  "):
        r = run_cli("serve", "--port", "0", timeout=120, env={"QWEN2_SCRATCH_API_KEYS": keys})
        assert r.returncode == 2 and "QWEN2_SCRATCH_API_KEYS" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_keys_from_the_environment_each_with_a_prompt_cache_of_its_own(tiny_folder):
    """QWEN2_SCRATCH_API_KEYS holds the keys (out of `ps`); a prompt sent with one key is never cached for another:
    cached_tokens would tell one client what another sent."""
    s = Served("--model", str(tiny_folder), env={"QWEN2_SCRATCH_API_KEYS": f"{KEY} {KEY2}"})
    try:
        # more than one prefill chunk (64 tokens on the CPU, 2,048 on a GPU, which reuses whole chunks only)
        prompt = "a document only the first key's client has seen " * (q.prefill_chunk() // 6)

        def cached(key):
            r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0}, key=key)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] > q.prefill_chunk()
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached(KEY) == 0
        assert cached(KEY2) == 0  # the same prompt, another key: not a hit
        assert cached(KEY2) > 0 and cached(KEY) > 0  # each key's own second request: a hit
        assert error_of(s.get("/v1/models", key="not-a-key"), 401)
        assert s.get("/v1/models", key=KEY2).status_code == 200
    finally:
        assert s.stop() == 0, s.stderr


def test_a_header_checked_once_is_refused_when_sent_twice(tiny_served):
    """Two Authorization or Origin headers: the guard would check one and a proxy or framework might act on the
    other."""
    for name, values in [("Authorization", (f"Bearer {KEY}", "Bearer wrong")),
                         ("Origin", ("http://localhost:3000", "https://evil.example")),
                         ("Content-Type", ("application/json", "text/plain"))]:
        headers = "".join(f"{name}: {v}\r\n" for v in values)
        body = b'{"prompt": "hi", "max_tokens": 1}'
        answer = raw_http(tiny_served.url,
                          f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert answer.startswith(b"HTTP/1.1 400") and b'"duplicate_header"' in answer, (name, answer[:300])
    assert tiny_served.get("/health").status_code == 200


def test_connections_beyond_the_limit_get_a_json_503(tiny_served):
    """uvicorn's own 503 was text/plain, and logged a line for each; a WebSocket upgrade is answered as HTTP,
    quietly."""
    host, port = tiny_served.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(server.MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # every one accepted
        answer = raw_http(tiny_served.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, answer
        assert json.loads(body)["error"]["code"] == "server_busy"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    answer = raw_http(tiny_served.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, close\r\n"
                                       b"Upgrade: websocket\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer
    time.sleep(0.5)  # the log's reader thread
    log = "".join(tiny_served.stderr)
    assert "Unsupported upgrade" not in log and "concurrency" not in log, log


def test_a_client_that_sends_its_next_request_then_leaves_frees_the_model(tiny_served):
    """uvicorn stops reading while it holds a pipelined request, so it saw no close: the generation of a client that
    sent its next request during an answer, then left, ran to its 30,000th token (seen in the metrics)."""
    def metric(name):
        found = re.search(rf"^{re.escape(name)} (\S+)$", tiny_served.get("/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    generated = metric("qwen2_scratch_generated_tokens_total")
    body = b'{"prompt": "hello", "max_tokens": 30000}'
    host, port = tiny_served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1)  # the answer under way, then its next request
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(0.5)
    end = time.time() + TIMEOUT
    while metric("qwen2_scratch_requests_running") > 0 and time.time() < end:
        time.sleep(0.2)
    assert metric("qwen2_scratch_generated_tokens_total") == generated  # cancelled: the 30,000 were never finished


def test_a_schema_the_grammar_engine_gives_up_on_is_a_400_and_the_server_goes_on(tiny_served):
    """A schema that refers to itself under a required key passes at submission, then llguidance gives up at the
    answer's first token: the ValueError ended the engine's thread, and no request was answered again."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}}
    error = error_of(tiny_served.post("/v1/chat/completions", body), 400)
    assert error["code"] == "grammar_too_complex" and "Too many items" in error["message"], error
    r = tiny_served.post("/v1/chat/completions", {**body, "stream": True})
    data = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(data[-2])["error"]["code"] == "grammar_too_complex" and data[-1] == "[DONE]", r.text
    r = tiny_served.post("/v1/completions", {"model": TINY, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_a_stopping_server_drops_what_a_stream_was_not_sent_and_ends_it_now():
    """Stopping, a stream whose client is behind (a fast GPU, a slow reader) skips the tokens still queued for it and
    sends the stopping error at once. It had sent its whole backlog first, past uvicorn's graceful timeout, which then
    cut the stream: "Connection error" instead of the stopping error (the H200's suite, SIGTERM, 2026-12-02)."""
    import asyncio

    class Behind:  # an engine that has made 500 tokens the client has not read yet, then stops
        closing = False

        def submit(self, request, deliver):
            self.deliver = deliver
            for i in range(500):
                deliver(engine.Event(i, "x", None))
            return engine.Handle(request, deliver)

    front = server.Engine.__new__(server.Engine)
    front.engine, front.outbox, front.streams = Behind(), None, set()
    options = server.Options(sampling=weights.sampling_for({}, temp=0), max_tokens=1000)

    async def main():
        pieces = front.generate([1, 2], options, asyncio.Event())
        assert (await pieces.__anext__()).text == "x"  # the answer is under way
        front.engine.closing = True
        front.engine.deliver(engine.Event(None, "", None, "cancelled"))  # as the closing engine ends each request
        sent = []
        with pytest.raises(server.ApiError, match="the server is stopping"):
            async for piece in pieces:
                sent.append(piece)
        return sent

    assert asyncio.run(main()) == []


def test_a_stopping_server_ends_its_streams_before_the_workers_next_step():
    """Stopping while the worker is inside a long step (a fresh GPU process building its kernels; the H200's suite
    under load, SIGTERM, 2026-12-03): each stream ends with the stopping error at once, not after that step, when
    uvicorn's graceful timeout had cut it ("Connection error"). The engine is told to close without waiting; the
    worker's last step is waited for after the streams have ended."""
    import asyncio

    class Stuck:  # an engine whose worker has sent one token and is now inside a step that does not end
        closing = False
        closed_with = []

        def submit(self, request, deliver):
            deliver(engine.Event(1, "x", None))
            return engine.Handle(request, deliver)

        def close(self, wait=10.0):
            self.closing = True
            self.closed_with.append(wait)

    front = server.Engine.__new__(server.Engine)
    front.engine, front.outbox, front.streams = Stuck(), None, set()
    options = server.Options(sampling=weights.sampling_for({}, temp=0), max_tokens=1000)

    async def main():
        streams = [front.generate([1, 2], options, asyncio.Event()) for _ in range(3)]
        for pieces in streams:
            assert (await pieces.__anext__()).text == "x"  # each answer is under way
        front.stop()
        for pieces in streams:
            with pytest.raises(server.ApiError, match="the server is stopping"):
                await asyncio.wait_for(pieces.__anext__(), 5)
        return front.streams

    assert asyncio.run(main()) == set()  # each stream let go of its queue
    assert Stuck.closed_with == [0]  # stop() does not wait for the worker


def test_a_megabyte_to_tokenize_does_not_stall_the_other_clients(tiny_served):
    """The tokenizer took 1-3 s over a megabyte body (digits are its slowest text), on the event loop: every other
    client waited meanwhile, /health and the streams too. It runs in a thread now (the tokenizer releases the GIL)."""
    digits = "1" * (server.MAX_BODY_BYTES - 200)
    waits, answered = [], []

    def big():
        start = time.monotonic()
        for path, body in [("/tokenize", {"content": digits}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": digits}]})]:
            answered.append(tiny_served.post(path, body).status_code)
        answered.append(time.monotonic() - start)

    thread = threading.Thread(target=big)
    thread.start()
    while thread.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{tiny_served.url}/health", timeout=TIMEOUT).status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.02)
    thread.join()
    assert answered[:2] == [200, 400]  # the chat's prompt is over the context
    assert max(waits) < answered[2] / 8, (max(waits), answered[2])  # the two took 4-5 s, /health 0.05 s at most


def test_a_schema_of_too_many_parts_is_refused_before_its_compile(tiny_served):
    """llguidance's compile of a schema grows with the square of its parts: a megabyte of 22,000 properties took it
    over a minute of a server thread, and ended in a panic (its message a backtrace). More than 10,000 objects and
    arrays are refused before it (grammar.MAX_SCHEMA_NODES; OpenAI allows 5,000 properties)."""
    huge = {"type": "object", "properties": {f"p{i}": {"enum": [f"v{i}a", f"v{i}b"]} for i in range(22000)}}
    response = tiny_served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "huge", "schema": huge}}})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == ("the JSON schema holds more than 10000 objects and arrays")
