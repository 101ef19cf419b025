"""The generation engine: one request, one answer (alone, in a batch, after a prompt-cache hit, in
prefill chunks), stop strings, limits, cancellation, interleaved prefill, the prompt cache's bounds,
and the packaged model in a batch of eight."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import threading

import mlx.core as mx
import pytest

from conftest import IdTokenizer, reference_model
from qwen2s import engine as E
from qwen2s import speculative

GREEDY, SAMPLED = q.Sampling(), q.Sampling(temp=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1)
CHUNK = 256  # prefill chunk of every engine here (a GPU's default, 2048, is longer than these prompts)


def model():
    _, params, config, _ = reference_model(tie=False, seed=0)
    return params, config


def prompts(n=8):
    """Prompts of lengths across chunk boundaries (the chunk is 256 on the CPU)."""
    lengths = [5, 17, 40, 300, 9, 3, 600, 12][:n]
    return [tuple((7 * i + 3 * j) % 290 + 3 for j in range(length)) for i, length in enumerate(lengths)]


def new_engine(params, config, tokenizer=None, **options):
    return E.Engine(params, config, tokenizer or IdTokenizer(), chunk=CHUNK, **options)


def tokens_of(events):
    return [e.token for e in events if e.token is not None]


def alone(params, config, request, **options):
    return tokens_of(new_engine(params, config, **options).generate(request))


def drained(handle) -> list:
    """Every event waiting in a handle's queue."""
    events = []
    while not handle.queue.empty():
        events.append(handle.queue.get())
    return events


def run_together(engine, requests):
    """Submit every request at once and step until all end: each one's tokens, and its final event."""
    handles = [engine.submit(r) for r in requests]
    while engine.step():
        pass
    return [(tokens_of(events), events[-1]) for events in map(drained, handles)]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_request_gives_the_same_tokens_alone_and_in_a_batch(sampling):
    params, config = model()
    requests = [E.Request(p, sampling, 24, seed=i) for i, p in enumerate(prompts())]
    expected = [alone(params, config, r) for r in requests]
    together = run_together(new_engine(params, config, max_batch=8), requests)
    assert [t for t, _ in together] == expected
    # and with a smaller batch, rows joining and leaving at other moments
    together = run_together(new_engine(params, config, max_batch=3), requests)
    assert [t for t, _ in together] == expected


def test_fixed_shape_steps_give_the_tokens_of_steps_as_they_come(on_cpu):
    """A GPU's fixed-shape steps (products at 64 rows there, 4 here), with zero rows padding the products and dummy
    proposals, change no token: on the CPU, whose rows are computed alone either way, the same tokens bit for bit
    as plain steps."""
    params, config = model()
    requests = [E.Request(p, s, 20, seed=i) for i, p in enumerate(prompts(6)) for s in (GREEDY, SAMPLED)]
    expected = [alone(params, config, r, step_rows=None) for r in requests]
    assert [alone(params, config, r, step_rows=4) for r in requests] == expected
    together = run_together(new_engine(params, config, max_batch=6, step_rows=4), requests)  # 8 rows, then 4
    assert [t for t, _ in together] == expected
    lookup = [alone(params, config, r, step_rows=4, proposer=speculative.Lookup(min_ngram=1), num_draft=3)
              for r in requests]
    assert lookup == expected


def test_a_request_gives_the_same_tokens_whatever_the_prompt_cache_holds():
    params, config = model()
    runner = new_engine(params, config)
    long = prompts()[6]  # 600 tokens: two whole chunks and a part
    fresh = alone(params, config, E.Request(long, SAMPLED, 16, seed=3))
    # a cache holding a shorter prefix, then the same prompt, then a longer one sharing it
    assert tokens_of(runner.generate(E.Request(long[:300], SAMPLED, 4, seed=1)))
    first = list(runner.generate(E.Request(long, SAMPLED, 16, seed=3)))
    again = list(runner.generate(E.Request(long, SAMPLED, 16, seed=3)))
    assert tokens_of(first) == tokens_of(again) == fresh
    assert first[-1].usage.cached_tokens == 256 and again[-1].usage.cached_tokens == 512
    extended = long + (5, 6, 7)
    assert tokens_of(runner.generate(E.Request(extended, GREEDY, 8))) == alone(params, config,
                                                                                  E.Request(extended, GREEDY, 8))


def test_where_rows_are_exact_the_prompt_cache_reuses_any_prefix_and_a_finished_answer(on_cpu):
    """On the CPU in float32 with chunks of 64 (q.rows_exact) the cache keeps a finished row's keys and values,
    its answer's included: a prompt that goes on from an answer (a chat's next turn) prefills only its new tokens,
    one that shares any prefix reuses all of it, and each gives the tokens a fresh engine gives."""
    params, config = model()
    runner = E.Engine(params, config, IdTokenizer(), chunk=q.EXACT_ROWS)
    assert runner.granule == 1
    first_prompt = prompts()[3]  # 300 tokens
    answer = tokens_of(runner.generate(E.Request(first_prompt, GREEDY, 12)))
    follow = first_prompt + tuple(answer) + (9, 8, 7)
    branch = first_prompt[:123] + (4, 5)
    for request, cached in ((E.Request(follow, SAMPLED, 10, seed=2), len(first_prompt) + len(answer) - 1),
                            (E.Request(branch, GREEDY, 10), 123)):
        events = list(runner.generate(request))
        assert events[-1].usage.cached_tokens == cached
        assert tokens_of(events) == tokens_of(E.Engine(params, config, IdTokenizer(), chunk=q.EXACT_ROWS)
                                              .generate(request))


def test_the_same_seed_gives_the_same_draws_and_another_seed_others():
    params, config = model()
    p = prompts()[1]
    a = alone(params, config, E.Request(p, SAMPLED, 24, seed=5))
    mx.random.seed(99)  # the process-wide generator moves nothing
    assert alone(params, config, E.Request(p, SAMPLED, 24, seed=5)) == a
    assert alone(params, config, E.Request(p, SAMPLED, 24, seed=6)) != a


@pytest.mark.parametrize("sampling", [SAMPLED, q.Sampling(temp=0.8, presence_penalty=0.5, frequency_penalty=0.3),
                                      q.Sampling(temp=1.0, top_p=0.7, min_p=0.05, repetition_penalty=1.3)])
def test_a_draw_is_the_models_functions_composed(sampling, monkeypatch):
    """`draw` runs as one compiled graph per sampling setting; its token and log-probability are those of the
    model's functions run one by one in the order the docs give: bias, penalties, grammar mask, sampler; the
    log-probability the model's, before all of them."""
    V = 300
    request = E.Request(tuple(range(40)), sampling, seed=4, logit_bias=((7, 2.5), (11, -1.0)))
    row = E.Row(E.Handle(request), IdTokenizer(), frozenset(), 0)
    allowed = mx.arange(V) % 3 != 1  # a grammar's mask, set by hand
    row.grammar = "a state"
    monkeypatch.setattr(E.grammar, "allowed", lambda state: allowed)
    for i in range(12):
        logits = mx.random.normal((1, V), key=mx.random.key(i)) * 3
        window = mx.array([[3, 7, 7, 11, 250, i]])
        drawn = E.draw(logits, row, window, 40 + i)
        x = logits.at[:, mx.array([7, 11])].add(mx.array([2.5, -1.0]))
        if sampling.repetition_penalty != 1:
            x = q.apply_repetition_penalty(x, window, sampling.repetition_penalty)
        if sampling.presence_penalty or sampling.frequency_penalty:
            x = q.apply_presence_and_frequency(x, window[0], sampling.presence_penalty, sampling.frequency_penalty)
        token = q.sample(E.grammar.mask_logits(x, allowed[None]), sampling, q.sampling_key(4, 40 + i))
        assert drawn.token.item() == token.item() and allowed[token.item()].item()
        assert drawn.logprob.item() == q.log_softmax(logits)[0, token.item()].item()


def test_greedy_rows_drawn_in_one_compiled_graph_are_drawn_as_eagerly():
    """A step's greedy rows are drawn by `compiled_greedy_draws`: the same tokens as `greedy_draws` run op by op, with
    and without penalties, and the same log-probabilities (on the CPU the same bits: its compiled kernels run the
    same operations)."""
    logits = mx.random.normal((5, 300), key=mx.random.key(8)) * 3
    windows = mx.random.randint(0, 300, (5, 21), key=mx.random.key(9)).astype(mx.int32)
    windows = mx.concatenate([mx.argmax(logits, axis=-1)[:, None].astype(mx.int32), windows[:, 1:]], axis=1)
    penalties = mx.array([[1.0], [1.05], [1.3], [1.0], [20.0]])  # each row's argmax in its window
    for w, p in ((None, None), (windows, penalties)):
        (tokens, logprobs), (eager_tokens, eager_logprobs) = E.compiled_greedy_draws(logits, w, p), E.greedy_draws(
            logits, w, p)
        assert tokens.tolist() == eager_tokens.tolist()
        if mx.default_device() == mx.cpu:
            assert mx.array_equal(logprobs, eager_logprobs)
        else:
            assert mx.allclose(logprobs, eager_logprobs, rtol=0, atol=1e-5)
    assert tokens.tolist() != E.greedy_draws(logits)[0].tolist()  # the penalties moved some argmax


def test_limits_end_a_request_with_their_reason():
    params, config = model()
    p = prompts()[0]
    events = list(new_engine(params, config).generate(E.Request(p, GREEDY, 7)))
    assert len(tokens_of(events)) == 7 and events[-1].finish_reason == "length"
    assert events[-1].usage == E.Usage(len(p), 7, 0)
    events = list(new_engine(params, config, max_kv_size=len(p) + 3).generate(E.Request(p, GREEDY, 50)))
    assert events[-1].finish_reason == "context" and len(tokens_of(events)) == 4  # 3 slots filled, +1 drawn
    free = alone(params, config, E.Request(p, GREEDY, 20))
    stop = free[5]
    events = list(E.Engine(params, config, IdTokenizer([stop])).generate(E.Request(p, GREEDY, 20)))
    assert tokens_of(events) == free[: free.index(stop) + 1] and events[-1].finish_reason == "stop"
    runner = new_engine(params, config, max_kv_size=10)
    with pytest.raises(ValueError, match="context holds 10"):
        list(runner.generate(E.Request(tuple(range(3, 13)), GREEDY, 5)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(runner.generate(E.Request((1, config.vocab_size), GREEDY, 5)))


def test_stop_strings_cut_the_text_and_end_the_request():
    params, config = model()
    p = prompts()[0]
    text = "".join(e.text for e in new_engine(params, config).generate(E.Request(p, GREEDY, 12)))
    words = text.split()
    stop = f" {words[4]} {words[5]}"
    events = list(new_engine(params, config).generate(E.Request(p, GREEDY, 12, stops=(stop, "zzz"))))
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 6


def test_stop_matching_is_incremental_and_holds_back_only_a_possible_start():
    m = E.StopMatcher(("abcd", "xy"))
    assert m.feed("hello a") == ("hello ", False)  # "a" may begin "abcd"
    assert m.feed("bx") == ("ab", False)  # "x" may begin "xy"
    assert m.feed("z") == ("xz", False)
    assert m.feed("..ab") == ("..", False)
    assert m.feed("cd and more") == ("", True)
    m = E.StopMatcher(("stop",))
    assert m.feed("no st") == ("no ", False) and m.flush() == "st"
    big = E.StopMatcher(("a" * 5000 + "b",) * 4)
    for _ in range(200):  # each piece is searched with a bounded tail: no quadratic growth
        out, hit = big.feed("a" * 100)
        assert not hit and len(big.held) <= 5000


def test_a_cancelled_request_frees_its_row_and_the_others_go_on():
    params, config = model()
    runner = new_engine(params, config, max_batch=4)
    requests = [E.Request(p, GREEDY, 30) for p in prompts(3)]
    expected = [alone(params, config, r) for r in requests]
    handles = [runner.submit(r) for r in requests]
    for _ in range(8):
        runner.step()
    handles[1].cancel()
    while runner.step():
        pass
    results = [drained(h) for h in handles]
    assert results[1][-1].finish_reason == "cancelled" and len(tokens_of(results[1])) < 30
    assert tokens_of(results[0]) == expected[0] and tokens_of(results[2]) == expected[2]
    assert runner.rows == [] and runner.cache is None


def test_close_returns_once_the_worker_has_stepped_for_the_last_time():
    """The server stops with close(), then the process exits: the worker must be out of MLX by then (on the H200 a
    process that exited mid-step aborted, exit -6). close() waits until the worker has ended every request and
    parked; it steps no more after that. The wait here is long: the step under way when close() comes is a fresh
    process's first decode step, slow on a GPU (its kernels built first, presumably; not timed): close()'s default
    10 s ran out on the H200 of 2026-12-03 in three runs, at 6fc6b9e and at 214dc62 alike."""
    params, config = model()
    runner = new_engine(params, config, max_batch=4)
    steps, step = [], runner.step
    runner.step = lambda: steps.append(1) or step()
    handles = [runner.submit(E.Request(p, GREEDY, 10_000)) for p in prompts(3)]
    runner.start()
    assert handles[0].queue.get(timeout=60).token is not None  # decoding
    runner.close(wait=120)
    assert runner.parked.is_set() and all(h.done.is_set() for h in handles)
    assert [drained(h)[-1].finish_reason for h in handles] == ["cancelled"] * 3
    taken = len(steps)
    handle = runner.submit(E.Request(prompts()[0], GREEDY, 5))  # after close: never stepped
    runner.wake.set()
    assert not handle.done.wait(1.0) and len(steps) == taken and runner.worker.is_alive()


def test_closing_the_generator_early_leaves_a_clean_engine():
    params, config = model()
    runner = new_engine(params, config)
    events = runner.generate(E.Request(prompts()[2], GREEDY, 30))
    next(events), next(events)
    events.close()
    assert runner.rows == [] and runner.waiting == [] and runner.cache is None
    assert tokens_of(runner.generate(E.Request(prompts()[2], GREEDY, 5))) == alone(
        params, config, E.Request(prompts()[2], GREEDY, 5))


def test_a_long_prompt_is_prefilled_between_decode_steps():
    """While a 600-token prompt is prefilled (three chunks), a running row still gets a token every step."""
    params, config = model()
    runner = new_engine(params, config)
    short = runner.submit(E.Request(prompts()[0], GREEDY, 40))
    runner.step()
    assert short.queue.qsize() == 1  # its prompt fits one chunk: its first token (a decode step is sent off)
    runner.submit(E.Request(prompts()[6], GREEDY, 5))
    for step in range(3):
        before = short.queue.qsize()
        runner.step()
        assert short.queue.qsize() == before + 1, f"step {step}: the running row waited for the prefill"
    assert len(runner.rows) == 2  # the long prompt's last chunk is in: it joined the batch


def test_short_prompts_are_admitted_together_up_to_a_chunk_of_tokens_a_step():
    """Five waiting short prompts (5+17+40+9+3 tokens) all join in one step; a long one still takes a chunk a step,
    and what is left of the step's chunk of tokens after it goes to the next prompt."""
    params, config = model()
    runner = new_engine(params, config, max_batch=8)
    short = [runner.submit(E.Request(p, GREEDY, 8)) for i, p in enumerate(prompts()) if i in (0, 1, 2, 4, 5)]
    runner.step()
    assert len(runner.rows) == 5 and all(h.queue.qsize() == 1 for h in short)  # first token (a decode step sent off)
    long = runner.submit(E.Request(prompts()[3], GREEDY, 8))  # 300 tokens: a whole chunk, then 44 of the next
    later = runner.submit(E.Request(prompts()[7], GREEDY, 8))  # 12 tokens, behind it
    runner.step()
    assert len(runner.rows) == 5 and not later.queue.qsize()
    runner.step()  # the long prompt's 44 tokens, then the 12
    assert len(runner.rows) == 7 and long.queue.qsize() == later.queue.qsize() == 1


def test_requests_submitted_from_many_threads_while_it_steps():
    """Clients submit from threads of their own while one thread steps (the server's worker runs in a
    process of its own in tests/test_server.py: MLX aborts a process whose computing thread outlives main)."""
    params, config = model()
    runner = new_engine(params, config, max_batch=4)
    requests = [E.Request(p, SAMPLED, 12, seed=i) for i, p in enumerate(prompts(6))]
    results, done = [[] for _ in requests], [threading.Event() for _ in requests]

    def client(i):
        def deliver(e):
            results[i].append(e)
            if e.finish_reason:
                done[i].set()
        runner.submit(requests[i], deliver)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    while not all(d.is_set() for d in done):
        if not runner.step():
            runner.wake.wait(0.1)
    assert [tokens_of(r) for r in results] == [alone(params, config, r) for r in requests]


def test_the_prompt_cache_is_bounded_shares_within_a_scope_and_drops_the_least_recently_used():
    params, config = model()
    runner = new_engine(params, config)
    base = prompts()[6]  # 600 tokens: 512 of them cached
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    runner.prompt_cache = E.PromptCache(max_bytes=2 * 512 * per_token)
    variants = [base[:520] + (i,) * 80 for i in range(3)]
    for v in variants[:2]:
        list(runner.generate(E.Request(v, GREEDY, 2, cache_scope="a")))
    assert runner.prompt_cache.bytes <= runner.prompt_cache.max_bytes
    # another scope never sees scope a's entries
    other = list(runner.generate(E.Request(variants[0], GREEDY, 2, cache_scope="b")))
    assert other[-1].usage.cached_tokens == 0
    # one entry more than fits: the least recently used goes
    again = list(runner.generate(E.Request(variants[1], GREEDY, 2, cache_scope="a")))
    assert again[-1].usage.cached_tokens == 512
    assert len(runner.prompt_cache.entries) == 2 and runner.prompt_cache.bytes <= runner.prompt_cache.max_bytes


def test_memory_is_given_back_after_many_requests():
    """Rows that end, or are cancelled, leave nothing behind: active memory after 60 mixed requests is what it
    was after 10."""
    params, config = model()
    runner = new_engine(params, config, max_batch=4, prompt_cache_bytes=0)

    def batch(n):
        for i in range(n):
            handles = [runner.submit(E.Request(p, SAMPLED, 6 + i % 5, seed=i)) for p in prompts(4)]
            runner.step()
            handles[i % 4].cancel()
            while runner.step():
                pass

    batch(3)
    mx.clear_cache()
    after_few = mx.get_active_memory()
    batch(15)
    mx.clear_cache()
    assert mx.get_active_memory() <= after_few * 1.1 + (1 << 20)


@pytest.mark.packaged_model
def test_the_packaged_model_answers_the_same_alone_and_in_a_batch_of_eight(packaged):
    _, params, config, tokenizer = packaged
    questions = ["Name three prime numbers below ten. Answer in one short sentence.", "What is 2 + 2?",
                 "Write a haiku about the sea.", "Say hello in French.", "What is the capital of Italy?",
                 "def add(a, b):", "List two colors.", "Why is the sky blue? One sentence."]
    ids = [tuple(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
           for t in questions]
    requests = [E.Request(p, GREEDY, 20) for p in ids]
    expected = [tokens_of(E.Engine(params, config, tokenizer).generate(r)) for r in requests]
    together = run_together(E.Engine(params, config, tokenizer, max_batch=8), requests)
    assert [t for t, _ in together] == expected


def test_logit_bias_moves_the_draws_and_the_events_report_the_model_distribution():
    params, config = model()
    p = prompts()[1]
    free = alone(params, config, E.Request(p, GREEDY, 8))
    forced = alone(params, config, E.Request(p, GREEDY, 8, logit_bias=((17, 100.0),)))
    assert forced == [17] * 8 and free != forced
    banned = alone(params, config, E.Request(p, GREEDY, 8, logit_bias=((free[0], -100.0),)))
    assert banned[0] != free[0]
    events = list(new_engine(params, config).generate(E.Request(p, SAMPLED, 6, seed=2, top_logprobs=5)))
    logits, _ = q.forward(params, config, mx.array([p]))
    expected = q.log_softmax(logits[0, -1])
    first = events[0]
    assert abs(first.logprob - expected[first.token].item()) < 1e-5
    ids = [t for t, _ in first.top_logprobs]
    assert ids == mx.argsort(-expected)[:5].tolist()
    assert all(abs(lp - expected[t].item()) < 1e-5 for t, lp in first.top_logprobs)
    # a token drawn and listed has one value: in its list, and as greedy rows without a list report it
    listed = [e for e in new_engine(params, config).generate(E.Request(p, GREEDY, 6, top_logprobs=3))
              if e.token is not None]
    plain = [e for e in new_engine(params, config).generate(E.Request(p, GREEDY, 6)) if e.token is not None]
    assert [(e.token, e.logprob) for e in listed] == [(e.token, e.logprob) for e in plain]
    assert all(e.logprob == dict(e.top_logprobs)[e.token] for e in listed + events[:-1] if e.token in
               dict(e.top_logprobs))
    with pytest.raises(ValueError, match="logit_bias"):
        new_engine(params, config).submit(E.Request(p, logit_bias=((config.vocab_size, 1.0),)))


def test_a_grammar_constrains_every_row_of_a_batch(tiny_folder):
    import json

    from qwen2s import grammar, weights

    params, config, tokenizer = weights.load(str(tiny_folder))
    runner = E.Engine(params, config, tokenizer, max_batch=4)
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    constraint = grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    prompt = tuple(tokenizer.encode("the quick brown fox"))
    requests = [E.Request(prompt, SAMPLED if i % 2 else GREEDY, 60, seed=i, constraint=constraint) for i in range(3)]
    requests.append(E.Request(prompt, GREEDY, 10))  # an unconstrained row beside them
    results = run_together(runner, requests)
    for text_tokens, last in results[:3]:
        value = json.loads(tokenizer.decode(text_tokens[:-1]))  # the last token is the end-of-sequence one
        assert set(value) == {"a", "b"} and value["a"] in ("x", "y") and isinstance(value["b"], bool)
        assert last.finish_reason == "stop"
    assert results[3][1].finish_reason == "length"  # this model never ends an answer by itself


def test_a_grammar_that_gives_up_mid_answer_ends_its_row_only(tiny_folder):
    """A schema that refers to itself under a required key passes the checks at submission, then llguidance gives
    up at its first token ("Too many items"): the ValueError ended the engine's thread (a server that never
    answered again). Now that row ends with finish_reason "grammar" and the message; the others go on."""
    from qwen2s import grammar, weights

    params, config, tokenizer = weights.load(str(tiny_folder))
    runner = E.Engine(params, config, tokenizer, max_batch=4)
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    constraint = grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    prompt = tuple(tokenizer.encode("the quick brown fox"))
    results = run_together(runner, [E.Request(prompt, GREEDY, 5, constraint=constraint), E.Request(prompt, GREEDY, 5)])
    (_, broken), (tokens, plain) = results
    assert broken.finish_reason == "grammar" and "Too many items" in broken.error and "\n" not in broken.error
    assert plain.finish_reason == "length" and len(tokens) == 5
    assert runner.rows == [] and runner.cache is None


def test_a_step_that_fails_ends_its_requests_not_the_engines_thread(monkeypatch):
    """Any exception in a worker's step ended its thread: every request then and after waited for ever."""
    params, config = model()
    runner = new_engine(params, config)
    real, failures = runner.prefill_chunk, [RuntimeError("the device\nis gone")]

    def prefill_chunk(row):
        if failures:
            raise failures.pop()
        return real(row)

    monkeypatch.setattr(runner, "prefill_chunk", prefill_chunk)
    first = runner.submit(E.Request(prompts()[0], GREEDY, 4))
    while runner.guarded_step():  # what the worker's thread runs (a thread here would abort pytest's exit: MLX)
        pass
    last = drained(first)[-1]
    assert last.finish_reason == "error" and last.error == "a generation step failed: RuntimeError: the device is gone"
    assert runner.rows == runner.waiting == [] and runner.cache is None
    second = runner.submit(E.Request(prompts()[0], GREEDY, 4))
    while runner.guarded_step():
        pass
    assert tokens_of(drained(second)) == alone(params, config, E.Request(prompts()[0], GREEDY, 4))


def test_the_prompt_cache_holds_at_most_its_number_of_entries():
    """A lookup compares a prompt with every entry: their number is bounded too (many short chats stay fast)."""
    cache = E.PromptCache(max_bytes=1 << 40, max_entries=3)
    layers = [(mx.zeros((1, 2, 8, 4)), mx.zeros((1, 2, 8, 4)))]
    for i in range(5):
        cache.store("", tuple(range(i * 10, i * 10 + 8)), layers, granule=4)
    assert len(cache.entries) == 3 and [k[1][0] for k in cache.entries] == [20, 30, 40]
    assert cache.lookup("", tuple(range(40, 50)), 4)[0] == 8 and cache.lookup("", tuple(range(0, 9)), 4)[0] == 0


def test_a_chats_lookup_compares_its_newest_entry_only(monkeypatch):
    """A chat's turns leave entries that are no prefix of the next (an answer's text encoded again, turns dropped):
    up to 64 of tens of thousands of tokens, each compared at every turn (16 ms a turn at 25,000 tokens). Newest
    first, an entry no longer than the best so far is not compared; the best is the same, and so is the tie: the
    entry used last."""
    cache = E.PromptCache(max_bytes=1 << 40, max_entries=64)
    layers = [(mx.zeros((1, 2, 8, 4)), mx.zeros((1, 2, 8, 4)))]
    history = tuple(range(3, 3 + 5000))
    for i in range(1, 40):  # each turn's entry drifts from the next prompt at its last answer
        cache.store("", history[: i * 100] + (1, 2), layers, granule=1)
    assert len(cache.entries) == 39
    compared = []
    common_prefix = q.common_prefix
    monkeypatch.setattr(q, "common_prefix", lambda a, b: compared.append(len(a)) or common_prefix(a, b))
    cache.store("", history[:4000], layers, granule=1)  # the newest turn: all of the prompt's history
    assert cache.lookup("", history[:4100], 1)[0] == 4000 and compared == [4000]
    assert cache.lookup("", history[:100] + (1, 2, 9), 1)[0] == 102  # an older entry is still found whole
    assert list(cache.entries)[-1][1] == history[:100] + (1, 2)  # and used last


def test_pipelined_and_waiting_steps_and_batched_greedy_draws_agree():
    """Rows run pipelined (a step is sent off before the last one's tokens are handed out) and greedy rows are
    drawn in one graph, a penalized one too (its window ends in the draw still on the device); a top_logprobs
    request is drawn by `draw`. The same tokens either way, and the same log-probabilities."""
    params, config = model()
    plain = E.Request(prompts()[1], GREEDY, 20, seed=1)
    listed = plain._replace(top_logprobs=2)
    penalized = E.Request(prompts()[2], GREEDY._replace(repetition_penalty=1.3), 20, seed=2)
    events = list(new_engine(params, config).generate(plain))
    alone_listed = list(new_engine(params, config).generate(listed))
    assert tokens_of(events) == tokens_of(alone_listed)
    assert [e.logprob for e in events] == pytest.approx([e.logprob for e in alone_listed], abs=1e-5)
    together = run_together(new_engine(params, config, max_batch=3), [plain, penalized, listed])
    assert [t for t, _ in together] == [tokens_of(events), alone(params, config, penalized), tokens_of(events)]


def test_a_worker_on_the_cpu_waits_for_each_step_with_the_same_tokens(monkeypatch):
    """With a worker (the server, the Python API) requests arrive while rows decode; on the CPU each step is then
    waited for, so that one arriving during step n is prefilled right after it, not after a step n + 1 sent off
    meanwhile (Engine.start). Caller-driven, steps are sent off ahead. The same tokens either way."""
    params, config = model()
    request = E.Request(prompts()[1], GREEDY._replace(repetition_penalty=1.3), 12, seed=1)
    sent_off = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: sent_off.append(threading.current_thread()) or async_eval(*a))
    caller = tokens_of(new_engine(params, config).generate(request))
    assert sent_off and len(caller) == 12
    sent_off.clear()
    engine = new_engine(params, config)
    engine.start()
    try:
        assert tokens_of(engine.generate(request)) == caller
    finally:
        engine.close()
    on_the_cpu = mx.default_device() == mx.cpu  # a GPU's steps are short: sent off ahead there too
    assert engine.pipelined != on_the_cpu and (sent_off == []) == on_the_cpu


def test_a_row_alone_traces_its_step_once_for_its_whole_answer_or_once_per_cache_block(monkeypatch, on_cpu):
    """The first decode step's input is an id from Python, the next ones draws still on the device: both uint32
    (int32 ids had made two traces of each shape). A row decoding alone holds room for its whole answer from the
    start (`Engine.reach`), so its step has one shape, traced once (each new capacity was a trace, and on a GPU a
    graph built, mid-answer); past RESERVED_AHEAD, or where the prompt cache keeps finished rows (rows exact: the
    CPU's 64-token chunks), the cache grows a block at a time, a trace each."""
    traces = []
    original = q.forward

    def counting(params, config, tokens, cache=None, kernels="reference"):
        traces.append((tokens.shape, tokens.dtype, q.cache_capacity(cache)))
        return original(params, config, tokens, cache, kernels)

    monkeypatch.setattr(q, "forward", counting)
    monkeypatch.setattr(q, "CACHE_BLOCK", 32)

    def step_traces(intermediate_size, **options):  # a config no other test uses: each of its traces counted here
        _, params, config, _ = reference_model(tie=False, hidden_size=48, num_attention_heads=6,
                                               num_key_value_heads=2, intermediate_size=intermediate_size,
                                               vocab_size=130)
        traces.clear()
        engine = E.Engine(params, config, IdTokenizer(), **{"chunk": CHUNK, **options})
        for sampling in (GREEDY, SAMPLED):
            assert len(tokens_of(engine.generate(E.Request(prompts()[1], sampling, 70, seed=3)))) == 70
        steps = [t for t in traces if t[0] == (1, 1)]  # the decode steps' traces (prefill's have the prompt's shape)
        assert {t[1] for t in steps} == {mx.uint32} and len(set(steps)) == len(steps), steps
        return [t[2] for t in steps]

    assert step_traces(80) == [96]  # 17 prompt tokens + 70 + 1 reserved: one capacity, three blocks of 32
    assert step_traces(88, chunk=q.EXACT_ROWS) == [32, 64, 96]  # rows exact: the cache grows as the row does
    monkeypatch.setattr(E, "RESERVED_AHEAD", 40)
    assert step_traces(96) == [64, 96]  # 17 + 40 reserved, then grown


def penalized_greedy_by_hand(params, config, prompt, n, penalty, context):
    """A greedy row with a repetition penalty, one step at a time: the window built from Python ids, the penalty
    and argmax in numpy, every step waited for (what the engine did before it pipelined penalized rows)."""
    import numpy as np

    tokens, cache = list(prompt), q.new_cache(config)
    logits, cache = q.prefill(params, config, mx.array([tokens]), cache)
    for _ in range(n):
        row = np.array(logits.reshape(-1, logits.shape[-1])[-1].astype(mx.float32))
        window = sorted(set(tokens[-context:]))
        row[window] = np.where(row[window] < 0, row[window] * np.float32(penalty), row[window] / np.float32(penalty))
        tokens.append(int(row.argmax()))
        cache = q.reserve(cache, len(tokens))
        logits, cache = q.decode_step(params, config, mx.array([[tokens[-1]]]), cache)
    return tokens[len(prompt):]


def test_penalized_rows_pipelined_and_batched_draw_what_a_step_by_step_loop_draws(monkeypatch):
    """Penalized rows no longer make the batch wait: a greedy row's window ends in its last draw still on the
    device, and greedy rows with their own penalties and windows are drawn in one graph. Each gives the tokens of a
    step-by-step loop that builds the window from Python ids; a sampled penalized row (drawn alone) gives its tokens
    alone, and those it gives when every row is drawn by `draw` and every step waited for."""
    params, config = model()
    greedy = [E.Request(p, GREEDY._replace(repetition_penalty=r, repetition_context=c), 16, seed=i)
              for i, (p, r, c) in enumerate(zip(prompts(3), (3.0, 1.3, 2.0), (2, 20, 1), strict=True))]
    sampled = E.Request(prompts()[4], SAMPLED._replace(repetition_context=4), 16, seed=9)
    together = run_together(new_engine(params, config, max_batch=5), [*greedy, sampled, E.Request(prompts()[5])])
    for (tokens, _), r in zip(together, greedy, strict=False):
        s = r.sampling
        assert tokens == penalized_greedy_by_hand(params, config, r.prompt, 16, s.repetition_penalty,
                                                  s.repetition_context)
    assert together[3][0] == alone(params, config, sampled)
    monkeypatch.setattr(E, "plainly_greedy", lambda row: False)
    monkeypatch.setattr(mx, "async_eval", mx.eval)
    assert [t for t, _ in run_together(new_engine(params, config, max_batch=5), [*greedy, sampled])] == [
        t for t, _ in together[:4]]


@pytest.mark.parametrize("sampling", [GREEDY._replace(repetition_penalty=1.5),
                                      SAMPLED._replace(presence_penalty=1.0, frequency_penalty=0.5)],
                         ids=["greedy, repetition", "sampled, presence and frequency"])
def test_a_penalized_row_steps_pipelined_with_its_last_draw_ending_its_window(sampling):
    """The penalties' window ends with the last draw, which a pipelined step has not handed out yet: it goes in as an
    array (`penalty_windows`), so a penalized row no longer makes the batch wait for each step (the chat's default
    sampling is penalized). Its tokens are those of steps that wait for each token (verifier steps, each token's
    value known before the next), for windows of 1, 5 and 20 tokens and the whole history (0)."""
    params, config = model()
    for context in (1, 5, 20, 0):
        request = E.Request(prompts()[2], sampling._replace(repetition_context=context), 24, seed=2)
        engine = new_engine(params, config)
        handle = engine.submit(request)
        engine.step()
        assert engine.pending, "the step was sent off before the row's last token was handed out"
        while engine.step():
            pass
        waited = alone(params, config, request, proposer=lambda tokens, k: [])
        assert tokens_of(drained(handle)) == waited, context
        unpenalized = sampling._replace(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        assert context == 1 or waited != alone(params, config, request._replace(sampling=unpenalized)), context


def test_a_row_that_ends_while_its_next_step_is_sent_off_leaves_the_others_exact():
    """A stop string ends one row at a token handed out after the next step was sent off with it: that step's draw
    for it is dropped, its cache row goes, and the other rows' tokens stay those they have alone."""
    params, config = model()
    first = E.Request(prompts()[0], GREEDY, 30, seed=0)
    text = "".join(e.text for e in new_engine(params, config).generate(first))
    stopped = first._replace(stops=(text[8:11],))
    others = [E.Request(p, GREEDY, 30, seed=i) for i, p in enumerate(prompts()[1:4], 1)]
    expected = [alone(params, config, r) for r in [stopped, *others]]
    assert len(expected[0]) < 30
    together = run_together(new_engine(params, config, max_batch=4), [stopped, *others])
    assert [t for t, _ in together] == expected
    assert together[0][1].finish_reason == "stop"


def test_the_prompt_cache_hands_back_an_entry_a_prompt_goes_on_from_without_copying_it():
    """A chat's next turn goes on from the whole last entry: it gets the very arrays, room to grow included (the
    row's first write copies them, so the entry never changes); a prompt sharing only part of an entry gets that
    part. Bytes are counted by the positions an entry holds."""
    cache = E.PromptCache(max_bytes=1 << 40)
    layers = [(mx.arange(2 * 16 * 4, dtype=mx.float32).reshape(1, 2, 16, 4), mx.zeros((1, 2, 16, 4)))]
    cache.store("", tuple(range(10)), layers, granule=1)
    assert cache.bytes == 10 * 2 * (2 * 4 * 4)
    reuse, whole = cache.lookup("", tuple(range(12)), 1)
    assert reuse == 10 and whole[0][0] is layers[0][0]
    reuse, part = cache.lookup("", (0, 1, 2, 3, 9), 1)
    assert reuse == 4 and part[0][0].shape == (1, 2, 4, 4) and mx.array_equal(part[0][0], layers[0][0][:, :, :4])
    written = q.write_cache(whole[0][0], mx.ones((1, 2, 1, 4)), q.cache_slots(mx.array([10]), (1, 2, 1, 4)))
    mx.eval(written)
    assert mx.array_equal(cache.lookup("", tuple(range(12)), 1)[1][0][0], mx.arange(128, dtype=mx.float32)
                          .reshape(1, 2, 16, 4)), "an entry never changes"
