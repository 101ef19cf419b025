"""The chat session: the history, its templating, reuse of the KV cache, the slash commands.

`Chat` holds a conversation (complete turns only) and the KV cache of the tokens it last ran
through the model; each turn re-templates the whole history and reuses the cached keys and
values of the prefix it shares with the turn before. `repl` is the loop a terminal or a pipe
talks to.
"""

import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import sys

import mlx.core as mx

__all__ = ["Chat", "repl"]

CHAT_HELP = """Commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and forget the conversation (/system alone: the default)
  /help           this help
  /quit           leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during an answer stops it; the cut answer and its question are dropped from the history,
which keeps every complete turn before it."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation: the turns so far, and the KV cache of the tokens last run through the model."""

    def __init__(self, params, config, tokenizer, system=None, sampling=q.Sampling(), max_tokens=512,
                 max_kv_size=None, kernels="reference", speculation=None):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.speculation = speculation or {}  # generate's options for speculative decoding; {}: plain
        self.system, self.sampling, self.max_tokens, self.kernels = system, sampling, max_tokens, kernels
        self.max_kv = max_kv_size or config.max_position_embeddings
        self.turns: list[tuple[str, str]] = []  # (user, assistant), complete turns only
        self.cache = q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds
        self.last_report: dict = {}

    def prompt_ids(self, user: str) -> list[int]:
        """The whole history re-templated: one system message, the turns in order, the new message."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for u, a in self.turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def fit(self, user: str, notice) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until they fit the cache, or None."""
        ids = self.prompt_ids(user)
        while len(ids) >= self.max_kv and self.turns:
            self.turns.pop(0)
            notice(f"notice: dropped the oldest turn to fit --max-kv-size {self.max_kv}")
            ids = self.prompt_ids(user)
        if len(ids) >= self.max_kv:
            notice(f"error: this message needs {len(ids)} tokens of context, more than --max-kv-size "
                   f"{self.max_kv}; it was not sent")
            return None
        return ids

    def command(self, line: str) -> str:
        """Carry out a /command; its notice, or "quit"."""
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return "quit"
        if command == "/help":
            return CHAT_HELP
        if command == "/reset":
            self.turns = []
            return "notice: the conversation was forgotten"
        if command == "/system":
            self.system, self.turns = (rest.strip() or None), []
            return "notice: new system message; the conversation was forgotten"
        return f"unknown command {command}: /help lists the commands"

    def reply(self, user: str, ids: list[int], notice):
        """Yield the answer's text segments; the turn joins the history only once it completes."""
        # reuse the cached keys and values of the prefix this prompt shares with the last one
        reuse = min(common_prefix(self.cached, ids), len(ids) - 1)
        cache = {"layers": self.cache["layers"], "offset": mx.array(reuse)}
        report, answer = {}, []
        speculation = {**self.speculation, "history": ids[:reuse]} if self.speculation else {}
        for segment in q.generate(self.params, self.config, self.tokenizer, ids[reuse:], cache, report,
                                  sampling=self.sampling, max_tokens=self.max_tokens,
                                  max_kv_size=self.max_kv, kernels=self.kernels, **speculation):
            answer.append(segment)
            yield segment
        self.turns.append((user, "".join(answer)))
        self.cache = report["cache"]
        self.cached = (ids + report["generated"])[: len(ids) + report["cached_new"]]
        if report["finish_reason"] == "context":
            notice(f"notice: the answer stopped at --max-kv-size {self.max_kv}")
        self.last_report = report


def notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def repl(chat: Chat, interactive: bool) -> None:
    """Talk until end of input or /quit: a prompt and line editing in a terminal, one turn per line otherwise.

    Answers go to stdout (in a pipe each is followed by an empty line); everything else to stderr.
    """
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    config = chat.config
    notice(f"qwen2-scratch chat ({config.num_hidden_layers} layers, {len(chat.tokenizer.vocab)} tokens); "
           "/help for commands, Ctrl-D or /quit to leave")
    lines = iter(sys.stdin) if not interactive else None
    while True:
        try:
            line = input("> ") if interactive else next(lines, None)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:
            if interactive:
                notice("")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            said = chat.command(line)
            if said == "quit":
                return
            notice(said)
            continue
        ids = chat.fit(line, notice)
        if ids is None:
            continue
        try:
            for segment in chat.reply(line, ids, notice):
                sys.stdout.write(segment)
                sys.stdout.flush()
            sys.stdout.write("\n" if interactive else "\n\n")
            sys.stdout.flush()
            notice(q.stats_line(chat.last_report))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            sys.stdout.flush()
            notice("[interrupted: this question and its answer were dropped from the history]")
