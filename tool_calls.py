"""Tool calls in Qwen2.5's format, behind OpenAI's shapes.

The model's chat template does the rendering: `tools` go into the system turn inside
`<tools></tools>`, an assistant's calls become `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`,
and `role: "tool"` results go back inside a user turn as `<tool_response>...</tool_response>`.
This file turns OpenAI's messages into the shapes that template expects (`normalize_messages`),
parses the generated text back into OpenAI's `tool_calls`, streaming or not (`ToolCallParser`),
and turns `tool_choice` into what to render and how to constrain the answer (`tool_plan`).

(Named tool_calls, not tools: the folder tools/ holds the project's measuring scripts.)
"""

import json
import re
import uuid
from typing import NamedTuple

from qwen2s import grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class RequestError(ValueError):
    """A one-line reason a request is malformed, and the parameter it is about (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------
# Messages in: OpenAI's shapes -> the chat template's
# ---------------------------------------------------------------------------------------------


def json_value(text: str):
    """JSON text that a client or the model wrote (a call's arguments) -> its value; a one-line ValueError for what
    is not JSON, or not text: malformed, nested past the recursion limit ("[" * 100_000), an integer past Python's
    4300 digits (json.loads' ValueError is no JSONDecodeError), a lone surrogate escape ("\\ud800": the tokenizer
    and the answer's UTF-8 refuse it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at character {e.pos}") from None
    except ValueError:
        raise ValueError("an integer of over 4300 digits") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("a lone surrogate, \\ud800-\\udfff, is not text") from None
    return value


def message_text(content, param: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError("content must be a string or a list of text parts", param)


def call_arguments(arguments, param: str) -> dict:
    """A call's arguments as OpenAI sends them (a JSON string; some clients send the object) -> a dict."""
    if isinstance(arguments, str):
        try:
            arguments = json_value(arguments)
        except ValueError as e:
            raise RequestError(f"arguments must be a JSON object ({e})", param) from None
    if not isinstance(arguments, dict):
        raise RequestError("arguments must be a JSON object", param)
    return arguments


def normalize_call(call, param: str) -> dict:
    """One assistant tool call -> {"id", "type", "function": {"name", "arguments": dict}} (the template dumps it)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise RequestError("each tool call needs type 'function' and a function object", param)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("a tool call's function needs a name", f"{param}.function.name")
    arguments = call_arguments(function.get("arguments", "{}"), f"{param}.function.arguments")
    return {"id": str(call.get("id", "")), "type": "function", "function": {"name": name, "arguments": arguments}}


def normalize_message(m, param: str) -> dict:
    """One OpenAI message -> the template's shape; a RequestError naming the field if malformed."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        raise RequestError(f"each message needs a role, one of {', '.join(ROLES)}", f"{param}.role")
    role = ROLES[m["role"]]
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None and (not isinstance(calls, list) or not calls):
        raise RequestError("tool_calls must be a non-empty list", f"{param}.tool_calls")
    if calls and m.get("content") is None:  # OpenAI: content may be null when the assistant called tools
        content = ""
    else:
        content = message_text(m.get("content"), f"{param}.content")
    if calls:
        return {"role": role, "content": content,
                "tool_calls": [normalize_call(c, f"{param}.tool_calls[{i}]") for i, c in enumerate(calls)]}
    return {"role": role, "content": content}


def normalize_messages(messages) -> list[dict]:
    """OpenAI's chat messages (tool calls and results too) -> what the model's chat template takes."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    return [normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def normalize_tools(tools) -> list[dict]:
    """OpenAI's `tools` -> the same list, checked: each a function with a valid name and object parameters."""
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list", "tools")
    checked = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise RequestError("each tool needs type 'function' and a function object", f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise RequestError("a function name is 1-64 letters, digits, _ or -", f"tools[{i}].function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise RequestError("parameters must be a JSON schema object", f"tools[{i}].function.parameters")
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) < len(names):
        raise RequestError("function names must be unique", "tools")
    return checked


# ---------------------------------------------------------------------------------------------
# tool_choice: what the template renders, and the grammar that enforces a call
# ---------------------------------------------------------------------------------------------


class ToolPlan(NamedTuple):
    """The tools the template renders (None: none), and the constraint on the answer (None: free)."""

    tools: list[dict] | None
    constraint: grammar.Constraint | None


def call_schema(function: dict) -> dict:
    """The JSON of one call to this function: {"name": its name, "arguments": its parameters}."""
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_constraint(functions: list[dict], parallel: bool, tokenizer: grammar.GrammarTokenizer) -> grammar.Constraint:
    """Output = one `<tool_call>` block (or several, if parallel) calling one of these functions."""
    schemas = [call_schema(f) for f in functions]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": grammar.JSON_STYLE}
    more = ' ("\\n" call)*' if parallel else ""
    tags = grammar.lark_literal(tokenizer, OPEN), grammar.lark_literal(tokenizer, CLOSE)
    lark = f'start: call{more}\ncall: {tags[0]} "\\n" body "\\n" {tags[1]}\nbody: %json {json.dumps(schema)}\n'
    names = ", ".join(f["name"] for f in functions)
    try:
        grammar.check_depth(schema)  # llguidance recurses through it: a SIGSEGV past a few thousand levels
        return grammar.lark_constraint(lark, f"a call to {names}")
    except ValueError as e:
        raise RequestError(str(e), "tools") from None


def tool_plan(tools, tool_choice, tokenizer: grammar.GrammarTokenizer, parallel_tool_calls: bool = True) -> ToolPlan:
    """OpenAI's tools and tool_choice -> what to render and how to constrain: "none" renders no tools,
    "auto" renders them, "required" and a named function also force the answer to be a call."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, None)
    tools = normalize_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, None)
    if choice == "auto":
        return ToolPlan(tools, None)
    functions = [t["function"] for t in tools]
    if choice == "required":
        return ToolPlan(tools, calls_constraint(functions, parallel_tool_calls, tokenizer))
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":  # a name only in a dict's function dict
        raise RequestError('tool_choice must be "none", "auto", "required" or '
                           '{"type": "function", "function": {"name": ...}}', "tool_choice")
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise RequestError(f"tool_choice names '{name}', which is not in tools", "tool_choice")
    return ToolPlan(tools, calls_constraint(chosen, False, tokenizer))


# ---------------------------------------------------------------------------------------------
# The answer out: generated text -> content and tool_calls, streaming
# ---------------------------------------------------------------------------------------------


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it

    def as_message(self) -> dict:
        """The call in a chat.completion message's tool_calls."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def as_delta(self, index: int) -> dict:
        """The call in a chunk's delta.tool_calls (whole: name and arguments in one delta)."""
        return {"index": index, **self.as_message()}


def parse_call(body: str) -> ToolCall | None:
    """The JSON inside a <tool_call> block -> a call, or None if it is not {"name": str, "arguments": object}."""
    try:
        call = json_value(body)  # a model may write thousands of brackets, or of digits
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json_value(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(arguments, ensure_ascii=False))


def held_prefix(text: str, tag: str) -> int:
    """How many trailing characters of text could begin tag (kept back until the next piece decides)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Generated text, fed piece by piece -> OpenAI delta dicts: {"content": ...} for plain text and
    {"tool_calls": [...]} for each complete `<tool_call>` block. A block whose JSON is not a call
    stays content. Whitespace around the blocks (the template's newlines) is dropped. The content
    deltas, joined, are `content`; `tool_calls` holds the calls in order."""

    def __init__(self):
        self.pending = ""  # text not yet decided: a possible tag start, a block, or whitespace
        self.in_block = False
        self.searched = 0  # in a block: where CLOSE may still start in pending (each piece searched once, not again)
        self.after_block = False  # drop the whitespace that follows a block
        self.space = ""  # content's trailing whitespace, dropped if a call follows
        self.content = ""
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        """Take the next piece of generated text -> the deltas it completes."""
        self.pending += text
        deltas = []
        while True:
            if self.in_block:
                end = self.pending.find(CLOSE, self.searched)
                if end < 0:
                    self.searched = max(0, len(self.pending) - len(CLOSE) + 1)
                    return deltas
                self.searched = 0
                deltas += self.close_block(self.pending[len(OPEN) : end], self.pending[: end + len(CLOSE)])
                self.pending = self.pending[end + len(CLOSE) :]
                continue
            start = self.pending.find(OPEN)
            if start < 0:
                keep = held_prefix(self.pending, OPEN)
                deltas += self.emit(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return deltas
            deltas += self.emit(self.pending[:start])
            self.pending = self.pending[start:]
            self.in_block = True

    def finish(self) -> list[dict]:
        """The end of the text -> the last deltas (an unclosed block is a call if its JSON is one, as vLLM's
        hermes parser reads it; otherwise content)."""
        deltas = self.close_block(self.pending[len(OPEN) :], self.pending) if self.in_block \
            else self.emit(self.pending)
        self.pending, self.in_block, self.searched = "", False, 0
        if self.space and not self.tool_calls:  # a plain answer keeps its last newline
            self.content += self.space
            deltas.append({"content": self.space})
        self.space = ""
        return deltas

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish_reason: "tool_calls" for an answer that stopped after calling tools."""
        return "tool_calls" if self.tool_calls and reason == "stop" else reason

    def message(self) -> dict:
        """The parsed answer as a chat.completion message (after finish)."""
        calls = [c.as_message() for c in self.tool_calls]
        return {"role": "assistant", "content": self.content or (None if calls else ""),
                **({"tool_calls": calls} if calls else {})}

    def close_block(self, body: str, raw: str) -> list[dict]:
        self.in_block = False
        call = parse_call(body.strip())
        if call is None:
            return self.emit(raw)
        self.space, self.after_block = "", True
        self.tool_calls.append(call)
        return [{"tool_calls": [call.as_delta(len(self.tool_calls) - 1)]}]

    def emit(self, text: str) -> list[dict]:
        """Plain text -> a content delta; trailing whitespace waits, since a block may follow it."""
        if self.after_block:  # the newline the template puts between blocks
            text = text.lstrip()
            self.after_block = not text
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body) :]
        if not body:
            return []
        self.content += body
        return [{"content": body}]
