"""Speculative decoding: propose several tokens cheaply, then check them all in one forward pass.

A decoded token reads every weight once, so plain decoding cannot beat bandwidth / bytes per
token. Running the model over the last token plus k proposed ones reads the weights once too,
and gives the model's own distribution after each proposal: every proposal it agrees with is a
token for the price of a fraction of a step. Two proposers, one verifier:

    lookup_proposal      prompt lookup: the tokens that followed an earlier occurrence of the
                         longest recent n-gram (no second model; its q is one-hot)
    DraftModel           a smaller model with the same tokenizer, decoding k tokens from its cache
    verify_step          the same `forward` over [last token, proposals], compiled per (length, block)
    accept_greedy        the longest prefix equal to the target's argmax, plus the target's token
    accept_sampled       accept with probability min(1, p/q), else draw from max(0, p - q)
    speculative_tokens   generate_tokens' contract; the cache is rolled back by setting its offset

Exact: with temp 0 the tokens are plain greedy's; with sampling the output distribution is the
target's (Leviathan et al. 2023, Chen et al. 2023), with the repetition penalty and the filters
applied to p and q alike. Shapes as in qwen2_scratch: N proposals, V vocabulary.
"""

import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import time
from functools import partial

import mlx.core as mx

__all__ = ["lookup_proposal", "Lookup", "DraftModel", "verify_step", "accept_greedy", "accept_sampled",
           "speculative_tokens", "NUM_DRAFT", "DEFAULT"]

NUM_DRAFT = 8  # proposals per verifier step (--num-draft), measured: see the README
DEFAULT = "none"  # what --speculate defaults to: see "Decisions" in the README
# After n verifier steps in a row that kept no proposal, the next 2^(n-1) steps propose nothing (at most
# BACKOFF_MAX): a step over rejected proposals costs more than a decode step and gives the same one token.
BACKOFF_MAX = 16


# ---------------------------------------------------------------------------------------------
# Proposers: (context, penalty window, k, sampling) -> (proposed ids, their q [N, V] or None)
# ---------------------------------------------------------------------------------------------


def lookup_proposal(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of context's longest final n-gram.

    The latest occurrence with k tokens after it; failing that, the one with the most after it.
    """
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix, best = context[-n:], []
        for start in range(len(context) - n - 1, -1, -1):  # latest first; a token must follow
            if context[start : start + n] == suffix:
                follow = context[start + n : start + n + k]
                if len(follow) == k:
                    return follow
                best = max(best, follow, key=len)
        if best:
            return best
    return []


class Lookup:
    """Prompt lookup as a proposer: a draft whose q is one-hot at its proposal."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def __call__(self, context, window, k, sampling):
        return lookup_proposal(context, k, self.max_ngram, self.min_ngram), None


def to_vocab(logits: mx.array, V: int) -> mx.array:
    """[1, V'] -> [1, V]: a draft's logits over the target's vocabulary (padding rows differ in size)."""
    if logits.shape[-1] >= V:
        return logits[:, :V]
    return mx.concatenate([logits, mx.full((1, V - logits.shape[-1]), -mx.inf, logits.dtype)], axis=-1)


class DraftModel:
    """A smaller model with the same tokenizer: k tokens sampled as the target would, from its own cache.

    The cache is kept between calls; tokens it holds that the context no longer has (rejected
    proposals) are dropped by setting its offset, as the verifier does.
    """

    def __init__(self, params: dict, config: q.Config, vocab_size: int, kernels: str = "reference"):
        self.params, self.config, self.V, self.kernels = params, config, vocab_size, kernels
        self.cache = q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds

    def __call__(self, context, window, k, s):
        if k == 0:
            return [], None
        reuse = min(q.common_prefix(self.cached, context), len(context) - 1)
        new, pos = context[reuse:], len(context)
        cache = {"layers": self.cache["layers"], "offset": mx.array(reuse)}
        if len(new) > 2 * NUM_DRAFT:  # a prompt: chunked, uncompiled
            logits, cache = q.prefill(self.params, self.config, mx.array(new)[None], cache, self.kernels)
        else:  # the target's last token or two
            cache = q.reserve(cache, pos)
            logits, cache = compiled_verify_step(self.params, self.config, mx.array(new)[None], cache, self.kernels)
            logits = logits[-1:]
        recent, drafted, probs = mx.array(window), [], []
        for j in range(k):  # one lazy graph: drafted tokens are fed back unevaluated
            logits = to_vocab(logits, self.V)  # [1, V]
            if s.repetition_penalty != 1:
                logits = q.apply_repetition_penalty(logits, recent, s.repetition_penalty)
            if s.temp < q.GREEDY_BELOW:
                token = mx.argmax(logits, axis=-1)  # [1]
            else:
                logprobs = q.tempered_logprobs(logits, s)
                token = mx.random.categorical(logprobs)
                probs.append(q.softmax(logprobs)[0])
            drafted.append(token)
            recent = mx.concatenate([recent, token])[-s.repetition_context :]
            if j + 1 < k:
                cache = q.reserve(cache, pos + j + 1)
                logits, cache = q.compiled_decode_step(self.params, self.config, token[:, None], cache, self.kernels)
        mx.eval(drafted, probs, cache)
        drafted = [t.item() for t in drafted]
        self.cache, self.cached = cache, context + drafted[:-1]
        return drafted, (mx.stack(probs) if probs else None)


# ---------------------------------------------------------------------------------------------
# The verifier: one forward over the last token and the proposals, then the acceptance rule
# ---------------------------------------------------------------------------------------------


def verify_step(params, config, tokens, cache, kernels="reference"):
    """[1, N+1] (the last token, then N proposals) -> (logits [N+1, V], cache with all N+1 written)."""
    logits, cache = q.forward(params, config, tokens, cache, kernels)
    return logits[0], cache


# positions are arrays, so this traces once per (N+1, cache capacity): at most k+1 per block
compiled_verify_step = mx.compile(verify_step)


def penalized(logits: mx.array, windows: list[list[int]], s: q.Sampling) -> mx.array:
    """[N+1, V], and for each row the recent ids it is penalized for -> [N+1, V]."""
    if s.repetition_penalty == 1:
        return logits
    rows = [q.apply_repetition_penalty(logits[i : i + 1], mx.array(w), s.repetition_penalty)
            for i, w in enumerate(windows)]
    return mx.concatenate(rows)


def target_distribution(logits: mx.array, i: int, windows: list[list[int]], s: q.Sampling) -> mx.array:
    """Row i of the verifier's logits [N+1, V] -> the distribution [V] the target samples from there."""
    return q.softmax(q.tempered_logprobs(penalized(logits[i : i + 1], [windows[i]], s), s))[0]


def accept_greedy(proposal: list[int], targets: list[int]) -> list[int]:
    """The proposals equal to the target's argmax [N+1], then the target's own token after them."""
    n = q.common_prefix(proposal, targets)
    return proposal[:n] + [targets[n]]


def accept_sampled(proposal: list[int], p, q_probs: mx.array | None) -> list[int]:
    """Speculative sampling: p(i) -> [V] the target's after proposal i-1; q [N, V] the draft's (None: one-hot).

    Proposal i is kept with probability min(1, p_i(d) / q_i(d)); the first one rejected is
    replaced by a draw from max(0, p_i - q_i), normalized; if all are kept, one more from p_N.
    p is a function so that rows after the first rejection are never filtered (top-p sorts V).
    """
    for i, d in enumerate(proposal):
        p_i = p(i)  # [V]
        q_i = q_probs[i] if q_probs is not None else (mx.arange(p_i.shape[-1]) == d).astype(p_i.dtype)  # [V]
        if mx.random.uniform().item() * q_i[d].item() < p_i[d].item():
            continue
        residual = mx.maximum(p_i - q_i, 0)  # [V]
        return proposal[:i] + [mx.random.categorical(mx.log(residual)).item()]
    return proposal + [mx.random.categorical(mx.log(p(len(proposal)))).item()]


def speculative_tokens(
    params: dict,
    config: q.Config,
    prompt: list[int],
    cache: dict,
    propose=None,
    sampling: q.Sampling = q.Sampling(),
    max_tokens: int = 256,
    max_kv_size: int | None = None,
    eos_ids: frozenset = frozenset(),
    kernels: str = "reference",
    report: dict | None = None,
    num_draft: int = NUM_DRAFT,
    history: list[int] = (),
):
    """generate_tokens, speculating: yield the same tokens (greedy) or the same distribution (sampled).

    propose(context, window, k, sampling) -> (ids, q) is a proposer (default: prompt lookup);
    history holds the ids the cache already has, so that lookup and a draft see them too. The
    report adds proposed, accepted, verify_steps and step_tokens (tokens the verifier gave).
    When proposals keep failing, it falls back to plain steps for a while (BACKOFF_MAX).
    """
    report = {} if report is None else report
    propose = propose or Lookup()
    s = sampling
    max_kv_size = max_kv_size or config.max_position_embeddings
    pos = prompt_end = q.context_after_prompt(prompt, cache, max_kv_size)
    context, seen = list(history) + list(prompt), list(prompt)  # seen: what the penalty looks back on
    window = lambda extra=(): (seen + list(extra))[-s.repetition_context :]  # noqa: E731

    tic = time.perf_counter()
    logits, cache = q.prefill(params, config, mx.array(prompt)[None], cache, kernels)
    new = [q.pick_next(logits, mx.array(window()), s).item()]
    t_first = time.perf_counter()
    report.update(prompt_tokens=len(prompt), prompt_tps=len(prompt) / (t_first - tic))
    generated, finish, stats = [], "length", dict(proposed=0, accepted=0, verify_steps=0, step_tokens=0)
    misses, rest = 0, 0  # fruitless steps in a row; plain steps still to take
    while True:
        for token in new:
            generated.append(token)
            if token in eos_ids:
                finish = "stop"
                break
            yield token
        if finish == "stop" or len(generated) >= max_tokens or pos >= max_kv_size:
            finish = finish if finish == "stop" else "length" if len(generated) >= max_tokens else "context"
            break
        context += new
        seen += new
        # k proposals fill k+1 cache slots and yield at most k+1 tokens: both must fit
        k = min(num_draft, max_tokens - len(generated) - 1, max_kv_size - pos - 1) if rest == 0 else 0
        proposal, q_probs = propose(context, window(), k, s) if k > 0 else ([], None)
        proposal, rest = proposal[:k], max(rest - 1, 0)
        cache = q.reserve(cache, pos + 1 + len(proposal))
        logits, cache = compiled_verify_step(params, config, mx.array([context[-1], *proposal])[None], cache, kernels)
        windows = [window(proposal[:i]) for i in range(len(proposal) + 1)]  # what each row is penalized for
        if s.temp < q.GREEDY_BELOW:
            new = accept_greedy(proposal, mx.argmax(penalized(logits, windows, s), axis=-1).tolist())
        else:
            new = accept_sampled(proposal, partial(target_distribution, logits, windows=windows, s=s), q_probs)
        if proposal:
            misses = 0 if len(new) > 1 else misses + 1
            rest = min(2 ** (misses - 1), BACKOFF_MAX) if misses else 0
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        new = new if stop is None else new[: stop + 1]
        pos += len(new)  # the last token and the accepted proposals; the rest is rolled back
        cache = {"layers": cache["layers"], "offset": mx.array(pos)}
        stats["proposed"] += len(proposal)
        stats["accepted"] += len(new) - 1
        stats["verify_steps"] += 1
        stats["step_tokens"] += len(new)
    elapsed = time.perf_counter() - t_first
    n = len(generated)
    report.update(
        generation_tokens=n,
        generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        generated=generated,
        cache=cache,
        cached_new=pos - prompt_end,
        **stats,
    )
