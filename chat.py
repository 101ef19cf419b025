"""The chat session: the history, its templating, reuse of the KV cache, the slash commands.

`Chat` holds a conversation (complete turns only); each turn templates only what it adds to the history
(the last turn and the new message, `Chat.new_text`), and the engine's prompt cache gives back the keys and
values of the prefix it shares with the turn before. The last answer goes back to the model as the very
tokens it drew (`Transcript`), not its text encoded again, so that the cache holds the whole history and a
turn prefills only its new tokens. `repl` is the loop a terminal or a pipe talks to.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import _thread
import contextlib
import queue
import signal
import sys
import termios
import threading
import time
from typing import NamedTuple

from qwen2s import prompts
from qwen2s.engine import Engine, Event, Request, stats_line
from qwen2s.say import say

__all__ = ["Chat", "repl", "ctrl_c_through_python", "InputTooLong"]

CHAT_HELP = """Commands:
  /reset, /clear  forget the conversation (the system message stays)
  /system TEXT    set the system message and forget the conversation (/system alone: the default)
  /help           this help
  /quit, /exit, /bye   leave (so do Ctrl-D, and Ctrl-C at the prompt)
  \"\"\"              begin a message of several lines; a line ending in \"\"\" ends it
Ctrl-C during an answer stops it; the cut answer and its question are dropped from the history,
which keeps every complete turn before it."""


class Transcript(NamedTuple):
    """The last turn as the model saw it: the prompt's ids and the answer's drawn ids (but an end-of-sequence
    token), the rendered text they stand for (the prompt's text and those ids decoded), the answer's part
    of that text (the drawn ids decoded), and how many of the ids are the prompt's."""

    ids: tuple[int, ...]
    text: str
    answer: str = ""
    prompt: int = 0


class Chat:
    """A conversation: the turns so far, answered through the engine (whose prompt cache keeps the
    keys and values of the turns before, so a turn prefills little more than its new tokens)."""

    def __init__(self, engine: Engine, system=None, sampling=q.Sampling(), max_tokens=512, seed: int = 0):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.system, self.sampling, self.max_tokens, self.seed = system, sampling, max_tokens, seed
        self.max_kv = engine.max_kv
        self.turns: list[tuple[str, str]] = []  # (user, assistant), complete turns only
        self.last: Event | None = None  # the last answer's final event: usage and stats
        self.transcript: Transcript | None = None  # the last complete turn's ids, when they are the history's
        self.text = ""  # the rendered text of the prompt last built

    def messages(self, turns: list[tuple[str, str]], user: str | None) -> list[dict]:
        """The system message (if any), the turns in order, then the new user message (if any)."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return messages + ([{"role": "user", "content": user}] if user is not None else [])

    def prompt_ids(self, user: str, incremental: bool = True) -> list[int]:
        """The history templated: one system message, the turns in order, the new message. Where the
        rendered text begins with the last turn's transcript (the template did not rewrite it, no turn was
        dropped), the transcript's ids stand for that part and only the rest is encoded.

        incremental: the last turn goes on from the transcript, so only the new part is templated (`new_text`):
        templating the whole history took 21 ms a turn at 20,000 tokens (a template's run, in its sandbox, grows
        with the messages), as much as the turn's model work on the tiny model. False: the whole history (after
        turns were dropped, the transcript no longer begins the prompt)."""
        last = self.transcript
        went_on = self.new_text(user) if incremental and last is not None and self.turns else None
        if went_on is not None:
            kept, tail = went_on
            self.text = (last.text if kept == len(last.ids) else last.text[: len(last.text) - len(last.answer)]) + tail
            return [*last.ids[:kept], *prompts.encode_rendered(self.tokenizer, tail)]
        self.text = text = prompts.render_chat(self.tokenizer, self.messages(self.turns, user))
        if last is not None and self.turns and text.startswith(last.text) and len(text) > len(last.text):
            return [*last.ids, *prompts.encode_rendered(self.tokenizer, text[len(last.text):])]
        return prompts.encode_rendered(self.tokenizer, text)

    def new_text(self, user: str) -> tuple[int, str] | None:
        """How many of the transcript's ids stand, and the text the whole history's template adds after them,
        templated from the last turn alone: the system message, the last turn and the new message, less the
        system message and the last question templated as the last prompt was, and the answer as drawn. That is
        the whole template's new text for any template that writes a turn the same way whatever turns come before
        it (Qwen's, ChatML's, Llama's and Mistral's do: each message's text depends on the message, the system
        message and its own place after the last question).

        Where the template writes the answer otherwise than drawn (a control token's string in it, marked as
        text; a template that rewrites answers), the last prompt's ids stand and the answer is encoded again from
        the template's text with the rest: the whole history encoded again had other ids for every answer since
        the last such turn (the tiny model: 248 turns of 5,000 prefilled 1,100 tokens again on average, a quarter
        of the run). None where the window's text does not go on from the last prompt (then the whole history is
        templated, as before)."""
        u, a = self.turns[-1]
        asked = prompts.render_chat(self.tokenizer, self.messages([], u))
        after = prompts.render_chat(self.tokenizer, self.messages([(u, a)], user))
        said = asked + self.transcript.answer
        if after.startswith(said) and len(after) > len(said):
            return len(self.transcript.ids), after[len(said):]
        if after.startswith(asked) and len(after) > len(asked):
            return self.transcript.prompt, after[len(asked):]
        return None

    def fit(self, user: str, notice) -> list[int] | None:
        """The prompt ids; when they overflow the cache, without the oldest turns, dropped until the prompt
        takes half the cache at most (as llama.cpp's context shift discards half): one turn at a time
        changed the prefix every turn, so each turn re-templated and re-ran the whole history. None if
        the message cannot fit even alone."""
        ids = self.prompt_ids(user)
        if len(ids) < self.max_kv or not self.turns:
            return self.refuse_too_long(ids, notice)
        turns = self.turns
        low, high = 1, len(turns)  # the fewest oldest turns to drop so that the prompt takes half the cache
        while low < high:
            middle = (low + high) // 2
            self.turns = turns[middle:]
            if len(self.prompt_ids(user, incremental=False)) <= self.max_kv // 2:
                high = middle
            else:
                low = middle + 1
        self.turns = turns[low:]
        notice(f"notice: dropped the {'oldest turn' if low == 1 else f'{low} oldest turns'} to fit "
               f"--max-kv-size {self.max_kv}")
        return self.refuse_too_long(self.prompt_ids(user, incremental=False), notice)

    def refuse_too_long(self, ids: list[int], notice) -> list[int] | None:
        if len(ids) >= self.max_kv:
            notice(f"error: this message needs {len(ids)} tokens of context, more than --max-kv-size "
                   f"{self.max_kv}; it was not sent")
            return None
        return ids

    def command(self, line: str) -> str:
        """Carry out a /command; its notice, or "quit"."""
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit", "/bye"):  # /exit and /bye as in ollama
            return "quit"
        if command == "/help":
            return CHAT_HELP
        if command in ("/reset", "/clear"):
            self.turns, self.transcript = [], None
            return "notice: the conversation was forgotten"
        if command == "/system":
            self.system, self.turns, self.transcript = (rest.strip() or None), [], None
            return "notice: new system message; the conversation was forgotten"
        return f"unknown command {command}: /help lists the commands"

    def ask(self, user: str, notice=None):
        """One turn from a script: yield the answer's text segments (none when the message cannot fit)."""
        notice = notice or say
        ids = self.fit(user, notice)
        if ids is not None:
            yield from self.reply(user, ids, notice)

    def reply(self, user: str, ids: list[int], notice):
        """Yield the answer's text segments; the turn joins the history only once it completes."""
        request = Request(tuple(ids), self.sampling, self.max_tokens, seed=self.seed + len(self.turns))
        text, drawn = self.text, []
        for event in self.engine.generate(request):
            if event.token is not None:
                drawn.append(event.token)
            if event.text:
                yield event.text
            if event.finish_reason:
                self.last = event
        if drawn and drawn[-1] in self.engine.eos:  # never run through the model: the template writes its own end
            drawn.pop()
        # the history keeps the answer as drawn, not as streamed (which may differ: a first token's leading space
        # trimmed, a special token left out): templated, it is then the transcript's text, and the next turn goes
        # on from the drawn ids; from the streamed text, 13% of the tiny model's turns encoded the whole history
        # again, and prefilled every turn since the last such one
        said = self.tokenizer.decode(drawn, skip_special_tokens=False)
        self.turns.append((user, said))
        self.transcript = Transcript((*ids, *drawn), text + said, said, len(ids))
        if self.last.finish_reason == "context":
            notice(f"notice: the answer stopped at --max-kv-size {self.max_kv}")


def is_utf8(line: str) -> bool:
    """False for a line read with surrogateescape from bytes that are not UTF-8."""
    try:
        line.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class CtrlC:
    """The chat's SIGINT handler: KeyboardInterrupt at the prompt and during an answer (where it is
    expected), a flag anywhere else (between the two, where an exception would escape the loop)."""

    def __init__(self):
        self.pressed, self.raising = False, False

    def __call__(self, signum, frame):
        if self.raising:
            raise KeyboardInterrupt
        self.pressed = True

    @contextlib.contextmanager
    def raises(self):
        """Ctrl-C raises inside this block, including one pressed just before it."""
        self.raising = True
        try:
            if self.pressed:
                self.pressed = False
                raise KeyboardInterrupt
            yield
        finally:
            self.raising = False


@contextlib.contextmanager
def ctrl_c_through_python():
    """SIGINT blocked in every thread, and handed to Python's handler in the main thread by a thread that waits for it.

    While it compiles a kernel, NVRTC (MLX's CUDA kernels, cuDNN's attention: on a GPU, each new shape) puts in
    a SIGINT handler of its own that calls exit(4): a Ctrl-C landing then ended the chat silently with code 4,
    or hung it in exit() if it landed inside malloc. A blocked signal waits instead, and sigwait takes it without
    running any handler; interrupt_main then runs Python's (CtrlC's) in the main thread, as the signal would
    have, once the call into MLX returns. The threads started before this block (OpenBLAS's, as cli imports its
    libraries) started with SIGINT blocked; those started within inherit the block. On leaving, the waiting
    thread ends and this thread's mask is put back (the chat also runs inside the tests' process).
    """
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    leaving = threading.Event()

    def forward():
        while True:
            signal.sigwait({signal.SIGINT})
            if leaving.is_set():
                return
            _thread.interrupt_main(signal.SIGINT)

    waiter = threading.Thread(target=forward, name="ctrl-c", daemon=True)
    waiter.start()
    try:
        yield
    finally:
        leaving.set()
        signal.pthread_kill(waiter.ident, signal.SIGINT)  # wakes its sigwait, to this thread alone
        waiter.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def prompt(text: str) -> str:
    """input() in a thread of its own, while the main thread waits in Python, where Ctrl-C always raises.

    readline notices a signal only if it lands while its select() waits: one that landed just
    before (as the prompt appeared) was noticed by nobody, and the chat hung there.
    """
    lines: queue.Queue = queue.Queue()

    def read():
        try:
            lines.put(input(text))
        except BaseException as e:  # EOFError, a decoding error: raised again in the main thread
            lines.put(e)

    terminal = termios.tcgetattr(sys.stdin.fileno())
    try:
        threading.Thread(target=read, daemon=True).start()
        while True:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.1)
                if isinstance(line, BaseException):
                    raise line
                return line
    except KeyboardInterrupt:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, terminal)  # readline left it raw
        raise


INPUT_LIMIT = 16 * 2**20  # characters of a piped line or a """ block (cli's limit on a prompt): short of /dev/zero


class InputTooLong(Exception):
    """A piped line or a \"\"\" block beyond INPUT_LIMIT: the chat ends (where the message ends is unknown)."""

    def __init__(self):
        super().__init__(f"a message on standard input is larger than {INPUT_LIMIT // 2**20} MiB, the most read")


def piped_lines(stream):
    """The stream's lines, each read only up to INPUT_LIMIT (iter(stream) read /dev/zero into memory without end)."""
    while line := stream.readline(INPUT_LIMIT + 1):
        if len(line) > INPUT_LIMIT and not line.endswith("\n"):
            raise InputTooLong
        yield line


def read_line(lines, ctrl_c: CtrlC, text: str = "> ") -> str | None:
    """The next line: from the terminal's prompt when lines is None; None at the end or on Ctrl-C."""
    try:
        with ctrl_c.raises():
            line = prompt(text) if lines is None else next(lines, None)
    except (EOFError, KeyboardInterrupt):
        return None
    return None if line is None else line.rstrip("\n")


def answer(chat: Chat, line: str, interactive: bool, ctrl_c: CtrlC, quiet: bool = False) -> None:
    """Stream the answer to one user line, then its stats; KeyboardInterrupt on Ctrl-C."""
    ids = chat.fit(line, say)
    if ids is None:
        return
    with ctrl_c.raises():
        for segment in chat.reply(line, ids, say):
            sys.stdout.write(segment)
            sys.stdout.flush()
    sys.stdout.write("\n" if interactive else "\n\n")
    sys.stdout.flush()
    if not quiet:
        say(stats_line(chat.last.stats, chat.last.usage))


COALESCE = 0.3  # seconds after an interrupted answer when more Ctrl-C presses still belong to it
MULTILINE = '"""'  # ollama's quotes around a message of several lines


def read_message(first: str, read) -> str:
    '''A message: the line itself, or the lines from one opening with """ to one ending in """ (as ollama's);
    a """ elsewhere in a line (foo"""bar) is text. Input that ends inside a block sends what was typed.'''
    if not first.startswith(MULTILINE):
        return first
    lines, line, size = [], first[len(MULTILINE):], 0
    while not line.rstrip().endswith(MULTILINE):
        lines.append(line)
        size += len(line) + 1
        if size > INPUT_LIMIT:  # a block that never closes (`yes` after \"\"\")
            raise InputTooLong
        line = read()
        if line is None:
            return "\n".join(lines).strip()
    lines.append(line.rstrip()[: -len(MULTILINE)])
    return "\n".join(lines).strip()


def repl(chat: Chat, interactive: bool, quiet: bool = False) -> None:
    """Talk until end of input or /quit: a prompt and line editing in a terminal, one turn per line otherwise.

    Answers go to stdout (in a pipe each is followed by an empty line); everything else to stderr.
    Ctrl-C at the prompt leaves; during an answer it stops it, and the turn is dropped from the history
    (more presses within COALESCE seconds are the same interruption, not a Ctrl-C at the prompt).
    SIGTERM or SIGHUP at the prompt leaves with the terminal as it was (readline had turned its echo off).
    """
    ctrl_c = CtrlC()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    restore = terminal_restorer() if interactive else contextlib.nullcontext()
    try:
        with restore:
            talk(chat, interactive, ctrl_c, quiet)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def terminal_restorer():
    """The terminal's settings, put back on leaving and on SIGTERM or SIGHUP (which then exit with
    128 + the signal's number, as a death by that signal would report)."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def leave(signum, frame):
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stderr.write("\n")
        sys.exit(128 + signum)

    # a signal ignored when the chat began (nohup ignores SIGHUP) stays ignored: the user asked for that
    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def warm_up(chat: Chat) -> None:
    """Run the compiled decode step and sampler once, before the first prompt: on their first call MLX
    runs a shell command (system(), which ignores SIGINT while it runs), and a Ctrl-C then was lost."""
    for _ in chat.engine.generate(Request((0,), chat.sampling, max_tokens=2)):
        pass


def talk(chat: Chat, interactive: bool, ctrl_c: CtrlC, quiet: bool) -> None:
    warm_up(chat)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    config = chat.engine.config
    say(f"qwen2-scratch chat ({config.num_hidden_layers} layers, {len(chat.tokenizer.vocab)} tokens); "
           "/help for commands, Ctrl-D or /quit to leave")
    lines = None if interactive else piped_lines(sys.stdin)
    while True:
        if ctrl_c.pressed:  # after the answer's last token, before the prompt
            ctrl_c.pressed = False
            say("[interrupted: the answer was complete and stays in the history]")
        line = read_line(lines, ctrl_c)
        if line is not None and line.strip().startswith(MULTILINE):
            line = read_message(line.strip(), lambda: read_line(lines, ctrl_c, "... "))
        if line is None:
            if interactive:
                say("")
            return
        line = line.strip()
        if not is_utf8(line):
            say("error: this line is not valid UTF-8; it was not sent")
        elif line.startswith("/"):
            said = chat.command(line)
            if said == "quit":
                return
            say(said)
        elif line:
            try:
                answer(chat, line, interactive, ctrl_c, quiet)
            except prompts.PromptError as e:
                say(f"error: {e}; this turn was not sent")
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                sys.stdout.flush()
                say("[interrupted: this question and its answer were dropped from the history]")
                time.sleep(COALESCE)  # a fast second or third press (as people do) is this interruption,
                ctrl_c.pressed = False  # not a Ctrl-C at the prompt that would end the chat and its history
