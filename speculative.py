"""Speculative decoding's proposers and its acceptance rule; the engine runs the verifier.

A decoded token reads every weight once, so plain decoding cannot beat bandwidth / bytes per
token. Running the model over the last token plus k proposed ones reads the weights once too,
and gives the model's own distribution after each proposal: every proposal it agrees with is a
token for the price of a fraction of a step. Two proposers, one rule:

    lookup_proposal   prompt lookup: the tokens that followed an earlier occurrence of the
                      longest recent n-gram (no second model)
    DraftModel        a smaller model with the same tokenizer, decoding k greedy tokens from its cache
    accept            keep the proposals equal to the target's own draws, then its first other draw

The verifier is the engine's decode step over [last token, k proposals] ([1, k + 1]); position i
is drawn exactly as plain decoding would draw it (the same row arithmetic, the same penalty window,
the same random key for that position), so the tokens are plain decoding's, greedy or sampled.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
from array import array

import mlx.core as mx

__all__ = ["lookup_proposal", "lookup_possible", "may_propose", "Lookup", "DraftModel", "accept", "NUM_DRAFT",
           "DEFAULT", "BACKOFF_MAX"]

NUM_DRAFT = 8  # proposals per verifier step (--num-draft), measured: see benchmarks/README.md
DEFAULT = "none"  # what --speculate defaults to: see docs/decisions.md
# After n lookups in a row that kept no proposal (none found, or none right), the next 2^(n-1) steps are plain
# decode steps (at most BACKOFF_MAX), sent off pipelined: a step over rejected proposals costs more than a decode
# step and gives the same one token, and any lookup needs the last token's value, so its step waits for the one
# before (on the H200 a waited step took 9-10 ms against 6-7 pipelined; free text had been 0.74-0.93x plain
# decoding there when every step that found no proposal waited).
BACKOFF_MAX = 16


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


def lookup_possible(known: list[int], min_ngram: int) -> bool:
    """Whether lookup_proposal(known + [t], ..., min_ngram) can propose anything, whatever the next token t is.

    Its final n-gram (n >= min_ngram) occurs earlier, followed by a token, only if known's last min_ngram - 1
    tokens occur earlier too, ending before known's last token. So the engine needs t's value (waits for the
    step that draws it) only where this holds; in free text it mostly does not.
    """
    m = min_ngram - 1
    if len(known) < min_ngram or m <= 0:
        return len(known) >= max(min_ngram, 1)
    words, tail = array("I", known[:-1]).tobytes(), array("I", known[-m:]).tobytes()  # 4 bytes a token
    at = words.find(tail)
    while at != -1 and at % 4:  # a match must start at a token's first byte
        at = words.find(tail, at + 1)
    return at != -1


def may_propose(proposer, known: list[int]) -> bool:
    """Whether the proposer could propose after known + [one more token]: its `possible(known)` where it has one
    (Lookup), else yes (a draft model always proposes)."""
    possible = getattr(proposer, "possible", None)
    return possible is None or possible(known)


class Lookup:
    """Prompt lookup as a proposer: (tokens so far, k) -> up to k proposed ids."""

    # min_ngram 3: a match of one or two tokens (a common word) is mostly a wrong guess in free text. Measured on
    # the packaged model (CPU, greedy, 8 proposals a step; benchmarks/README.md): the free-text question verified
    # 183 proposals keeping 5% with min_ngram 1, 48 keeping 15% with 3; the code edit keeps 91-94% either way.
    def __init__(self, max_ngram: int = 3, min_ngram: int = 3):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def __call__(self, context: list[int], k: int) -> list[int]:
        return lookup_proposal(context, k, self.max_ngram, self.min_ngram)

    def possible(self, known: list[int]) -> bool:
        return lookup_possible(known, self.min_ngram)


class DraftModel:
    """A smaller model with the same tokenizer proposes its k greedy tokens, from a cache of its own.

    The cache is kept between calls; tokens it holds that the context no longer has (rejected
    proposals) are dropped by setting its offset, as the verifier does.
    """

    def __init__(self, params: dict, config: q.Config, vocab_size: int, kernels: str = "reference"):
        self.params, self.config, self.V, self.kernels = params, config, vocab_size, kernels
        self.cache = q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds

    def __call__(self, context: list[int], k: int) -> list[int]:
        reuse = min(q.common_prefix(self.cached, context), len(context) - 1)
        cache = {"layers": self.cache["layers"], "offset": mx.array([reuse], mx.int32)}
        logits, cache = q.prefill(self.params, self.config, mx.array(context[reuse:])[None], cache, self.kernels)
        drafted = []
        for j in range(k):  # one lazy graph: drafted tokens are fed back unevaluated
            token = mx.argmax(logits[:, : self.V], axis=-1)  # [1]: the draft's vocabulary may be padded
            drafted.append(token)
            if j + 1 < k:
                cache = q.reserve(cache, len(context) + j + 1)
                logits, cache = q.compiled_decode_step(self.params, self.config, token[:, None], cache, self.kernels)
                logits = logits[:, -1]
        mx.eval(drafted, cache)
        drafted = [t.item() for t in drafted]
        self.cache, self.cached = cache, context + drafted[:-1]
        return drafted


def accept(proposal: list[int], drawn: list[int]) -> list[int]:
    """The proposals equal to the target's draws [N+1] at their positions, then the target's draw after them."""
    n = q.common_prefix(proposal, drawn)
    return proposal[:n] + [drawn[n]]
