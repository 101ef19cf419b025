"""The OpenAI-compatible server: the real openai client (and raw httpx for exact statuses and
bodies) against a live `qwen2-scratch serve` subprocess on 127.0.0.1, on the packaged model."""

import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import engine
import server
import weights
from conftest import COMMAND

KEY = "test-key-0123456789"
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
        cut, sent, hit = engine.StopMatcher(tuple(stops)), [], False
        for start in range(0, len(text), size):
            piece, hit = cut.feed(text[start : start + size])
            sent.append(piece)
            if hit:
                break
        assert hit and "".join(sent) == text[:first], (stops, size, sent)


def test_stop_text_holds_back_only_what_may_begin_a_stop():
    cut = engine.StopMatcher(("STOP",))
    assert cut.feed("abc ST") == ("abc ", False)
    assert cut.feed("x") == ("STx", False)
    assert cut.feed("S") == ("", False) and cut.flush() == "S"


def test_only_a_non_loopback_host_gets_the_warning():
    assert server.exposure_warning("127.0.0.1") is None
    assert server.exposure_warning("localhost") is None and server.exposure_warning("::1") is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert "anyone who can reach this machine can use the API" in server.exposure_warning(host)


# ---------------------------------------------------------------------------------------------
# A live server on the packaged model
# ---------------------------------------------------------------------------------------------


class Served:
    """`qwen2-scratch serve --port 0 --api-key KEY` in a subprocess; its stderr is kept."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([str(COMMAND), "serve", "--port", "0", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        end = time.time() + TIMEOUT
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", "".join(self.stderr))):
            assert self.proc.poll() is None and time.time() < end, f"the server did not start: {self.stderr}"
            time.sleep(0.2)
        self.url = found.group(1)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)

    def post(self, path, body=None, key=KEY, content=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers=headers, timeout=TIMEOUT)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def served(packaged):
    s = Served("--api-key", KEY)
    yield s
    assert s.stop() == 0, s.stderr
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


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
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1, "the same prompt again: all cached"


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
    first = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=MESSAGES, temperature=0,
                                           max_tokens=6)
    longer = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "Now the cube."}]
    second = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=longer, temperature=0,
                                            max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
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
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1}, "frequency_penalty"),
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
