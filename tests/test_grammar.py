"""Structured output: the grammar's masks against the JSON a parser accepts, and the real model's
constrained answers, greedy, sampled and in a batch, parsed with json and validated with jsonschema."""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split

import json
import subprocess
import sys

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from qwen2s import grammar, weights

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
COLORS = {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                      "minItems": 1, "maxItems": 3}},
          "required": ["colors"], "additionalProperties": False}


def as_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tiny_grammar_tokenizer(tiny_folder):
    tokenizer = weights.load_tokenizer(tiny_folder)
    return tokenizer, grammar.grammar_tokenizer(tokenizer, 300)


def walk(tokenizer, gt, constraint, text):
    """Feed text's tokens through a fresh state -> (per step: (token allowed, EOS allowed)), the final mask."""
    state = grammar.start(constraint, gt)
    eos = sorted(tokenizer.eos_token_ids)
    steps = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = np.array(grammar.allowed(state))
        steps.append((bool(mask[token]), bool(mask[eos].any()), grammar.is_done(state)))
        grammar.advance(state, token)
    return steps, np.array(grammar.allowed(state)), grammar.is_done(state)


@pytest.mark.parametrize("text", ['{"a": [1, 2.5, {"b": null}], "c": "x\\ny"}', '{}', '{"k": true}'])
def test_json_object_accepts_json_and_ends_with_eos_only(tiny_grammar_tokenizer, text):
    tokenizer, gt = tiny_grammar_tokenizer
    steps, final, done = walk(tokenizer, gt, grammar.from_response_format({"type": "json_object"}), text)
    assert all(ok for ok, _, _ in steps), f"a token of {text!r} was masked out"
    assert not any(eos for _, eos, _ in steps), "EOS allowed before the JSON was complete"
    assert not any(d for _, _, d in steps)
    assert done and set(np.flatnonzero(final)) == set(tokenizer.eos_token_ids), "only EOS may follow the JSON"


def test_schema_masks_what_breaks_it(tiny_grammar_tokenizer):
    tokenizer, gt = tiny_grammar_tokenizer
    state = grammar.start(grammar.from_response_format(as_format(COLORS)), gt)
    for token in tokenizer.encode('{"colors": ["', add_special_tokens=False):
        grammar.advance(state, token)
    mask = np.array(grammar.allowed(state))
    vocab = tokenizer._tokenizer.get_vocab()
    assert mask[vocab["r"]] and mask[vocab["g"]] and mask[vocab["b"]]  # red, green, blue begin so
    assert not mask[vocab["h"]] and not mask[vocab["w"]]
    with pytest.raises(ValueError, match="breaks the grammar"):
        grammar.advance(state, vocab["h"])


def test_rows_stack_and_none_is_free(tiny_grammar_tokenizer):
    tokenizer, gt = tiny_grammar_tokenizer
    a = grammar.start(grammar.from_response_format({"type": "json_object"}), gt)
    b = grammar.start(grammar.from_response_format(as_format({"type": "array"})), gt)
    masks = np.array(grammar.allowed_rows([a, None, b], 300))
    assert masks.shape == (3, 300) and masks.dtype == np.bool_
    assert masks[1].all()
    np.testing.assert_array_equal(masks[0], np.array(grammar.allowed(a)))
    np.testing.assert_array_equal(masks[2], np.array(grammar.allowed(b)))
    vocab = tokenizer._tokenizer.get_vocab()
    assert masks[0][vocab["{"]] and not masks[0][vocab["["]]
    assert masks[2][vocab["["]] and not masks[2][vocab["{"]]


def test_mask_logits_matches_numpy(tiny_grammar_tokenizer):
    _, gt = tiny_grammar_tokenizer
    state = grammar.start(grammar.from_response_format({"type": "json_object"}), gt)
    mask = grammar.allowed_rows([state, None], 300)
    logits = mx.random.normal((2, 300), key=mx.random.key(0))
    want = np.where(np.array(mask), np.array(logits), -np.inf)
    np.testing.assert_array_equal(np.array(grammar.mask_logits(logits, mask)), want)
    assert grammar.mask_logits(logits.astype(mx.bfloat16), mask).dtype == mx.bfloat16


@pytest.mark.parametrize("response_format, message", [
    (as_format({"type": "nonsense"}), "Invalid type"),
    (as_format({"type": "string", "pattern": "(("}), "regex parse error"),
    (as_format({"$ref": "#/definitions/missing"}), "does not exist"),
    (as_format({"type": "integer", "minimum": 5, "maximum": 1}), "nsatisfiable"),
    (as_format([1, 2]), "must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name must be"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "xml"}, "must be one of text, json_object, json_schema"),
    ("json", "response_format must be an object"),
])
def test_bad_formats_are_one_line_value_errors(response_format, message):
    with pytest.raises(ValueError, match=message) as e:
        grammar.from_response_format(response_format)
    assert "\n" not in str(e.value)


def test_a_grammar_that_allows_no_output_cannot_start(tiny_grammar_tokenizer):
    """{"$ref": "#"} compiles, but its matcher has stopped before the first token: only EOS, an empty answer that
    is no JSON, sent with finish_reason "stop" (a 200 whose content is "")."""
    _, gt = tiny_grammar_tokenizer
    with pytest.raises(ValueError, match="allows no output") as e:
        grammar.start(grammar.from_response_format(as_format({"$ref": "#"})), gt)
    assert "\n" not in str(e.value)


def ref_chain(links: int, link) -> dict:
    """A schema whose $refs chain links deep: 100 KB of flat JSON for 3,000 links."""
    return {"$defs": {f"d{i}": link(f"#/$defs/d{i + 1}") for i in range(links)} | {f"d{links}": {"type": "integer"}},
            "$ref": "#/$defs/d0"}


CHAINS = {"refs": lambda ref: {"$ref": ref},
          "properties": lambda ref: {"type": "object", "properties": {"a": {"$ref": ref}}, "required": ["a"]},
          "anchors": None, "ids": None}


@pytest.mark.parametrize("shape", CHAINS)
def test_a_schema_nested_deep_by_its_refs_is_refused_not_a_crash(tiny_grammar_tokenizer, shape):
    """llguidance recurses through $refs on the thread's stack: 2,500 chained refs (or 380 links of 8 levels) ended
    the process by SIGSEGV, the server with it. Run in a child process, which such a crash would end."""
    if shape == "anchors":
        schema = {"$defs": {f"d{i}": {"$anchor": f"a{i}", "$ref": f"#a{i + 1}"} for i in range(3000)}, "$ref": "#a0"}
    elif shape == "ids":
        schema = {"$defs": {f"d{i}": {"$id": f"http://x/{i}", "$ref": f"http://x/{i + 1}"} for i in range(3000)},
                  "$ref": "http://x/0"}
    else:  # (2,400 links of 4 objects: under MAX_SCHEMA_NODES, refused for its depth, as 3,000 of one)
        schema = ref_chain(3000 if shape == "refs" else 2400, CHAINS[shape])
    code = ("import json, sys\nfrom qwen2s import grammar\n"
            "try:\n    grammar.json_schema_constraint(json.loads(sys.stdin.read()))\n"
            "except ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(schema), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "nests more than 256 levels" in done.stdout, (done.returncode, done.stderr[-500:])
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}},
            "$ref": "#/$defs/node"}  # recursion is no depth: it compiles without recursing
    for fine in (tree, ref_chain(40, CHAINS["properties"])):
        grammar.start(grammar.json_schema_constraint(fine), tiny_grammar_tokenizer[1])


def nested(levels: int, inner: dict) -> dict:
    """inner inside `levels` levels of arrays (a dict each)."""
    for _ in range(levels):
        inner = {"type": "array", "items": inner}
    return inner


def test_a_schemas_depth_counts_every_path_through_its_refs_not_the_first_one_seen():
    """a's refs lead to x, x's back to a (recursion, no depth there) and a holds 150 levels of its own. Walked from
    the first property, x's depth is cut where it leads back to a; reached again (the second property, or $defs),
    with a off the path, x -> a -> 150 levels is 280 levels deep. A memo of x's cut depth had let it pass."""
    x = nested(120, {"$ref": "#/$defs/a"})
    a = {"type": "object", "properties": {"loop": {"$ref": "#/$defs/x"}, "deep": nested(150, {"type": "integer"})}}
    schema = {"type": "object", "properties": {"first": {"$ref": "#/$defs/a"}, "second": {"$ref": "#/$defs/x"}},
              "$defs": {"a": a, "x": x}}
    with pytest.raises(ValueError, match="nests more than 256 levels"):
        grammar.check_depth(schema)
    a["properties"]["deep"] = nested(100, {"type": "integer"})
    grammar.check_depth(schema)  # x -> a -> 100 levels: 230
    many = {"$defs": {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{j}"} for j in range(12)]} for i in range(12)},
            "$ref": "#/$defs/d0"}  # every order of 12 mutually recursive refs: too many paths, refused in time
    with pytest.raises(ValueError, match="paths to check"):
        grammar.check_depth(many)


def test_text_and_absent_formats_are_unconstrained():
    assert grammar.from_response_format(None) is None
    assert grammar.from_response_format({"type": "text"}) is None


# ---------------------------------------------------------------------------------------------
# The real packaged model
# ---------------------------------------------------------------------------------------------


def constrained_generate(packaged, gt, ids, states, sampling, max_tokens=40):
    """A plain batched decode loop with every row's logits masked by its state -> each row's text.
    All rows share the prompt ids (the cache has one offset), so only the constraints differ."""
    _, params, config, tokenizer = packaged
    eos = tokenizer.eos_token_ids
    cache = q.new_cache(config, batch=len(states))
    logits, cache = q.prefill(params, config, mx.array([ids] * len(states)), cache)
    pos, rows, done = len(ids), [[] for _ in states], [False] * len(states)
    for _ in range(max_tokens):
        tokens = q.sample(grammar.mask_logits(logits, grammar.allowed_rows(states, gt.vocab)), sampling).tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if states[row] is not None:
                grammar.advance(states[row], token)
            done[row] = token in eos
            if not done[row]:
                rows[row].append(token)
        if all(done):
            break
        cache = q.reserve(cache, pos + 1)
        logits, cache = q.compiled_decode_step(params, config, mx.array(tokens)[:, None], cache)
        logits = logits[:, -1]
        pos += 1
    assert all(done), f"a row did not finish in {max_tokens} tokens: {[tokenizer.decode(r) for r in rows]}"
    return [tokenizer.decode(r) for r in rows]


@pytest.fixture(scope="module")
def packaged_gt(packaged):
    return grammar.grammar_tokenizer(packaged[3], packaged[2].vocab_size)


def ask(tokenizer):
    question = [{"role": "user", "content": "Describe a person who lives in a city, as JSON."}]
    return tokenizer.apply_chat_template(question, add_generation_prompt=True)


@pytest.mark.packaged_model
@pytest.mark.parametrize("sampling", [q.Sampling(), q.Sampling(temp=1.0, top_p=0.95)], ids=["greedy", "sampled"])
def test_model_output_parses_and_validates(packaged, packaged_gt, sampling):
    mx.random.seed(3)
    state = grammar.start(grammar.from_response_format(as_format(PERSON)), packaged_gt)
    (text,) = constrained_generate(packaged, packaged_gt, ask(packaged[3]), [state], sampling)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.packaged_model
def test_batch_rows_follow_their_own_schemas(packaged, packaged_gt):
    mx.random.seed(4)
    formats = [as_format(PERSON), as_format(COLORS)]
    states = [grammar.start(grammar.from_response_format(f), packaged_gt) for f in formats]
    person, colors = constrained_generate(packaged, packaged_gt, ask(packaged[3]), states, q.Sampling(temp=0.7))
    jsonschema.validate(json.loads(person), PERSON)
    jsonschema.validate(json.loads(colors), COLORS)
