"""Text and messages -> token ids: the one place where what a user typed meets the tokenizer.

Message contents and plain-text prompts are text. A control token's string in them (`<|im_start|>`,
`<|im_end|>`, any special token) is encoded as the characters it is made of, never as the token,
so a user cannot forge a system or an assistant turn: control tokens come only from the chat
template. transformers does the marking and the encoding (`apply_chat_template`'s
`sanitize_control_tokens`); this module renders the template itself, because a template comes
from a model folder, which is untrusted: it runs in jinja's immutable sandbox, as in
transformers, with a time limit and a limit on the size of what it makes.
"""

from qwen2s import qwen2_scratch  # noqa: F401  first: the model loads the fast BLAS before MLX

# isort: split
import functools
import inspect
import re
import sys
import threading
import time
from typing import NamedTuple

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["PromptError", "encode_chat", "render_chat", "encode_rendered", "encode_text",
           "RENDER_SECONDS", "RENDER_CHARS"]

RENDER_SECONDS = 2.0  # the real templates render a long chat in milliseconds
RENDER_CHARS = 16 * 2**20  # the most characters a template may make, or hand between its parts


class PromptError(ValueError):
    """A prompt that cannot be made: the template is missing, refused the messages, or ran past its limits."""


# ---------------------------------------------------------------------------------------------
# The chat template, rendered with limits
# ---------------------------------------------------------------------------------------------

class Limits(Exception):
    """Raised inside the template when it runs past a limit (an Exception jinja does not swallow)."""


def too_long(value) -> bool:
    """A string or sequence the template may not make or pass on."""
    return isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > RENDER_CHARS


def too_large(value) -> bool:
    """A size the template may not ask for ('x'|center(3000000000))."""
    return isinstance(value, int) and abs(value) > RENDER_CHARS


def product_too_long(left, right) -> bool:
    """'x' * n, [x] * n: the product's length, found before it is made."""
    return any(isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS
               for seq, n in ((left, right), (right, left)))


def power_too_large(left, right) -> bool:
    """10 ** 10 ** 9 takes minutes: bound the bits of the result (a float overflows on its own)."""
    return (isinstance(left, int) and isinstance(right, int) and abs(left) > 1
            and right * abs(left).bit_length() > 8 * RENDER_CHARS)


def format_too_long(fmt) -> bool:
    """'%3000000000s' % x, '{:>3000000000}'.format(x): a width or precision beyond the limit."""
    return isinstance(fmt, str) and any(int(n) > RENDER_CHARS for n in re.findall(r"\d+", fmt))


def refuse(what: str):
    raise Limits(f"the chat template {what} (the limit is {RENDER_CHARS} characters)")


def checked_call(f, args, kwargs):
    """f(*args, **kwargs) for the template, refusing huge arguments first and a huge result after."""
    values = (*args, *kwargs.values())
    if any(too_long(a) for a in values):
        refuse("passed on a value too long")
    if any(too_large(a) for a in values):
        refuse("asked for a size too large")
    result = f(*args, **kwargs)
    if too_long(result):
        refuse("made a value too long")
    return result


def guarded(f):
    """A filter or global function that refuses huge arguments and results."""
    @functools.wraps(f)  # keeps jinja's pass_context marks
    def call(*args, **kwargs):
        return checked_call(f, args, kwargs)
    return call


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox for chat templates, whose operators, calls and filters refuse huge sizes."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def call_binop(self, context, operator, left, right):
        if (operator == "*" and product_too_long(left, right) or operator == "**" and power_too_large(left, right)
                or operator == "%" and format_too_long(left)):
            refuse("asked for a size too large")
        result = super().call_binop(context, operator, left, right)
        if too_long(result):
            refuse("made a value too long")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        return checked_call(lambda *a, **k: super(BoundedSandbox, __self).call(__context, __obj, *a, **k),
                            args, kwargs)

    def wrap_str_format(self, value):
        if format_too_long(getattr(value, "__self__", None)):
            refuse("asked for a size too large")
        return super().wrap_str_format(value)


def bounded_namespace(theirs: type) -> type:
    """transformers' namespace, refusing a value too long ({% set ns.s = ns.s ~ ns.s %} in a loop doubles)."""
    class BoundedNamespace(theirs):
        def __setitem__(self, name, value):
            if too_long(value):
                refuse("stored a value too long")
            super().__setitem__(name, value)
    return BoundedNamespace


class Compiled(NamedTuple):
    template: jinja2.Template
    literal_text: str  # the template's text and string constants, joined by NULs


@functools.lru_cache(maxsize=8)
def compiled(source: str) -> Compiled:
    """The template compiled as transformers compiles it (its filters, globals and tags, taken from an
    empty template: compiling this one with transformers would fold its constants, 'x' * 3000000000
    included), in the bounded sandbox, unoptimized so that nothing runs before the limits do."""
    theirs = hf_chat()._compile_jinja_template("").environment
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False,
                         extensions=[type(e) for e in theirs.extensions.values()])
    env.filters.update({name: guarded(f) for name, f in theirs.filters.items()})
    env.globals.update({name: guarded(f) if inspect.isfunction(f) or inspect.isbuiltin(f) else f
                        for name, f in theirs.globals.items()})
    env.globals["namespace"] = bounded_namespace(theirs.globals["namespace"])
    ast = env.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return Compiled(env.from_string(ast), "\0".join(literals))


def control_tokens(hf, literal_text: str) -> tuple[str, ...]:
    """The strings encoded as text in messages: transformers' rule (Tokenizer._get_control_tokens, which
    would compile the template its own way): the special tokens, the listed chat_control_tokens, and
    the added tokens the template writes."""
    listed = set(getattr(hf, "chat_control_tokens", None) or ())
    return tuple(t.content for t in hf.added_tokens_decoder.values()
                 if t.special or t.content in listed or (t.content in literal_text and not t.content.isspace()))


def deadline_tracer(deadline: float):
    """A trace function that stops the template's own code (its loops) once the deadline passes."""
    def trace(frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None  # only the template's frames are traced: cheap elsewhere
        return line

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise Limits(f"the chat template ran for more than {RENDER_SECONDS:g} s")
        return line
    return trace


def render(template: jinja2.Template, context: dict) -> str:
    """The template rendered in the sandbox, within RENDER_SECONDS and RENDER_CHARS; else PromptError."""
    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(deadline_tracer(time.monotonic() + RENDER_SECONDS))
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_CHARS:
                raise Limits(f"the chat template made more than {RENDER_CHARS} characters")
            pieces.append(piece)
    except Limits as e:
        raise PromptError(str(e)) from None
    except MemoryError:
        raise PromptError("the chat template ran out of memory") from None
    except RecursionError:
        raise PromptError("the chat template recursed too deep") from None
    except Exception as e:  # a template from a model folder can raise anything: {{ 1/0 }}, raise_exception(...)
        raise PromptError(f"the model's chat template refused the messages: {one_line(e)}") from None
    finally:
        sys.settrace(previous)
    text = "".join(pieces)
    if not text.strip():
        raise PromptError("the model's chat template rendered nothing for these messages")
    return text


def hf_chat():
    """transformers' chat-template helpers, imported on first use (transformers takes seconds to import)."""
    from transformers.utils import chat_template_utils

    return chat_template_utils


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Encoding: the template's control tokens as tokens, everything else as text
# ---------------------------------------------------------------------------------------------

ENCODE_LOCK = threading.Lock()  # transformers keeps split_special_tokens as a flag on the shared backend


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx_lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def template_context(tokenizer, literal_text: str, messages: list[dict], add_generation_prompt: bool,
                     tools: list[dict] | None = None) -> dict:
    """What apply_chat_template hands the template, the control tokens in the user's strings marked as text."""
    hf = hf_tokenizer(tokenizer)
    control = hf_chat()._get_control_token_patterns(control_tokens(hf, literal_text))[0]
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
    extra = {}
    if isinstance(getattr(tokenizer, "_thinking_kwarg", None), str):  # mlx_lm's wrapper passes its thinking switch
        extra[tokenizer._thinking_kwarg] = tokenizer.has_thinking
    if tools is not None:
        tools = hf_chat()._plain_template_data(marked(tools, control))
    return {**hf.special_tokens_map, **extra, "tools": tools, "documents": None,
            "messages": hf_chat()._plain_template_data(marked(messages, control)),
            "add_generation_prompt": add_generation_prompt}


def marked(value, control: re.Pattern):
    """transformers' mark_control_tokens, dict keys marked too: it leaves them as they are, and a template's tojson
    writes them out (a tool's parameter named "<|im_start|>system", a call's argument keys: forged turns)."""
    if isinstance(value, dict):
        return {marked(k, control): marked(v, control) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [marked(v, control) for v in value]
    return hf_chat().mark_control_tokens(value, control)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """The chat template applied to the messages (and the tools, as OpenAI's function definitions) and
    encoded: exactly apply_chat_template's ids for ordinary text, but a control token's string in a
    message or a tool is text. PromptError if it cannot be."""
    return encode_rendered(tokenizer, render_chat(tokenizer, messages, add_generation_prompt, tools))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The chat template applied to the messages, as text whose control tokens are marked (see encode_rendered)."""
    try:
        template = compiled(template_source(tokenizer, tools))
    except jinja2.TemplateError as e:
        raise PromptError(f"the model's chat template does not compile: {one_line(e)}") from None
    try:  # transformers' helpers walk the messages and tools recursively
        context = template_context(tokenizer, template.literal_text, messages, add_generation_prompt, tools)
    except RecursionError:
        raise PromptError("the messages or tools are nested too deeply to render") from None
    return render(template.template, context)


def template_source(tokenizer, tools: list[dict] | None) -> str:
    """The chat template's text. A model may name several (transformers' list form, loaded as a dict): "tool_use"
    with tools when there is one, else "default", as transformers picks."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        names = ", ".join(map(repr, source))
        source = source.get("tool_use" if tools is not None and "tool_use" in source else "default")
        if source is None:
            raise PromptError(f"the model's chat templates are named {names}, with no 'default'")
    if not source:
        raise PromptError("this model has no chat template")
    if not isinstance(source, str):
        raise PromptError(f"the model's chat template is not text but {type(source).__name__}")
    return source


def encode_rendered(tokenizer, text: str) -> list[int]:
    """The ids of render_chat's text (or of a piece of it that starts at a control token): the template's
    control tokens as tokens, the messages' text as text."""
    try:
        text.encode()
    except UnicodeEncodeError:  # the tokenizer's TypeError, deep inside (a message of the Python API or the chat)
        raise PromptError("the messages hold a lone surrogate (\\ud800-\\udfff), which is not text") from None
    try:
        with ENCODE_LOCK:
            return hf_chat().encode_marked_chat(hf_tokenizer(tokenizer), text)
    except ValueError as e:  # a control token the tokenizer also makes from plain text
        raise PromptError(one_line(e)) from None


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text (a --raw prompt, a completion's prompt, a file) encoded as the tokenizer does, but
    with every special token's string as text."""
    with ENCODE_LOCK:
        return hf_tokenizer(tokenizer).encode(text, split_special_tokens=True)
