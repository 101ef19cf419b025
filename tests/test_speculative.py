"""Speculative decoding against plain decoding, through the engine: the same tokens with every
proposer (right, wrong, running into the end of the context, holding an end-of-sequence id),
greedy and sampled, and one trace per (length, block)."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import re

import mlx.core as mx
import pytest

from conftest import STATS, IdTokenizer, invoke, reference_model, run_cli
from qwen2s import speculative as sp
from qwen2s.engine import Engine, Request

# ---------------------------------------------------------------------------------------------
# Proposers the tests control, and the two random models
# ---------------------------------------------------------------------------------------------


class Oracle:
    """Proposes what plain decoding generates, with every `wrong_every`-th proposal changed."""

    def __init__(self, prompt_len, truth, wrong_every=0, V=300):
        self.prompt_len, self.truth, self.wrong_every, self.V = prompt_len, truth, wrong_every, V

    def __call__(self, context, k):
        g = len(context) - self.prompt_len  # tokens generated so far
        out = list(self.truth[g : g + k])
        for i in range(len(out)):
            if self.wrong_every and (g + i) % self.wrong_every == self.wrong_every - 1:
                out[i] = (out[i] + 1) % self.V
        return out


class Wrong:
    """Proposes k fixed tokens, which include an end-of-sequence id."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, context, k):
        return self.tokens[:k]


def target():
    """A random untied model whose greedy output varies (tied random models repeat one token)."""
    _, params, config, _ = reference_model(tie=False, seed=0)
    return params, config


def run(params, config, prompt, propose=None, k=sp.NUM_DRAFT, eos=(), max_kv_size=None, sampling=q.Sampling(),
        max_tokens=24, seed=0):
    """(every token drawn, the final event) of one request through the engine."""
    runner = Engine(params, config, IdTokenizer(eos), max_kv_size=max_kv_size, proposer=propose, num_draft=k)
    events = list(runner.generate(Request(tuple(prompt), sampling, max_tokens, seed=seed)))
    return [e.token for e in events if e.token is not None], events[-1]


def plain(params, config, prompt, **options):
    return run(params, config, prompt, **options)


def speculative(params, config, prompt, propose, **options):
    return run(params, config, prompt, propose, **options)


def acceptance(last):
    return last.stats.accepted / max(last.stats.proposed, 1)


PROMPT = mx.random.randint(0, 300, (20,), key=mx.random.key(0)).tolist()


# ---------------------------------------------------------------------------------------------
# Proposers
# ---------------------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_longest_recent_ngram():
    context = [1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 6, 8, 8, 1, 2, 3]
    assert sp.lookup_proposal(context, 3) == [9, 9, 7]  # the trigram 1 2 3 beats the later bigram 2 3
    assert sp.lookup_proposal(context, 3, max_ngram=2) == [4, 5, 6]  # the latest "2 3" is followed by 4 5 6
    assert sp.lookup_proposal([5, 6, 7, 5, 6], 4) == [7, 5, 6]  # fewer than k follow: as many as there are
    assert sp.lookup_proposal([1, 2, 3, 4], 4) == []  # nothing repeats
    assert sp.lookup_proposal([7, 7, 7, 7, 7], 2) == [7, 7]  # a run: an occurrence with k tokens after it
    # the proposer the commands use matches trigrams only: a shorter match is mostly a wrong guess in free text
    assert sp.Lookup()([1, 2, 3, 9, 8, 2, 3], 3) == [] and sp.Lookup(min_ngram=2)([1, 2, 3, 9, 8, 2, 3], 3) == [9, 8, 2]
    assert sp.Lookup()([1, 2, 3, 9, 8, 1, 2, 3], 3) == [9, 8, 1]


def test_lookup_possible_is_false_only_where_no_next_token_lets_the_lookup_propose():
    """Property: where `lookup_possible(known, n)` says no, a lookup after known and any one more token finds
    nothing (so the engine need not wait for that token); ids past 255 cannot match across their bytes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = [0, 1, 2, 256, 513]

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(alphabet), max_size=14), st.integers(1, 4), st.integers(0, 2), st.integers(1, 4))
    def holds(known, min_ngram, more, k):
        if not sp.lookup_possible(known, min_ngram):
            for t in alphabet:
                assert sp.lookup_proposal(known + [t], k, min_ngram + more, min_ngram) == [], (known, t)

    holds()
    assert sp.lookup_possible([1, 2, 3, 1, 2], 3) and not sp.lookup_possible([1, 2, 3, 4, 5], 3)
    assert not sp.lookup_possible([1, 2, 9, 1], 3) and sp.lookup_possible([1, 9, 1, 9], 3)  # "9 1" is new; "1 9" not
    assert not sp.lookup_possible([256, 0, 7, 1], 2)  # 1's bytes sit inside 256's and 0's, not at a token's start
    assert sp.Lookup().possible([5, 6, 9, 5, 6]) and not sp.Lookup().possible([5, 6, 9, 6, 5])
    assert sp.may_propose(lambda context, k: [], [1]) and not sp.may_propose(sp.Lookup(), [1])


# ---------------------------------------------------------------------------------------------
# Greedy: token for token what plain greedy decoding gives
# ---------------------------------------------------------------------------------------------

N = 48


def proposers(params, config, truth):
    _, other, other_config, _ = reference_model(tie=False, seed=2)
    return {
        "lookup": (sp.Lookup(min_ngram=1), None),
        "draft, itself": (sp.DraftModel(params, config, config.vocab_size), (0.95, 1.0)),
        "draft, another model": (sp.DraftModel(other, other_config, config.vocab_size), (0.0, 0.2)),
        "mostly right": (Oracle(len(PROMPT), truth, wrong_every=7), (0.5, 0.95)),
        "mostly wrong": (Wrong([3, 2, 1, 0, 5, 6, 7, 8]), (0.0, 0.2)),
    }


def test_greedy_equals_plain_greedy_with_every_proposer():
    params, config = target()
    truth, plain_last = plain(params, config, PROMPT, max_tokens=N)
    for name, (propose, rate) in proposers(params, config, truth).items():
        for k in (1, 4, 8):
            tokens, last = speculative(params, config, PROMPT, propose, max_tokens=N, k=k)
            assert tokens == truth, f"{name}, k={k}: {tokens} != {truth}"
            assert last.finish_reason == "length" and last.usage == plain_last.usage
            if rate:  # the proposer is in the regime its name says
                assert rate[0] <= acceptance(last) <= rate[1], f"{name}, k={k}: acceptance {acceptance(last)}"
            if name == "mostly wrong":  # fruitless proposals make it fall back to plain steps
                assert last.stats.proposed <= 8 * k, last.stats
    # the lookup finds the output's loops here: it is right more often than not
    _, last = speculative(params, config, PROMPT, sp.Lookup(min_ngram=1), max_tokens=N)
    assert last.stats.proposed > 0 and (last.stats.accepted + last.stats.verify_steps) / last.stats.verify_steps > 1.3


@pytest.mark.parametrize("context", [4, 1000])
def test_penalized_greedy_equals_plain_penalized_greedy(context):
    """A greedy row under a repetition penalty (the packaged model's default) draws its verifier step's positions in
    one graph, each with its own window: the tokens of plain decoding; windows shorter than the context (1000: the
    whole sequence) are padded."""
    params, config = target()
    greedy = q.Sampling(temp=0, repetition_penalty=1.3, repetition_context=context)
    truth, _ = plain(params, config, PROMPT, max_tokens=N, sampling=greedy)
    assert truth != plain(params, config, PROMPT, max_tokens=N)[0]  # the penalty matters here
    for propose in (Oracle(len(PROMPT), truth), Oracle(len(PROMPT), truth, wrong_every=3), sp.Lookup(min_ngram=1)):
        tokens, last = speculative(params, config, PROMPT, propose, max_tokens=N, sampling=greedy, k=4)
        assert tokens == truth, f"{type(propose).__name__}: {tokens} != {truth}"
        assert last.stats.verify_steps > 0


SAMPLED = q.Sampling(temp=0.8, top_k=6, repetition_penalty=1.3, repetition_context=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_tokens_equal_plain_sampling_with_the_same_seed(seed):
    """A proposal is kept only where the row's own draw (its seed, its position) equals it: the same tokens. The
    prompt said twice, so that the lookup finds proposals in sampled text too (lookups finding none back off)."""
    params, config = target()
    prompt = PROMPT * 2
    truth, _ = plain(params, config, prompt, max_tokens=N, sampling=SAMPLED, seed=seed)
    assert truth != plain(params, config, prompt, max_tokens=N, sampling=SAMPLED, seed=seed + 10)[0]
    for propose in (Oracle(len(prompt), truth), Oracle(len(prompt), truth, wrong_every=3), sp.Lookup(min_ngram=1),
                    sp.DraftModel(params, config, config.vocab_size)):
        tokens, last = speculative(params, config, prompt, propose, max_tokens=N, sampling=SAMPLED, seed=seed, k=4)
        assert tokens == truth, f"{type(propose).__name__}: {tokens} != {truth}"
        assert last.stats.verify_steps > 0


@pytest.mark.parametrize("room", [1, 2, 5, 13])
def test_a_proposal_running_into_the_end_of_the_context(room):
    params, config = target()
    truth, _ = plain(params, config, PROMPT, max_tokens=N)
    limit = len(PROMPT) + room
    expected, plain_last = plain(params, config, PROMPT, max_tokens=N, max_kv_size=limit)
    tokens, last = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=N,
                               max_kv_size=limit, k=8)
    assert tokens == expected == truth[: room + 1]
    assert last.finish_reason == plain_last.finish_reason == "context"
    # and into max_tokens: no proposal is verified beyond it
    tokens, last = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=room, k=8)
    assert tokens == truth[:room] and last.finish_reason == "length"


def test_a_proposal_containing_an_end_of_sequence_id():
    params, config = target()
    truth, _ = plain(params, config, PROMPT, max_tokens=N)
    m = next(i for i in range(8, N) if truth[i] not in truth[:i])  # the first time it is drawn
    eos = truth[m]
    expected, plain_last = plain(params, config, PROMPT, max_tokens=N, eos=(eos,))
    # accepted: the oracle proposes the run up to and past the end-of-sequence id
    tokens, last = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=N, eos=(eos,), k=8)
    assert tokens == expected == truth[: m + 1]
    assert last.finish_reason == plain_last.finish_reason == "stop"
    # rejected: an end-of-sequence id the target does not pick ends nothing
    wrong_eos = 3
    assert wrong_eos not in truth
    tokens, last = speculative(params, config, PROMPT, Wrong([wrong_eos] * 8), max_tokens=N, eos=(wrong_eos,))
    assert tokens == truth and last.finish_reason == "length" and last.stats.proposed > 0


def test_the_verifier_traces_once_per_length_and_cache_block(monkeypatch, on_cpu):
    # a config no other test uses, so every trace of the compiled step is counted here; on the CPU, where
    # forward sees each step's own shape (a GPU's fixed-shape steps pad every verifier step to one length)
    _, params, config, _ = reference_model(tie=False, hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                           intermediate_size=72, vocab_size=120)
    traces = []
    original = q.forward

    def counting(params, config, tokens, cache=None, kernels="reference"):
        traces.append((tokens.shape[1], q.cache_capacity(cache)))
        return original(params, config, tokens, cache, kernels)

    monkeypatch.setattr(q, "forward", counting)
    monkeypatch.setattr(q, "CACHE_BLOCK", 32)
    k, prompt = 4, [1, 2, 3, 4, 5, 6] * 3
    tokens, _ = speculative(params, config, prompt, sp.Lookup(min_ngram=1), max_tokens=96, k=k)
    assert len(tokens) == 96
    assert len(set(traces)) == len(traces), f"traced twice: {traces}"
    assert all(n in (1, k + 1) for n, _ in traces), f"traces: {traces}"  # one verifier shape
    assert len(traces) < 96 // 2, f"{len(traces)} traces for 96 tokens"


def test_proposals_of_any_length_are_verified_at_one_shape(monkeypatch, on_cpu):
    """A proposal shorter than k is padded with dummies, so every verifier step has k + 1 tokens (one trace of the
    compiled step, where each new length was one), and the tokens are still plain decoding's."""
    params, config = target()
    prompt = [5, 6, 7, 8, 9] * 4
    plain, _ = run(params, config, prompt, max_tokens=30)
    lengths = []
    original = q.compiled_decode_step

    def recording(params, config, tokens, cache, kernels="reference", rows=None):
        lengths.append(tokens.shape[1])
        return original(params, config, tokens, cache, kernels, rows)

    monkeypatch.setattr(q, "compiled_decode_step", recording)
    oracle, proposed = Oracle(len(prompt), plain, wrong_every=5), []

    def varying(context, k):  # 1 to k tokens, by the context's length
        proposed.append((k, len(out := oracle(context, k)[: 1 + len(context) % k])))
        return out

    tokens, _ = run(params, config, prompt, varying, k=4, max_tokens=30)
    assert tokens == plain
    assert len({n for _, n in proposed}) >= 3, proposed  # proposals of several lengths
    verifier = [n for n in lengths if n > 1]
    # one more than the steps that verified: the engine traces the verifier step while the prompt is computed
    assert len(verifier) == 1 + len([n for _, n in proposed if n]) and set(verifier) == {5}, (lengths, proposed)
    assert lengths[0] == 5  # (Engine.pretrace), before any step
    assert min(k for k, _ in proposed) < 4  # the last steps, near max_tokens, propose fewer: padded all the same


def test_lookups_that_find_nothing_back_off_to_pipelined_plain_steps(monkeypatch):
    """A lookup that finds no proposal counts as a fruitless one: after n in a row, the next 2^(n-1) steps (at most
    BACKOFF_MAX) are plain decode steps, sent off pipelined, where every step had looked up and waited for the one
    before (free text, where most lookups find nothing, was slower than plain decoding on the H200)."""
    params, config = target()
    expected, _ = run(params, config, PROMPT, max_tokens=40)
    looked_up, sent_off = [], []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: sent_off.append(1) or async_eval(*a))
    tokens, last = run(params, config, PROMPT, lambda context, k: looked_up.append(len(context)) or [],
                       max_tokens=40)
    assert tokens == expected and last.stats.proposed == 0
    # 39 steps after the prefill's token: lookups at steps 1, 3, 6, 11, 20 and 37 (backing off 1, 2, 4, 8, 16)
    assert [n - len(PROMPT) for n in looked_up] == [1, 3, 6, 11, 20, 37]
    assert len(sent_off) >= 39 - 6 - 5  # the rest pipelined (a step before a lookup waits for itself)
    found = []  # a lookup that keeps proposals resets the backoff: one in every step
    oracle = Oracle(len(PROMPT), expected)
    tokens, last = run(params, config, PROMPT, lambda c, k: found.append(len(c)) or oracle(c, k), max_tokens=40)
    assert tokens == expected and acceptance(last) == 1 and len(found) == last.stats.verify_steps


class Impossible:
    """A lookup that says it can never propose, counting the lookups made all the same."""

    def __init__(self):
        self.looked_up = 0

    def __call__(self, context, k):
        self.looked_up += 1
        return []

    def possible(self, known):
        return False


def test_a_lookup_that_cannot_propose_never_makes_a_step_wait(monkeypatch):
    """Where the proposer says no proposal could follow the next token (`possible`), the engine neither looks up
    nor waits for that token: every step is a plain one, sent off pipelined, and the tokens are plain decoding's."""
    params, config = target()
    expected, _ = run(params, config, PROMPT, max_tokens=40)
    sent_off = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: sent_off.append(1) or async_eval(*a))
    proposer = Impossible()
    tokens, last = run(params, config, PROMPT, proposer, max_tokens=40)
    assert tokens == expected and proposer.looked_up == 0 and last.stats.verify_steps == 0
    plain_sent_off = len(sent_off)
    sent_off.clear()
    run(params, config, PROMPT, max_tokens=40)
    # as many steps sent off as plain decoding sends, and the prompt, computed while the verifier is traced
    assert plain_sent_off == len(sent_off) + 1 and len(sent_off) >= 30


# ---------------------------------------------------------------------------------------------
# The packaged model
# ---------------------------------------------------------------------------------------------

CODE = '''def moving_average(values, window):
    result = []
    total = 0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
PACKAGED_PROMPTS = {  # name: (text, chat-templated)
    "copying code": (CODE + "\n\n# The same function once more, unchanged:\n\n", False),
    "a question": ("Why is the sky blue? Answer in two sentences.", True),
}


@pytest.mark.packaged_model
@pytest.mark.parametrize("name", PACKAGED_PROMPTS)
def test_greedy_on_the_packaged_model_equals_plain_greedy(packaged, name):
    _, params, config, tokenizer = packaged
    text, templated = PACKAGED_PROMPTS[name]
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
              if templated else tokenizer.encode(text))
    eos = tuple(tokenizer.eos_token_ids)
    truth, _ = plain(params, config, prompt, max_tokens=40, eos=eos)
    tokens, last = speculative(params, config, prompt, sp.Lookup(min_ngram=1), max_tokens=40, eos=eos)
    assert tokens == truth, f"lookup:\n{tokenizer.decode(tokens)}\n!=\n{tokenizer.decode(truth)}"
    if name == "copying code":  # most proposals are right
        assert acceptance(last) > 0.5 and (last.stats.accepted / last.stats.verify_steps) > 1, last.stats
    tokens, last = speculative(params, config, prompt, sp.DraftModel(params, config, config.vocab_size),
                               max_tokens=16, eos=eos, k=4)
    assert tokens == truth[:16] and acceptance(last) > 0.9  # drafting for itself: almost all accepted


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

SPECULATIVE_STATS = STATS.removesuffix(")?") + ")"  # the speculative part required


def test_generate_speculating_prints_what_plain_greedy_prints(tiny_folder):
    base = ["generate", "--model", str(tiny_folder), "--raw", "-p", "the quick brown fox", "--max-tokens", "30"]
    plain_run = invoke(*base, "--speculate", "none")
    assert plain_run.exit_code == 0, plain_run.output
    for extra in (["--speculate", "lookup"], ["--speculate", "draft", "--draft-model", str(tiny_folder)],
                  ["--draft-model", str(tiny_folder), "--num-draft", "3"]):
        run = invoke(*base, *extra)
        assert run.exit_code == 0, run.output
        assert run.stdout == plain_run.stdout
        assert re.fullmatch(SPECULATIVE_STATS, run.stderr.strip().splitlines()[-1]), run.stderr


@pytest.mark.parametrize("args,words", [
    (["--speculate", "draft"], "--draft-model"),
    (["--speculate", "lookup", "--draft-model", "X"], "--speculate draft"),
    (["--speculate", "maybe"], "maybe"),
    (["--num-draft", "0"], "--num-draft"),
    (["--num-draft", "64"], "--num-draft"),  # k + 1 rows in one product: at most 64 keep a row's bits
])
def test_speculation_flags_are_checked(tiny_folder, args, words):
    run = invoke("generate", "--model", str(tiny_folder), "-p", "hi", *args)
    assert run.exit_code == 2 and words in run.output and "Traceback" not in run.output, run.output


def test_chat_speculating_answers_as_plain_chat(tiny_folder):
    lines = "the quick brown\nhello world\n"
    base = ["chat", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "20"]
    plain_run = invoke(*base, "--speculate", "none", input=lines)
    run = invoke(*base, "--speculate", "draft", "--draft-model", str(tiny_folder), input=lines)
    assert plain_run.exit_code == run.exit_code == 0, run.output
    assert run.stdout == plain_run.stdout
    assert len(re.findall(SPECULATIVE_STATS, run.stderr)) == 2


def test_bench_speculative_end_to_end_on_a_tiny_model(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", str(tiny_folder), "--speculative", "--num-draft", "2,3", "--trials", "1",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["verifier_cost"]) == {"2", "3"} and all(v > 0 for v in report["verifier_cost"].values())
    assert set(report["workloads"]) == {"code edit", "question"}
    for rows in report["workloads"].values():
        assert set(rows) == {"plain", "lookup k=2", "lookup k=3"}
        assert all(row["decode"] > 0 for row in rows.values()), rows
        # the same tokens bit for bit (docs/engine.md): a GPU's fixed-shape steps keep it there too
        assert all(row["same_as_plain"] for row in rows.values()), rows
        assert 0 <= rows["lookup k=3"]["acceptance"] <= 1 and rows["lookup k=3"]["tokens_per_step"] >= 1
    assert "verifier step over k+1 tokens / decode step: k=2:" in result.stdout
    assert re.search(r"code edit\s+lookup k=3\s+\d+\.\d\d tok/s \(\d+\.\d\dx plain\)", result.stdout), result.stdout
