"""Structured output by constrained decoding: at each step a grammar masks the logits, so the
answer always parses (and validates against a JSON schema), greedy or sampled, row by row.

The grammar engine is llguidance (llama.cpp's optional engine; LM Studio's for tool calls).
Measured on the packaged tokenizer (vocab 151,936, 2-core CPU) for a nested JSON schema, by
`python tools/grammar_overhead.py` (walks a 33-45 token document; noisy, the machine is shared):

    engine                compile/schema   mask per token   bitmask -> MLX bool + mx.where
    llguidance 1.9.1      2-3 ms           44-76 us         150-240 us
    outlines-core 0.2.14  450-515 ms       95-132 us        170-380 us (same code)
    xgrammar 0.2.8        not measured: its matcher imports torch, which we do not depend on

llguidance also compiles any JSON (`json_object`) and Lark grammars with embedded JSON schemas
(the tool-call block), which outlines-core's regexes cannot. Its MLX helper applies the mask
with a Metal kernel; here the mask becomes a boolean array and `mx.where` applies it, so it
runs on the CPU and CUDA alike.

The per-sequence state is an llguidance matcher (mutable, on the Rust side): `start` one per
row, ask `allowed_rows` for the masks of a batch, `advance` it with each chosen token.
"""

from qwen2s import qwen2_scratch  # noqa: F401  first: the model loads the fast BLAS before MLX

# isort: split

import json
import urllib.parse
from collections.abc import Sequence
from typing import NamedTuple

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np

# The separators json.dumps writes and Qwen's tool calls use; no free whitespace, so a small
# model cannot wander into an endless run of newlines inside the JSON.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class Constraint(NamedTuple):
    """A compiled-ready grammar (llguidance's serialized form) and what it asks for, for messages."""

    grammar: str
    what: str


class GrammarTokenizer(NamedTuple):
    """The tokenizer as llguidance sees it (about 1 s to build for 151,936 tokens: build once per model)."""

    llg: llguidance.LLTokenizer
    vocab: int  # the width of the model's logits, which may exceed the tokenizer's size


class State(NamedTuple):
    """One row's place in its grammar."""

    matcher: llguidance.LLMatcher
    vocab: int


def grammar_tokenizer(tokenizer, vocab: int) -> GrammarTokenizer:
    """A loaded tokenizer (mlx_lm's wrapper, or a Hugging Face fast tokenizer) -> llguidance's, ending at every EOS."""
    import llguidance.hf  # here, not at import: it imports transformers (slow, and it needs a working directory)

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
    return GrammarTokenizer(llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos), vocab)


def lark_literal(tokenizer: GrammarTokenizer, text: str) -> str:
    """text in a Lark grammar: its one token if the tokenizer has one (llguidance takes added tokens, like
    Qwen's <tool_call>, for control tokens, which quoted text never matches), else the quoted text."""
    ids = tokenizer.llg.tokenize_str(text)
    return f"<[{ids[0]}]>" if len(ids) == 1 and tokenizer.llg.is_special_token(ids[0]) else json.dumps(text)


# How deep a schema may nest, its $refs followed: llguidance recurses through it on the thread's stack, and a chain
# of 2,500 refs (100 KB of JSON; 380 links of 8 levels each) overflowed the 8 MB of the main thread: a SIGSEGV, the
# server gone. 256 leaves room on a 2 MB thread stack; a real schema nests a few dozen levels.
MAX_SCHEMA_DEPTH = 256
# How many objects and arrays a schema may hold: llguidance's compile grows with their square (1,000 properties
# 0.13 s, 4,000 1.2 s, 22,000 over a minute and then a panic of its own), and a request's body may be a megabyte of
# them. OpenAI's structured outputs allow 5,000 properties in all.
MAX_SCHEMA_NODES = 10_000
MAX_SCHEMA_VISITS = 20_000  # nodes check_depth expands again (each path that cut a cycle short expands anew)


def check_depth(schema) -> None:
    """A ValueError if the schema holds more than MAX_SCHEMA_NODES objects and arrays, or nests past
    MAX_SCHEMA_DEPTH (objects and arrays, each $ref followed to its target; a ref back to a schema on the path is
    recursion, which llguidance compiles without recursing). Refs resolved:
    "#", JSON pointers ("#/$defs/a"), anchors ("#name"); with any other ref (by $id), each ref may add the whole
    document's depth."""
    anchors, refs, deepest, nodes = {}, [], 0, 0
    stack = [(schema, 1)]
    while stack:  # one pass: the anchors, the refs and the document's own depth (iterative: JSON nests ~1,000 deep)
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        nodes += isinstance(node, dict | list)
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"the JSON schema holds more than {MAX_SCHEMA_NODES} objects and arrays")
        if isinstance(node, dict):
            if isinstance(node.get("$anchor"), str):
                anchors["#" + node["$anchor"]] = node
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]

    def target(ref: str):
        if ref in anchors:
            return anchors[ref]
        if not ref.startswith("#") or ref[1:2] not in ("", "/"):
            raise LookupError(ref)
        node = schema
        for part in ref[2:].split("/") if ref != "#" else []:
            part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) and part.isdigit() else node.get(part) \
                if isinstance(node, dict) else None
        return node

    too_deep = ValueError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep, its $refs followed")
    try:
        targets = {ref: target(ref) for ref in refs}
    except (LookupError, ValueError):  # a ref by $id: bound each by the whole document
        if (len(refs) + 1) * deepest > MAX_SCHEMA_DEPTH:
            raise too_deep from None
        return
    below, path, expanded, again = {}, {}, set(), [0]  # memoized depths; the path's nodes -> their levels

    def depth(node, level: int) -> tuple[int, int]:
        """node's depth, and the shallowest level on the path that a ref below it led back to (recursion: no depth
        there). A depth that such a cut shortened is not memoized: reached by another path, with that ancestor off
        it, the node may reach deeper (memoized, it had passed schemas nested past the limit). Without a memo a
        schema of many cycles could be walked in exponential time: MAX_SCHEMA_VISITS bounds the nodes walked again."""
        if level > MAX_SCHEMA_DEPTH:
            raise too_deep
        if not isinstance(node, dict | list):
            return 0, level
        if id(node) in path:
            return 0, path[id(node)]
        if id(node) in below:
            d, low = below[id(node)], level
        else:
            if id(node) in expanded:  # once each is the document's size; again, each path a cycle cut short
                again[0] += 1
                if again[0] > MAX_SCHEMA_VISITS:
                    raise ValueError(f"the JSON schema's $refs make more than {MAX_SCHEMA_VISITS} paths to check")
            expanded.add(id(node))
            path[id(node)] = level
            children = list(node.values() if isinstance(node, dict) else node)
            if isinstance(node, dict) and isinstance(node.get("$ref"), str):
                children.append(targets[node["$ref"]])
            found = [depth(c, level + 1) for c in children]
            del path[id(node)]
            d, low = 1 + max((f[0] for f in found), default=0), min((f[1] for f in found), default=level)
            if low >= level:  # no ref led above this node: its depth is its own, from any path
                below[id(node)], low = d, level
        if level + d > MAX_SCHEMA_DEPTH:
            raise too_deep
        return d, low

    depth(schema, 1)


def json_schema_constraint(schema, what: str = "a JSON value matching the schema") -> Constraint:
    """A JSON schema (dict) -> the constraint that output matches it; a one-line ValueError if unusable."""
    if not isinstance(schema, dict):
        raise ValueError("the JSON schema must be an object")
    check_depth(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {first_line(e)}") from None
    return checked(Constraint(grammar, what))


def lark_constraint(lark: str, what: str) -> Constraint:
    """A Lark grammar (llguidance's dialect, `%json {...}` embeds a schema) -> its constraint."""
    return checked(Constraint(llguidance.LLMatcher.grammar_from_lark(lark), what))


def checked(constraint: Constraint) -> Constraint:
    """The constraint, or a one-line ValueError saying why llguidance cannot compile it."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(constraint.grammar)
    if is_error:
        raise ValueError(f"cannot constrain the output to {constraint.what}: {first_line(messages[0])}")
    return constraint


def first_line(message) -> str:
    """An engine's message on one line (a regex error spans several, with a caret under the spot)."""
    return " ".join(str(message).split("<backtrace>")[0].split()) or "unknown error"  # (a panic's: addresses)


def from_response_format(response_format) -> Constraint | None:
    """OpenAI's response_format -> a constraint, None for plain text; a one-line ValueError if malformed."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_constraint({"type": "object"}, "a JSON object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError("response_format.json_schema.name must be a non-empty string")
        schema = spec.get("schema", {"type": "object"})  # OpenAI: without a schema, any JSON object
        return json_schema_constraint(schema, f"the JSON schema '{spec['name']}'")
    raise ValueError(f"response_format.type must be one of text, json_object, json_schema (got {json.dumps(kind)})")


def start(constraint: Constraint, tokenizer: GrammarTokenizer) -> State:
    """A fresh state at the start of the constraint's grammar, for one sequence."""
    matcher = llguidance.LLMatcher(tokenizer.llg, constraint.grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"cannot constrain the output to {constraint.what}: {first_line(matcher.get_error())}")
    matcher.compute_bitmask()  # computing the first mask tells whether the grammar has stopped already
    if matcher.is_stopped():  # ({"$ref": "#"}) only EOS may come: an empty answer, which matches nothing
        raise ValueError(f"cannot constrain the output to {constraint.what}: it allows no output")
    return State(matcher, tokenizer.vocab)


def allowed_rows(states: Sequence[State | None], vocab: int) -> mx.array:
    """One state per row (None: unconstrained) -> the tokens each row may take next, bool [B, V]."""
    bitmask = llguidance.numpy.allocate_token_bitmask(len(states), vocab)  # [B, ceil(V/32)] int32, all ones
    for row, state in enumerate(states):
        if state is not None:
            llguidance.numpy.fill_next_token_bitmask(state.matcher, bitmask, row)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab]  # token i = bit i
    return mx.array(bits.astype(np.bool_))


def allowed(state: State) -> mx.array:
    """The tokens this state may take next, bool [V]."""
    return allowed_rows([state], state.vocab)[0]


def mask_logits(logits: mx.array, mask: mx.array) -> mx.array:
    """Logits [B, V] with the disallowed tokens at -inf (plain MLX ops: CPU, CUDA and Metal alike)."""
    return mx.where(mask, logits, mx.array(-mx.inf, logits.dtype))


def advance(state: State, token: int) -> None:
    """Move the state past the chosen token; a ValueError if the grammar does not allow it."""
    if not state.matcher.consume_token(int(token)):
        reason = first_line(state.matcher.get_error()).partition(" <state>")[0]  # not its state and whole grammar
        raise ValueError(f"token {int(token)} breaks the grammar: {reason}")


def is_done(state: State) -> bool:
    """Whether the grammar is complete and nothing but EOS may follow (or EOS was taken)."""
    return state.matcher.is_stopped()
