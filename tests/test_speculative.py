"""Speculative decoding against plain decoding: the same greedy tokens with every proposer (right,
wrong, running into the end of the context, holding an end-of-sequence id), the same cache after
rollback, the target's distribution when sampling (chi-square), one trace per (length, block)."""

import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import itertools
import json
import math
import re

import mlx.core as mx
import pytest
from conftest import LAYER_TOL, STATS, assert_close, invoke, reference_model, run_cli

import speculative as sp

# ---------------------------------------------------------------------------------------------
# Proposers the tests control, and the two random models
# ---------------------------------------------------------------------------------------------


class Oracle:
    """Proposes what plain greedy decoding generates, with every `wrong_every`-th proposal changed."""

    def __init__(self, prompt_len, truth, wrong_every=0, V=300):
        self.prompt_len, self.truth, self.wrong_every, self.V = prompt_len, truth, wrong_every, V

    def __call__(self, context, window, k, sampling):
        g = len(context) - self.prompt_len  # tokens generated so far
        out = list(self.truth[g : g + k])
        for i in range(len(out)):
            if self.wrong_every and (g + i) % self.wrong_every == self.wrong_every - 1:
                out[i] = (out[i] + 1) % self.V
        return out, None


class Wrong:
    """Proposes k fixed tokens, which include an end-of-sequence id."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, context, window, k, sampling):
        return self.tokens[:k], None


def target():
    """A random untied model whose greedy output varies (tied random models repeat one token)."""
    _, params, config, _ = reference_model(tie=False, seed=0)
    return params, config


def plain(params, config, prompt, **options):
    report = {}
    tokens = list(q.generate_tokens(params, config, prompt, q.new_cache(config), report=report, **options))
    return tokens, report


def speculative(params, config, prompt, propose, **options):
    report = {}
    tokens = list(sp.speculative_tokens(params, config, prompt, q.new_cache(config), propose=propose, report=report,
                                        **options))
    return tokens, report


def acceptance(report):
    return report["accepted"] / max(report["proposed"], 1)


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


# ---------------------------------------------------------------------------------------------
# Greedy: token for token what plain greedy decoding gives
# ---------------------------------------------------------------------------------------------

N = 48


def proposers(params, config, truth):
    _, other, other_config, _ = reference_model(tie=False, seed=2)
    return {
        "lookup": (sp.Lookup(), None),
        "draft, itself": (sp.DraftModel(params, config, config.vocab_size), (0.95, 1.0)),
        "draft, another model": (sp.DraftModel(other, other_config, config.vocab_size), (0.0, 0.2)),
        "mostly right": (Oracle(len(PROMPT), truth, wrong_every=7), (0.5, 0.95)),
        "mostly wrong": (Wrong([3, 2, 1, 0, 5, 6, 7, 8]), (0.0, 0.2)),
    }


def test_greedy_equals_plain_greedy_with_every_proposer():
    params, config = target()
    truth, plain_report = plain(params, config, PROMPT, max_tokens=N)
    for name, (propose, rate) in proposers(params, config, truth).items():
        for k in (1, 4, 8):
            tokens, report = speculative(params, config, PROMPT, propose, max_tokens=N, num_draft=k)
            assert tokens == truth, f"{name}, k={k}: {tokens} != {truth}"
            assert report["finish_reason"] == "length" and report["generated"] == plain_report["generated"]
            assert report["step_tokens"] == N - 1 and report["verify_steps"] <= N - 1
            if rate:  # the proposer is in the regime its name says
                assert rate[0] <= acceptance(report) <= rate[1], f"{name}, k={k}: acceptance {acceptance(report)}"
            if name == "mostly wrong":  # fruitless proposals make it fall back to plain steps
                assert report["proposed"] <= 8 * k and report["verify_steps"] == N - 1, report
    # the lookup finds the output's loops here: it is right more often than not
    _, report = speculative(params, config, PROMPT, sp.Lookup(), max_tokens=N)
    assert report["proposed"] > 0 and report["step_tokens"] / report["verify_steps"] > 1.3


@pytest.mark.parametrize("room", [1, 2, 5, 13])
def test_a_proposal_running_into_the_end_of_the_context(room):
    params, config = target()
    truth, _ = plain(params, config, PROMPT, max_tokens=N)
    limit = len(PROMPT) + room
    expected, plain_report = plain(params, config, PROMPT, max_tokens=N, max_kv_size=limit)
    tokens, report = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=N,
                                 max_kv_size=limit, num_draft=8)
    assert tokens == expected == truth[: room + 1]
    assert report["finish_reason"] == plain_report["finish_reason"] == "context"
    assert report["cached_new"] == plain_report["cached_new"] == room
    assert q.cache_capacity(report["cache"]) >= limit and report["cache"]["offset"].item() == limit
    # and into max_tokens: no proposal is verified beyond it
    tokens, report = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=room, num_draft=8)
    assert tokens == truth[:room] and report["finish_reason"] == "length"


def test_a_proposal_containing_an_end_of_sequence_id():
    params, config = target()
    truth, _ = plain(params, config, PROMPT, max_tokens=N)
    m = next(i for i in range(8, N) if truth[i] not in truth[:i])  # the first time it is drawn
    eos = truth[m]
    expected, plain_report = plain(params, config, PROMPT, max_tokens=N, eos_ids=frozenset({eos}))
    # accepted: the oracle proposes the run up to and past the end-of-sequence id
    tokens, report = speculative(params, config, PROMPT, Oracle(len(PROMPT), truth), max_tokens=N,
                                 eos_ids=frozenset({eos}), num_draft=8)
    assert tokens == expected == truth[:m]
    assert report["generated"] == plain_report["generated"] == truth[: m + 1] and report["finish_reason"] == "stop"
    # rejected: an end-of-sequence id the target does not pick ends nothing
    wrong_eos = 3
    assert wrong_eos not in truth
    tokens, report = speculative(params, config, PROMPT, Wrong([wrong_eos] * 8), max_tokens=N,
                                 eos_ids=frozenset({wrong_eos}))
    assert tokens == truth and report["finish_reason"] == "length" and report["proposed"] > 0


def test_cache_rollback_equals_the_cache_plain_decoding_builds():
    params, config = target()
    truth, plain_report = plain(params, config, PROMPT, max_tokens=30)
    for propose in (Wrong([3, 2, 1, 0]), Oracle(len(PROMPT), truth, wrong_every=3)):
        _, report = speculative(params, config, PROMPT, propose, max_tokens=30, num_draft=4)
        assert report["accepted"] < report["proposed"], "some proposals must have been rolled back"
        ours, theirs = report["cache"], plain_report["cache"]
        n = theirs["offset"].item()
        assert ours["offset"].item() == n and report["cached_new"] == plain_report["cached_new"]
        for i, ((k1, v1), (k2, v2)) in enumerate(zip(ours["layers"], theirs["layers"], strict=True)):
            assert_close(k1[:, :, :n], k2[:, :, :n], *LAYER_TOL[mx.float32], f"layer {i} keys")
            assert_close(v1[:, :, :n], v2[:, :, :n], *LAYER_TOL[mx.float32], f"layer {i} values")


def test_the_verifier_traces_once_per_length_and_cache_block(monkeypatch):
    # a config no other test uses, so every trace of the compiled verifier is counted here
    _, params, config, _ = reference_model(tie=False, hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                           intermediate_size=72, vocab_size=120)
    traces = []
    original = q.forward

    def counting(params, config, tokens, cache=None, kernels="reference"):
        traces.append((tokens.shape[1], q.cache_capacity(cache)))
        return original(params, config, tokens, cache, kernels)

    monkeypatch.setattr(q, "forward", counting)
    block, k = 32, 4
    monkeypatch.setattr(q.reserve, "__defaults__", (block,))
    prompt = [1, 2, 3, 4, 5, 6] * 3
    tokens = list(sp.speculative_tokens(params, config, prompt, q.new_cache(config), max_tokens=3 * block,
                                        num_draft=k))
    assert len(tokens) == 3 * block
    assert len(set(traces)) == len(traces), f"traced twice: {traces}"
    assert all(n <= k + 1 for n, _ in traces) and len({c for _, c in traces}) <= 4, f"traces: {traces}"
    assert len(traces) < 3 * block // 2, f"{len(traces)} traces for {3 * block} tokens"


# ---------------------------------------------------------------------------------------------
# Sampling: the output distribution is the target's
# ---------------------------------------------------------------------------------------------


def chi_square_bound(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z of the normal), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: dict, expected: dict, draws: int) -> tuple[float, int]:
    """Pearson's statistic over cells expected at least 5 times (the rest pooled into one), and its df."""
    big = [c for c in expected if expected[c] * draws >= 5]
    rest_e = draws - sum(expected[c] * draws for c in big)
    rest_o = draws - sum(counts.get(c, 0) for c in big)
    stat = sum((counts.get(c, 0) - expected[c] * draws) ** 2 / (expected[c] * draws) for c in big)
    if rest_e >= 5:
        stat += (rest_o - rest_e) ** 2 / rest_e
        return stat, len(big)
    return stat, len(big) - 1


def pair_distribution(params, config, prompt, s: q.Sampling) -> dict:
    """The exact probability of each first two generated tokens (t1, t2), from full forward passes."""
    V = config.vocab_size

    def next_probs(tokens, seen):
        logits, _ = q.forward(params, config, mx.array(tokens)[None])
        logits = sp.penalized(logits[0, -1:], [seen[-s.repetition_context :]], s)
        return q.softmax(q.tempered_logprobs(logits, s))[0].tolist()

    p1 = next_probs(prompt, prompt)
    return {(a, b): p1[a] * pb for a in range(V) if p1[a] > 0
            for b, pb in enumerate(next_probs(prompt + [a], prompt + [a]))}


SAMPLED = q.Sampling(temp=0.8, top_k=6, repetition_penalty=1.3, repetition_context=4)


@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_sampling_keeps_the_target_distribution(proposer):
    V, draws = 8, 1500
    _, params, config, _ = reference_model(tie=False, vocab_size=V, seed=3)
    _, dparams, dconfig, _ = reference_model(tie=False, vocab_size=V, seed=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0] * 2 + [1, 2]  # lookup always proposes here
    expected = pair_distribution(params, config, prompt, SAMPLED)
    draft_expected = pair_distribution(dparams, dconfig, prompt, SAMPLED)
    proposer = sp.Lookup() if proposer == "lookup" else sp.DraftModel(dparams, dconfig, V)
    asked = []

    def propose(*args):
        ids, q_probs = proposer(*args)
        asked.append(len(ids))
        return ids, q_probs

    counts = {}
    mx.random.seed(7)
    for _ in range(draws):
        report = {}
        tokens = sp.speculative_tokens(params, config, prompt, q.new_cache(config), propose=propose, sampling=SAMPLED,
                                       max_tokens=6, num_draft=4, report=report)
        pair = tuple(itertools.islice(tokens, 2))  # t2 is the verifier's first answer
        counts[pair] = counts.get(pair, 0) + 1
    stat, df = chi_square(counts, expected, draws)
    assert stat < chi_square_bound(df), f"chi-square {stat:.1f} over {df} degrees of freedom"
    # the test can tell distributions apart: the draft's own pairs are far from the target's
    far, df2 = chi_square({c: round(p * draws) for c, p in draft_expected.items()}, expected, draws)
    assert far > chi_square_bound(df2), f"the draft's distribution is too close to tell ({far:.1f})"
    assert len(asked) == draws and sum(asked) >= 3 * draws, "the verifier had proposals to check every time"


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
    eos = frozenset(tokenizer.eos_token_ids)
    truth, _ = plain(params, config, prompt, max_tokens=40, eos_ids=eos)
    tokens, report = speculative(params, config, prompt, sp.Lookup(), max_tokens=40, eos_ids=eos)
    assert tokens == truth, f"lookup:\n{tokenizer.decode(tokens)}\n!=\n{tokenizer.decode(truth)}"
    if name == "copying code":  # most proposals are right
        assert acceptance(report) > 0.5 and report["step_tokens"] / report["verify_steps"] > 2, report
    tokens, report = speculative(params, config, prompt, sp.DraftModel(params, config, config.vocab_size),
                                 max_tokens=16, eos_ids=eos, num_draft=4)
    assert tokens == truth[:16] and acceptance(report) > 0.9  # drafting for itself: almost all accepted


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
        assert all(row["same_as_plain"] and row["decode"] > 0 for row in rows.values()), rows
        assert 0 <= rows["lookup k=3"]["acceptance"] <= 1 and rows["lookup k=3"]["tokens_per_step"] >= 1
    assert "verifier step over k+1 tokens / decode step: k=2:" in result.stdout
    assert re.search(r"code edit\s+lookup k=3\s+\d+\.\d\d tok/s \(\d+\.\d\dx plain\)", result.stdout), result.stdout
