"""Tool calls: OpenAI's messages rendered by the packaged chat template as Qwen2.5 does, the parser
on crafted answers split at every boundary, and tool_choice enforced on the real model."""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split

import json

import jsonschema
import pytest
from test_grammar import constrained_generate

from qwen2s import grammar, weights
from qwen2s import tool_calls as tc

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}

CONVERSATION = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:00"},
    {"role": "assistant", "content": "It is 18 C at 14:00."},
]

# Qwen2.5's rendering, written out by hand from its published template.
EXPECTED = (
    "<|im_start|>system\nYou help.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER) + "\n" + json.dumps(TIME)
    + '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n14:00\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nIt is 18 C at 14:00.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.packaged_model
def test_packaged_template_renders_tools_calls_and_results_as_qwen(packaged):
    tokenizer = packaged[3]
    plan = tc.tool_plan([WEATHER, TIME], "auto", None)
    text = tokenizer.apply_chat_template(tc.normalize_messages(CONVERSATION), tools=plan.tools,
                                         add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED
    none = tc.tool_plan([WEATHER, TIME], "none", None)
    plain = tokenizer.apply_chat_template(tc.normalize_messages(CONVERSATION[:2]), tools=none.tools,
                                          add_generation_prompt=True, tokenize=False)
    assert "<tools>" not in plain and none.constraint is None


def test_rendered_calls_parse_back_to_the_same_calls():
    """What the template writes for an assistant's calls, the parser reads back as those calls."""
    calls = tc.normalize_messages(CONVERSATION)[2]["tool_calls"]
    answer = "".join(f'\n<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": '
                     f'{json.dumps(c["function"]["arguments"])}}}\n</tool_call>' for c in calls)
    parser = tc.ToolCallParser()
    parser.feed(answer)
    parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert parser.content == "" and parser.message()["content"] is None


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "tool", "content": {"a": 1}}], "messages[0].content"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[" * 10**5}}]}],
     "messages[0].tool_calls[0].function.arguments"),  # nested past the recursion limit: a RecursionError, a 500
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments":
                                                                             '{"a": ' + "9" * 5000 + "}"}}]}],
     "messages[0].tool_calls[0].function.arguments"),  # past Python's 4300 digits: json.loads' ValueError, a 500
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                             "arguments": '{"a": "\\ud800"}'}}]}],
     "messages[0].tool_calls[0].function.arguments"),  # a lone surrogate: the tokenizer's TypeError, a 500
])
def test_malformed_messages_are_one_line_errors_naming_the_field(messages, param):
    with pytest.raises(ValueError) as e:
        tc.normalize_messages(messages)
    assert e.value.param == param and "\n" not in str(e.value)


def test_arguments_may_come_as_an_object():
    m = tc.normalize_messages([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}])
    assert m[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and m[0]["content"] == ""


@pytest.mark.parametrize("tools, choice, param", [
    (None, "required", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER, WEATHER], "auto", "tools"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools[0]"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "required", "tools"),
    ([WEATHER], {"type": "function", "function": "get_weather"}, "tool_choice"),  # an AttributeError: a 500
    ([WEATHER], {"type": "function", "function": ["get_weather"]}, "tool_choice"),
    # $refs chained 3,000 deep: llguidance recursed through them until a SIGSEGV (the server gone)
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "$defs": {f"d{i}": {"$ref": f"#/properties/arguments/$defs/d{i + 1}"} for i in range(3000)},
        "$ref": "#/properties/arguments/$defs/d0"}}}], "required", "tools"),
])
def test_bad_tool_choices_are_one_line_errors(tiny_gt, tools, choice, param):
    with pytest.raises(ValueError) as e:
        tc.tool_plan(tools, choice, tiny_gt[1])
    assert e.value.param == param and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The parser: every split of an answer gives the same content and calls
# ---------------------------------------------------------------------------------------------

ANSWERS = {
    "plain": ("Hello, <b>world</b> <tool is a word.\n", "Hello, <b>world</b> <tool is a word.\n", []),
    "one call": ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', "",
                 [("get_time", {"zone": "CET"})]),
    "text then two calls": ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
                            '<tool_call>\n{"name": "b", "arguments": "{\\"x\\": [1, \\"</\\"]}"}\n</tool_call>\n',
                            "Let me check.", [("a", {}), ("b", {"x": [1, "</"]})]),
    "malformed stays content": ('<tool_call>\n{"name": 3}\n</tool_call> and <tool_call>not json</tool_call>',
                                '<tool_call>\n{"name": 3}\n</tool_call> and <tool_call>not json</tool_call>', []),
    "unclosed call": ('<tool_call>\n{"name": "a", "arguments": {"k": "v"}}\n', "", [("a", {"k": "v"})]),
    "unclosed junk": ("ok <tool_call>\n{\"name\": ", "ok <tool_call>\n{\"name\": ", []),
    "partial tag at the end": ("see <tool_c", "see <tool_c", []),
}


def run_parser(pieces):
    parser = tc.ToolCallParser()
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    return parser, deltas


def check(parser, deltas, content, calls):
    assert parser.content == content == "".join(d["content"] for d in deltas if "content" in d)
    got = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert [c["index"] for c in got] == list(range(len(calls)))
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
    assert [c.as_message() for c in parser.tool_calls] == [{k: v for k, v in c.items() if k != "index"} for c in got]
    assert parser.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert parser.finish_reason("length") == "length"


@pytest.mark.parametrize("name", ANSWERS)
def test_parser_gives_the_same_answer_at_every_split(name):
    text, content, calls = ANSWERS[name]
    check(*run_parser([text]), content, calls)
    check(*run_parser(list(text)), content, calls)  # one character at a time
    for cut in range(len(text) + 1):
        for second in (cut, (cut + len(text)) // 2):
            check(*run_parser([text[:cut], text[cut:second], text[second:]]), content, calls)


def test_a_block_nested_past_the_recursion_limit_or_not_text_stays_content():
    """A model may write a call's JSON thousands of brackets deep: json.loads raised a RecursionError mid-answer;
    thousands of digits: a ValueError mid-answer; a lone surrogate escape: the answer's UTF-8 failed (a 500)."""
    for body in ("[" * 100_000, '{"name": "f", "arguments": "' + "[" * 100_000 + '"}',
                 '{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}",
                 '{"name": "f", "arguments": "{\\"a\\": ' + "9" * 5000 + '}"}',
                 '{"name": "f", "arguments": {"a": "\\ud800"}}'):
        text = f"{tc.OPEN}\n{body}\n{tc.CLOSE}"
        parser, deltas = run_parser([text])
        assert parser.tool_calls == [] and parser.content == text


def test_message_shape():
    parser, _ = run_parser([ANSWERS["text then two calls"][0]])
    m = parser.message()
    assert m["role"] == "assistant" and m["content"] == "Let me check." and len(m["tool_calls"]) == 2
    parser, _ = run_parser(["Hi"])
    assert parser.message() == {"role": "assistant", "content": "Hi"}


# ---------------------------------------------------------------------------------------------
# tool_choice "required" and a named function, on the real model
# ---------------------------------------------------------------------------------------------


@pytest.mark.packaged_model
@pytest.mark.parametrize("choice, expected", [
    ("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")])
def test_forced_choice_gives_a_parseable_call(packaged, packaged_gt, choice, expected):
    plan = tc.tool_plan([WEATHER, TIME], choice, packaged_gt, parallel_tool_calls=False)
    ask = [{"role": "user", "content": "What is the weather like in Oslo?"}]
    state = grammar.start(plan.constraint, packaged_gt)
    tokenizer = packaged[3]
    prompt = tokenizer.apply_chat_template(tc.normalize_messages(ask), tools=plan.tools, add_generation_prompt=True)
    (text,) = constrained_generate(packaged, packaged_gt, prompt, [state], q.Sampling(temp=0.8), max_tokens=48)
    parser, _ = run_parser([text])
    assert len(parser.tool_calls) == 1 and parser.content == "", text
    call = parser.tool_calls[0]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert call.name == (expected or call.name) and call.name in schemas
    jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.fixture(scope="module")
def packaged_gt(packaged):
    return grammar.grammar_tokenizer(packaged[3], packaged[2].vocab_size)


@pytest.fixture(scope="module")
def tiny_gt(tiny_folder):
    tokenizer = weights.load_tokenizer(tiny_folder)
    return tokenizer, grammar.grammar_tokenizer(tokenizer, 300)


def test_required_grammar_allows_parallel_calls_only_when_asked(tiny_gt):
    tokenizer, gt = tiny_gt
    two = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>')
    for parallel, accepted in ((True, True), (False, False)):
        state = grammar.start(tc.tool_plan([WEATHER, TIME], "required", gt, parallel).constraint, gt)
        ok = True
        for token in tokenizer.encode(two, add_special_tokens=False):
            if not bool(grammar.allowed(state)[token]):
                ok = False
                break
            grammar.advance(state, token)
        assert ok == accepted
