"""The chat: scripted through pipes, and through a pseudo-terminal for Ctrl-C."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import COMMAND, STATS, run_cli, tiny_model
from qwen2s import chat as chat_module
from qwen2s import weights
from qwen2s.engine import Engine, Request

# ---------------------------------------------------------------------------------------------
# Chat: scripted through pipes, and through a pseudo-terminal for Ctrl-C
# ---------------------------------------------------------------------------------------------


def chat(*lines, args=(), model=None):
    """Run `chat` with stdin not a terminal: one user turn per line."""
    return run_cli("chat", *(["--model", str(model)] if model else []), *args, input="".join(f"{x}\n" for x in lines))


def prefills(stderr):
    return [int(n) for n in re.findall(r"prefill: (\d+) tokens", stderr)]


def test_chat_script_prints_only_answers_and_reuses_the_cache(tiny_folder):
    system = "the lazy dog " * 100  # several prefill chunks: the second turn reuses all of the first turn
    result = chat("hello world", "the quick brown fox", model=tiny_folder,
                  args=["--max-tokens", "12", "--temp", "0", "--system", system])
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("\n\n")
    assert len(answers) == 3 and answers[2] == "" and all(answers[:2])  # each answer, then an empty line
    assert "hello world" not in result.stdout  # the input is never echoed
    first, second = prefills(result.stderr)
    tokenizer = weights.load_tokenizer(tiny_folder)
    new = tokenizer.encode("<|im_end|>\n<|im_start|>user\nthe quick brown fox<|im_end|>\n<|im_start|>assistant\n")
    # the second prompt: the first, its 12 drawn tokens, the new turn; the cache holds all but the last drawn token
    # on the CPU (rows exact: only the new turn is prefilled), whole chunks of them on a GPU
    chunk = q.prefill_chunk()
    cached = first + 11 if q.rows_exact(mx.float32, "reference", chunk) else (first + 11) // chunk * chunk
    assert first > 300 and second == first + 12 + len(new) - cached, "the second turn reuses what the cache can hold"
    assert len(re.findall(STATS, result.stderr)) == 2


def make_chat(tokenizer_dir, system=None, max_tokens=12, chunk=None):
    """A Chat over a tiny random model (one that does end its answers)."""
    model, raw = tiny_model()
    params, config = tree_unflatten(tree_flatten(model.parameters())), q.config_from_dict(raw)
    runner = Engine(params, config, weights.load_tokenizer(tokenizer_dir), chunk=chunk)
    return chat_module.Chat(runner, system, q.Sampling(temp=1.0), max_tokens)


def second_answer(tokenizer_dir, *lines, system=None):
    """The tokens of the chat's last answer after these lines (turns and /commands), sampled with
    the same seed for each answer, so that any change in the logits shows."""
    c = make_chat(tokenizer_dir, system)
    for line in lines:
        if line.startswith("/"):
            c.command(line)
        else:
            for _ in c.reply(line, c.fit(line, print), print):
                pass
    return c.turns[-1][1]


def test_chat_history_reset_and_system(tiny_folder, tiny_tokenizer_dir):
    with_history = second_answer(tiny_tokenizer_dir, "hello world", "the lazy dog")
    alone = second_answer(tiny_tokenizer_dir, "the lazy dog")
    assert with_history != alone, "the second answer should depend on the first turn"
    assert second_answer(tiny_tokenizer_dir, "hello world", "/reset", "the lazy dog") == alone, "/reset forgets"
    assert second_answer(tiny_tokenizer_dir, "/system the quick fox", "the lazy dog") != alone, "/system changes it"
    assert second_answer(tiny_tokenizer_dir, "the lazy dog", system="the quick fox") == \
        second_answer(tiny_tokenizer_dir, "/system the quick fox", "the lazy dog")  # as --system does
    result = chat("hello world", "/reset", "/system the quick fox", "/help", "/nope", model=tiny_folder,
                  args=["--max-tokens", "4"])
    assert "the conversation was forgotten" in result.stderr and "new system message" in result.stderr
    assert "/reset" in result.stderr and "dropped from the history" in result.stderr
    assert "unknown command /nope" in result.stderr and result.stdout.count("\n\n") == 1


@pytest.mark.parametrize("chunk", [q.EXACT_ROWS, 256], ids=["rows exact", "whole chunks"])
def test_a_turn_answers_as_a_fresh_engine_would_whatever_the_prompt_cache_holds(tiny_tokenizer_dir, chunk):
    """Chunks of 64 on the CPU: rows exact, the whole history comes from the cache. Chunks of 256, or a GPU: the
    cache gives back whole chunks only. Either way each turn goes on from the very tokens of the answer before."""
    c = make_chat(tiny_tokenizer_dir, system="the quick brown fox " * 80, chunk=chunk)
    before, ended = None, None
    for line in ("hello world", "the quick brown fox", "jumps over the lazy dog"):
        ids = c.fit(line, print)
        answer = "".join(c.reply(line, ids, print))
        if before is not None:
            assert tuple(ids[: len(before)]) == before, "the turn goes on from the last prompt and answer's tokens"
            in_cache = len(before) - (ended != "stop")  # an answer's last token is drawn, not run (but an end dropped)
            assert c.last.usage.cached_tokens == in_cache // c.engine.granule * c.engine.granule
        before, ended = c.transcript.ids, c.last.finish_reason
        fresh = make_chat(tiny_tokenizer_dir, chunk=chunk)
        request = Request(tuple(ids), c.sampling, c.max_tokens, seed=c.seed + len(c.turns) - 1)
        assert answer == "".join(e.text for e in fresh.engine.generate(request)), line


def test_chat_drops_the_oldest_turns_when_the_history_overflows(tiny_folder):
    result = chat("hello world", "the quick brown fox", "jumps over the lazy dog", "hello", model=tiny_folder,
                  args=["--max-kv-size", "150", "--max-tokens", "10"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"notice: dropped the (oldest turn|\d+ oldest turns) to fit --max-kv-size 150", result.stderr)
    assert len(result.stdout.split("\n\n")) == 5  # every turn still answered
    too_long = chat("hello world " * 40, model=tiny_folder, args=["--max-kv-size", "30"])
    assert too_long.returncode == 0 and "it was not sent" in too_long.stderr


def test_chat_end_of_input_and_quit_exit_0(tiny_folder):
    assert chat(model=tiny_folder).returncode == 0
    result = chat("/quit", "hello", model=tiny_folder)
    assert result.returncode == 0 and result.stdout == ""


class Terminal:
    """The chat in a pseudo-terminal, as a person runs it."""

    def __init__(self, *args, command=(str(COMMAND),), hangup=signal.SIG_DFL):
        """hangup: SIGHUP's disposition in the chat (SIG_IGN: as under nohup), whatever the tests' own is."""
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([*command, "chat", *args], stdin=slave, stdout=slave, stderr=slave,
                                     close_fds=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup))
        os.close(slave)
        self.seen = ""

    def read_until(self, pattern, timeout=120, since=0):
        """Read until pattern shows in what was written from offset `since` on, or the chat left."""
        end = time.time() + timeout
        while not re.search(pattern, self.seen[since:]):
            assert time.time() < end, f"no {pattern!r} in:\n{self.seen}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        return self.seen

    def type(self, text):
        os.write(self.master, text.encode())

    def close(self, timeout=60):
        """Wait for the chat to exit, reading what it still writes so that it never blocks on a full pty."""
        end = time.time() + timeout
        while self.proc.poll() is None:
            assert time.time() < end, f"the chat did not exit:\n{self.seen[-2000:]}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    pass
        while select.select([self.master], [], [], 0)[0]:  # what it wrote last, for the failure message
            try:
                if not (data := os.read(self.master, 4096)):
                    break
            except OSError:  # the child closed the terminal: nothing more
                break
            self.seen += data.decode(errors="replace")
        os.close(self.master)
        return self.proc.returncode


def test_chat_in_a_terminal_survives_ctrl_c(tiny_folder):
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "100000", "--temp", "0")
    term.read_until(r"> $")
    term.type("hello world\n")
    term.read_until(r"hello world\r?\n.{20}")  # the answer is streaming
    term.proc.send_signal(signal.SIGINT)
    term.read_until(r"interrupted: this question and its answer were dropped.*\n> $")
    term.type("the lazy dog\n")
    term.read_until(r"the lazy dog\r?\n.{5}")
    term.proc.send_signal(signal.SIGINT)
    term.read_until(r"interrupted.*\n> $")
    term.proc.send_signal(signal.SIGINT)  # at the prompt: leave
    assert term.close() == 0
    assert "Traceback" not in term.seen


MOMENTS = [0, 0, 0.001, 0.005, 0.02, 0.05, 0.2]  # seconds after a line is sent: answer, prompt or both


def ctrl_c_session(folder, rng, max_tokens, rounds):
    """One chat in a terminal: lines sent and Ctrl-C at random moments. During an answer the chat says
    "[interrupted" and goes on; as the next prompt appears or at it, the chat leaves."""
    term = Terminal("--model", str(folder), "--max-tokens", str(max_tokens), "--temp", "0")
    term.read_until(r"> $")
    for _ in range(rounds):
        start = len(term.seen)
        term.type("hello world\n")
        term.read_until(r"hello world\r?\n", since=start)
        time.sleep(rng.choice(MOMENTS))
        term.proc.send_signal(signal.SIGINT)
        term.read_until(r"\[interrupted[^\n]*\n> $", timeout=30, since=start)  # or the chat has left
        if "[interrupted" not in term.seen[start:]:
            break  # the Ctrl-C came at the prompt: the chat leaves by itself
    else:
        time.sleep(rng.choice(MOMENTS[:4]))
        term.proc.send_signal(signal.SIGINT)  # at the prompt: leave
    code = term.close(timeout=20)
    assert code == 0, f"exit code {code}:\n{term.seen[-1000:]}"
    assert "Traceback" not in term.seen


def test_chat_in_a_terminal_never_hangs_on_ctrl_c_at_varied_moments(tiny_folder):
    """A Ctrl-C landing between the prompt and readline's wait once hung the chat (5 times in 7
    under load): many sessions, Ctrl-C at varied moments, with a busy process beside them."""
    rng = random.Random(12)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline, sessions = time.time() + 90, 0
        while sessions < 4 or (time.time() < deadline and sessions < 12):
            ctrl_c_session(tiny_folder, rng, rng.choice([3, 100000]), rounds=rng.choice([1, 3]))
            sessions += 1
    finally:
        hog.kill()
        hog.wait()


# The console script, but each step of an answer runs as NVRTC compiles a kernel: with a SIGINT handler of
# its own, in C, that exits (libc's exit: code 2 here, 4 from NVRTC's); the first step holds it for a second.
NATIVE_HANDLER = """
import ctypes, signal, sys, time

from qwen2s import cli  # first, as in the console script: the libraries load with SIGINT blocked
from qwen2s import chat, engine


class Sigaction(ctypes.Structure):  # glibc's struct sigaction
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


libc = ctypes.CDLL(None)
exits = Sigaction(ctypes.cast(libc.exit, ctypes.c_void_p).value)
step, answer, answering = engine.Engine.step, chat.answer, []


def step_as_nvrtc(self):
    if not answering:  # the warm-up
        return step(self)
    saved = Sigaction()
    libc.sigaction(signal.SIGINT, ctypes.byref(exits), ctypes.byref(saved))
    try:
        if len(answering) == 1:
            answering.append("compiled")
            print("compiling", file=sys.stderr, flush=True)
            time.sleep(1)
        return step(self)
    finally:
        libc.sigaction(signal.SIGINT, ctypes.byref(saved), None)


def answer_as_nvrtc(*args, **kwargs):
    answering.append("answering")
    return answer(*args, **kwargs)


engine.Engine.step, chat.answer = step_as_nvrtc, answer_as_nvrtc
cli.main()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's struct sigaction")
def test_ctrl_c_while_a_native_library_holds_sigint_stops_the_answer(tiny_folder):
    """On a GPU, each new shape has NVRTC compile a kernel (MLX's own, cuDNN's attention), with a SIGINT handler of
    its own that calls exit(4): a Ctrl-C landing then (as the first answer began) ended the chat with code 4 and
    no message, 21 sessions in 37 on the H200. Every thread blocks SIGINT; one thread takes it for Python."""
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "100000", "--temp", "0",
                    command=(sys.executable, "-c", NATIVE_HANDLER))
    term.read_until(r"> $")
    term.type("hello world\n")
    term.read_until(r"compiling\r?\n")
    term.proc.send_signal(signal.SIGINT)  # within the native call: held until it returns, then the answer stops
    term.read_until(r"\[interrupted: this question[^\n]*\n> $", timeout=30)
    term.proc.send_signal(signal.SIGINT)  # at the prompt: leave
    code = term.close()
    assert code == 0, f"exit code {code}:\n{term.seen[-1000:]}"
    assert "Traceback" not in term.seen


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's struct sigaction")
def test_ctrl_c_while_a_native_library_holds_sigint_ends_generate_with_130(tiny_folder):
    """generate as the chat: a Ctrl-C while NVRTC's handler is in place ends it as any Ctrl-C does (exit 130)."""
    script = NATIVE_HANDLER.replace("cli.main()", "answering.append('generating')  # every step\ncli.main()")
    proc = subprocess.Popen([sys.executable, "-c", script, "generate", "--model", str(tiny_folder), "--prompt",
                             "hello world", "--max-tokens", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline() == "compiling\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_three_fast_ctrl_c_during_an_answer_keep_the_chat(tiny_folder):
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "100000", "--temp", "0")
    term.read_until(r"> $")
    term.type("hello world\n")
    term.read_until(r"hello world\r?\n.{20}")
    for _ in range(3):
        term.proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    term.read_until(r"\[interrupted[^$]*> $")
    time.sleep(1)
    assert term.proc.poll() is None, term.seen[-500:]  # still chatting, the history with it
    start = len(term.seen)
    term.type("/help\n")
    term.read_until(r"Commands:[^$]*\n> $", since=start)
    term.type("\x04")
    assert term.close() == 0 and "Traceback" not in term.seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_at_the_prompt_restores_the_terminal(tiny_folder, sig):
    import termios

    term = Terminal("--model", str(tiny_folder), "--max-tokens", "3", "--temp", "0")
    echo = termios.tcgetattr(term.master)[3] & termios.ECHO
    term.read_until(r"> $")
    time.sleep(0.3)  # readline has taken the terminal (echo off) while it waits
    term.proc.send_signal(sig)
    term.proc.wait(timeout=30)
    assert termios.tcgetattr(term.master)[3] & termios.ECHO == echo != 0
    assert term.close() == 128 + sig and "Traceback" not in term.seen


def test_under_nohup_a_hangup_at_the_prompt_leaves_the_chat_running(tiny_folder):
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "3", "--temp", "0", hangup=signal.SIG_IGN)
    term.read_until(r"> $")
    time.sleep(0.3)
    term.proc.send_signal(signal.SIGHUP)
    start = len(term.seen)
    term.type("/help\n")
    term.read_until(r"Commands:[^$]*\n> $", since=start)
    term.type("\x04")
    assert term.close() == 0 and "Traceback" not in term.seen


def test_a_block_open_at_end_of_input_is_sent_and_inner_quotes_are_text(tiny_folder):
    from qwen2s import prompts

    tokenizer = weights.load_tokenizer(tiny_folder)
    result = chat('"""the quick', 'foo"""bar', "brown fox", model=tiny_folder, args=["--max-tokens", "2"])
    assert result.returncode == 0, result.stderr
    sent = prompts.encode_chat(tokenizer, [{"role": "user", "content": 'the quick\nfoo"""bar\nbrown fox'}])
    assert prefills(result.stderr) == [len(sent)]
    closed = chat('"""hello', 'world"""', "the lazy dog", model=tiny_folder, args=["--max-tokens", "2"])
    first = prompts.encode_chat(tokenizer, [{"role": "user", "content": "hello\nworld"}])
    assert prefills(closed.stderr)[0] == len(first) and len(prefills(closed.stderr)) == 2


def test_an_overflowing_history_drops_half_the_cache_at_once(tiny_folder):
    params, config, tokenizer = weights.load(str(tiny_folder), "float32")
    session = chat_module.Chat(Engine(params, config, tokenizer, max_kv_size=200), None, q.Sampling(temp=0.0), 4)
    notices = []
    for i in range(40):
        before = len(notices)
        ids = session.fit(f"hello world {i}", notices.append)
        dropped = len(notices) > before
        assert len(ids) < 200 and (not dropped or len(ids) <= 100 or not session.turns), (len(ids), notices)
        list(session.reply(f"hello world {i}", ids, notices.append))
    drops = [n for n in notices if "dropped" in n]
    assert 2 <= len(drops) < 40 // 2, notices  # a drop every few turns (half the cache), not one every turn


def test_chat_in_a_terminal_keeps_history_after_ctrl_c_and_leaves_on_ctrl_d(tiny_folder):
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "6", "--temp", "0")
    term.read_until(r"> $")
    term.type("hello world\n")
    term.read_until(r"peak memory.*\n> $")
    term.type("\x04")  # Ctrl-D
    assert term.close() == 0 and "Traceback" not in term.seen


def test_chat_in_a_terminal_refuses_a_line_that_is_not_utf8_and_goes_on(tiny_folder):
    term = Terminal("--model", str(tiny_folder), "--max-tokens", "3", "--temp", "0")
    term.read_until(r"> $")
    term.type("hello world\n")
    term.read_until(r"peak memory.*\n> $")
    os.write(term.master, b"caf\xe9 \xff\n")
    term.read_until(r"not valid UTF-8.*\n> $")
    term.type("the lazy dog\n")
    term.read_until(r"peak memory[^$]*peak memory.*\n> $")
    term.type("\x04")  # Ctrl-D
    assert term.close() == 0 and "Traceback" not in term.seen


@pytest.mark.packaged_model
def test_chat_with_the_packaged_model_remembers_and_forgets():
    result = chat("My name is Ada. Please remember it.", "What is my name?", "/reset", "What is my name?",
                  args=["--temp", "0", "--max-tokens", "24"])
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("\n\n")
    assert "Ada" in answers[1], answers
    assert "Ada" not in answers[2], answers




def test_every_turn_answers_as_a_fresh_engine_would_across_dropped_turns(tiny_tokenizer_dir):
    """The chat hands its row's cache from turn to turn through the prompt cache and drops the oldest turns
    when the history overflows: each turn's tokens are still those a fresh engine gives its prompt."""
    c = make_chat(tiny_tokenizer_dir, max_tokens=12)
    c.engine.max_kv = c.max_kv = 160
    notices = []
    for i in range(12):
        line = f"hello world {i}"
        ids = c.fit(line, notices.append)
        answer = "".join(c.reply(line, ids, notices.append))
        fresh = make_chat(tiny_tokenizer_dir).engine
        request = Request(tuple(ids), c.sampling, c.max_tokens, seed=c.seed + len(c.turns) - 1)
        assert answer == "".join(e.text for e in fresh.generate(request)), (i, notices)
    assert any("dropped" in n for n in notices), notices


@pytest.mark.parametrize("system", [None, "the quick brown fox"], ids=["no system", "system"])
@pytest.mark.parametrize("rewrites", [False, True], ids=["chatml", "rewrites answers"])
def test_a_turn_templates_only_what_it_adds_and_gets_the_whole_historys_text(tiny_tokenizer_dir, monkeypatch, system,
                                                                           rewrites):
    """Each turn's text is the whole history templated, but only the last turn and the new message are templated
    (the whole history's template ran 21 ms a turn at 20,000 tokens). Its ids: the last prompt's and the answer's
    drawn ids, then the new text's; where the template writes the answer otherwise than drawn (here: a prefix),
    the last prompt's ids, then the answer as templated and the new message, encoded (not the whole history again,
    whose every answer since the last such turn had other ids than drawn)."""
    c = make_chat(tiny_tokenizer_dir, system=system, max_tokens=6, chunk=16)  # a GPU reuses whole chunks: small ones
    granule = c.engine.granule  # 1 on the CPU in float32
    if rewrites:
        c.tokenizer._tokenizer.chat_template = c.tokenizer._tokenizer.chat_template.replace(
            "{{ m['content'] }}", "{{ 'ANSWER: ' if m['role'] == 'assistant' else '' }}{{ m['content'] }}")
    rendered, render = [], chat_module.prompts.render_chat
    monkeypatch.setattr(chat_module.prompts, "render_chat",
                        lambda t, m, *a: rendered.append(len(m)) or render(t, m, *a))
    for i in range(8):
        line = f"hello world {i}"
        rendered.clear()
        last = c.transcript
        ids = c.fit(line, print)
        text, fitted = c.text, list(rendered)
        assert text == render(c.tokenizer, c.messages(c.turns, line)), i
        if last is not None:
            kept = last.prompt if rewrites else len(last.ids)
            asked = last.text[: len(last.text) - len(last.answer)]
            assert ids == [*last.ids[:kept], *chat_module.prompts.encode_rendered(
                c.tokenizer, text[len(asked if rewrites else last.text):])], i
            if not rewrites:
                assert ids == c.prompt_ids(line, incremental=False), i
            assert max(fitted) <= 4 + (system is not None), (i, fitted)  # system, the last turn, the new message
        for _ in c.reply(line, ids, print):
            pass
        if last is not None:
            # where rows are exact the cache kept the last turn's whole row (its answer too), else its prompt's chunks
            reused = kept if granule == 1 else last.prompt // granule * granule
            assert c.last.usage.prompt_tokens - c.last.usage.cached_tokens <= len(ids) - reused + 1, i
    assert len(c.turns) == 8


def test_every_turn_goes_on_from_the_drawn_ids_of_the_turns_before(tiny_tokenizer_dir):
    """The history keeps each answer as drawn: templated again it is the transcript's text, so every turn's ids begin
    with the last turn's prompt and drawn ids and only the new turn is prefilled. From the streamed text (here: some
    answers' first token loses its leading space), the whole history was encoded again on such turns, its answers'
    text giving other ids than those drawn, and every turn since the last such one was prefilled again."""
    c = make_chat(tiny_tokenizer_dir, max_tokens=8, chunk=16)  # a GPU reuses whole chunks: small ones
    granule = c.engine.granule  # 1 on the CPU in float32
    for i in range(40):
        line = f"line {i}"
        ids = c.fit(line, print)
        before = c.transcript
        answer = "".join(c.reply(line, ids, print))
        if before is not None:
            assert tuple(ids[: len(before.ids)]) == before.ids, i
            # where rows are exact the cache kept the last turn's whole row (its answer too), else its prompt's chunks
            reused = len(before.ids) if granule == 1 else before.prompt // granule * granule
            assert c.last.usage.prompt_tokens - c.last.usage.cached_tokens <= len(ids) - reused + 1, i
        assert c.turns[-1][1].lstrip() == answer.lstrip() or "\ufffd" in answer, (i, answer)
