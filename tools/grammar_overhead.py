"""Measure the per-token cost of constrained decoding with each grammar engine on the packaged tokenizer.

For a nested JSON schema, walk the tokens of one valid document and time, per token: computing
the allowed-token bitmask, advancing the state, and turning the bitmask into MLX's boolean
mask applied to [1, V] logits with plain MLX ops (what grammar.py does). Also the one-off
compile time. xgrammar is not measured: its matcher module imports torch at load time.

    python tools/grammar_overhead.py        (prints one line per engine)
"""

from qwen2s import qwen2_scratch  # noqa: F401  first: the fast BLAS before MLX

# isort: split

import json
import time

import mlx.core as mx
import numpy as np

from qwen2s import weights

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "W1"},
            "tags": ["math", "engine", "poetry"]}


def mask_to_mlx(bitmask: np.ndarray, vocab: int) -> mx.array:
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab]
    return mx.array(bits.astype(bool))


def apply(logits, bitmask, vocab):
    masked = mx.where(mask_to_mlx(bitmask, vocab), logits, -mx.inf)
    mx.eval(masked)


def llguidance_run(tokenizer, ids, vocab, logits):
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=vocab, eos_token=tokenizer.eos_token_id)
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    t_compile = time.perf_counter() - t
    bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    mask_s = apply_s = 0.0
    for tok in ids:
        t = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(m, bitmask, 0)
        mask_s += time.perf_counter() - t
        t = time.perf_counter()
        apply(logits, bitmask[0], vocab)
        apply_s += time.perf_counter() - t
        assert m.consume_token(tok), m.get_error()
    assert m.is_accepting()
    return t_tok, t_compile, mask_s, apply_s


def outlines_run(tokenizer, ids, vocab, logits):
    import outlines_core
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    t = time.perf_counter()
    decode = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer._tokenizer.all_special_ids) | set(tokenizer._tokenizer.added_tokens_decoder)
    table = {}
    for token, i in tokenizer._tokenizer.get_vocab().items():
        if i not in special:
            table.setdefault(bytes(decode[c] for c in token), []).append(i)
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, table)
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = outlines_core.Index(regex, vocabulary)
    guide = outlines_core.Guide(index)
    t_compile = time.perf_counter() - t
    bitmask = np.zeros((1, (vocab + 31) // 32), np.int32)
    mask_s = apply_s = 0.0
    for tok in ids:
        t = time.perf_counter()
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
        mask_s += time.perf_counter() - t
        t = time.perf_counter()
        apply(logits, bitmask[0], vocab)
        apply_s += time.perf_counter() - t
        guide.advance(tok, return_tokens=False)
    assert guide.is_finished()
    return t_tok, t_compile, mask_s, apply_s


def main():
    tokenizer = weights.load_tokenizer(weights.resolve(None))
    vocab = 151936
    logits = mx.random.normal((1, vocab))
    for separators in ((", ", ": "), (",", ":")):
        ids = tokenizer.encode(json.dumps(DOCUMENT, separators=separators), add_special_tokens=False)
        for name, run in (("llguidance 1.9.1", llguidance_run), ("outlines-core 0.2.14", outlines_run)):
            try:
                t_tok, t_compile, mask_s, apply_s = run(tokenizer, ids, vocab, logits)
            except (AssertionError, ValueError, RuntimeError) as e:
                print(f"{name} separators {separators!r}: refused the document ({str(e)[:120]})")
                continue
            n = len(ids)
            print(f"{name} separators {separators!r}: tokenizer {t_tok * 1e3:.0f} ms, compile "
                  f"{t_compile * 1e3:.0f} ms, mask {mask_s / n * 1e6:.0f} us/token, "
                  f"to MLX + where {apply_s / n * 1e6:.0f} us/token over {n} tokens")


if __name__ == "__main__":
    main()
