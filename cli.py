"""The command line (console script `qwen2-scratch`): options, one-line errors, exit codes.

Each command is a thin layer over the model (qwen2_scratch), the loader (weights), the chat
and the benchmark. Bad input is a one-line error with exit code 1 (usage errors 2); Ctrl-C
outside the chat ends any command with exit code 130; a closed pipe ends it quietly.
"""

import signal

# The threads the libraries start as they load (OpenBLAS's, numpy's OpenBLAS's) inherit this thread's signal
# mask: they start with SIGINT blocked, so that the chat can keep every Ctrl-C away from a native library's
# handler (chat.ctrl_c_through_python). This thread's own mask is put back once they are loaded.
UNBLOCKED = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

# isort: split
from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import functools
import json
import math
import os
import sys

import click
import jinja2
import mlx.core as mx

from qwen2s import bench, blas, chat, cpu_attention, engine, prompts, server, speculative, weights

signal.pthread_sigmask(signal.SIG_SETMASK, UNBLOCKED)


def default_kernels() -> str:
    """The hand-written functions on the CPU; on a GPU the mx.fast kernels, measured 1.5-2x faster there."""
    return "fast" if mx.default_device() == mx.gpu else "reference"


def model_options(f):
    """--model, --dtype and --kernels, the same on every command that runs the model."""
    f = click.option("--kernels", type=click.Choice(["reference", "fast"]), default=default_kernels,
                     help="reference: our hand-written functions; fast: the mx.fast kernels at the same call "
                          "sites [default: reference on CPU, fast on GPU].")(f)
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Compute dtype [default: float32 on CPU, bfloat16 on GPU].")(f)
    f = click.option("--model", "-m", default=None, metavar="M",
                     help="Folder, .gguf file, alias (qwen2-0.5b, qwen2-1.5b, qwen2-7b) or hub id "
                          "[default: the packaged model].")(f)
    return f


class Finite(click.FloatRange):
    """A FloatRange that refuses nan and inf too (nan passes every comparison)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


class ApiKey(click.ParamType):
    """A key a request can send as it is: printable ASCII without spaces (HTTP drops those at a header's ends, and
    QWEN2_SCRATCH_API_KEYS is split at them), not empty (`--api-key "$UNSET"` let `Authorization: Bearer` alone
    in)."""

    name = "key"

    def convert(self, value, param, ctx):
        if not (value and value.isascii() and value.isprintable() and " " not in value):
            self.fail("the key must be printable ASCII, not empty, without spaces.", param, ctx)
        return value


KEYS_VARIABLE = "QWEN2_SCRATCH_API_KEYS"  # serve's keys, kept out of the command line (`ps` shows it to everyone)
COUNT_MAX = 2**63 - 1  # counts beyond 64 bits reach MLX as a failed cast (std::bad_cast), not a usage error


def Count(min: int) -> click.IntRange:  # noqa: N802 (a type, as click's are)
    """A whole number of things (tokens, proposals), at least min, within 64 bits."""
    return click.IntRange(min, COUNT_MAX)


GREEDY = {"temp": 0.0}
QWEN_CHAT = {"temp": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}  # Qwen2.5 instruct's own


def sampling_options(fallback: dict, max_tokens: int):
    """The sampling flags. Unset, temp, top-p, top-k and the penalty come from the model's
    generation_config.json, else from the command's fallback."""
    def default(name, off):
        return f"[default: the model's generation_config.json, else {fallback.get(name, off)}]"

    def decorate(f):
        for option in reversed([
            click.option("--max-tokens", type=Count(min=1), default=max_tokens, show_default=True,
                         help="Most tokens to generate."),
            click.option("--temp", type=Finite(min=0), default=None,
                         help=f"Sampling temperature; 0 is greedy {default('temp', 0)}."),
            click.option("--top-p", type=Finite(0, 1, min_open=True), default=None,
                         help=f"Nucleus sampling; 1 is off {default('top_p', 1)}."),
            click.option("--top-k", type=Count(min=0), default=None,
                         help=f"Keep the k likeliest tokens; 0 is off {default('top_k', 0)}."),
            click.option("--min-p", type=Finite(0, 1), default=0.0, show_default=True,
                         help="Drop tokens less likely than min-p times the likeliest; 0 is off."),
            click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None,
                         help=f"Penalty for recent tokens; 1 is off {default('repetition_penalty', 1)}."),
            click.option("--repetition-context", type=Count(min=1), default=20, show_default=True,
                         help="How many recent tokens the penalty looks at."),
            click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
                         help="Random seed for sampling."),
            click.option("--max-kv-size", type=Count(min=1), default=None,
                         help="Most tokens the KV cache holds [default: the model's max_position_embeddings]."),
        ]):
            f = option(f)
        return f
    return decorate


def speculation_options(f):
    """--speculate, --draft-model and --num-draft, the same on generate and chat."""
    # k + 1 tokens in one product of at most EXACT_ROWS rows: the rows the CPU's exact kernel takes, a GPU step's
    f = click.option("--num-draft", type=click.IntRange(1, q.EXACT_ROWS - 1), default=speculative.NUM_DRAFT,
                     show_default=True, help="Proposals checked per verifier step (k).")(f)
    f = click.option("--draft-model", default=None, metavar="M",
                     help="A smaller model with the same tokenizer (any --model source), for --speculate draft.")(f)
    f = click.option("--speculate", type=click.Choice(["none", "lookup", "draft"]), default=None,
                     help="Speculative decoding, exact: propose tokens by prompt lookup or a draft model and check "
                          f"them in one step [default: draft with --draft-model, else {speculative.DEFAULT}].")(f)
    return f


def chosen_speculation(o: dict) -> str:
    """--speculate as given or defaulted, checked against --draft-model."""
    if o["draft_model"] == "":  # --draft-model "$DRAFT" with DRAFT unset: it had run without speculation
        raise click.BadParameter("the draft model is an empty name; leave --draft-model out, or name one",
                                 param_hint="--draft-model")
    speculate = o["speculate"] or ("draft" if o["draft_model"] is not None else speculative.DEFAULT)
    if speculate == "draft" and not o["draft_model"]:
        raise click.UsageError("--speculate draft needs --draft-model M")
    if speculate != "draft" and o["draft_model"]:
        raise click.UsageError(f"--draft-model needs --speculate draft (not {speculate})")
    return speculate


def proposer_from(o: dict, speculate: str, dtype, kernels, config, tokenizer):
    """The proposer the engine speculates with, as o says; None for plain decoding."""
    if speculate == "none":
        return None
    if speculate == "lookup":
        return speculative.Lookup()
    params, draft_config, draft_tokenizer = load_model(o["draft_model"], dtype)
    if draft_tokenizer.vocab != tokenizer.vocab:
        raise click.ClickException(f"the draft model {o['draft_model']} has another tokenizer than the model")
    return speculative.DraftModel(params, draft_config, config.vocab_size, kernels)


def engine_for(params, config, tokenizer, kernels, o: dict, speculate: str, dtype, **options) -> engine.Engine:
    """The generation engine over the model, with the run's context limit and speculation."""
    return engine.Engine(params, config, tokenizer, kernels, max_kv_size=o["max_kv_size"],
                         proposer=proposer_from(o, speculate, dtype, kernels, config, tokenizer),
                         num_draft=o["num_draft"], **options)


def sampling_from(o: dict, model, fallback: dict) -> q.Sampling:
    """The flags given, the rest from the model's generation_config.json, else the command's fallback."""
    defaults = {**fallback, **weights.sampling_defaults(weights.resolve(model))}
    return weights.sampling_for(defaults, temp=o["temp"], top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
                                repetition_penalty=o["repetition_penalty"],
                                repetition_context=o["repetition_context"])


LOAD_MARGIN = 1.1  # bytes in flight while the weights are read and cast, over their final size


def load_model(model, dtype):
    """weights.load, after checking the weights fit in memory (past it MLX crashes or hangs), with its
    errors as one-line Click errors."""
    try:
        folder = weights.resolve(model)
        config = weights.check_config(weights.read_config(folder), folder / "config.json")  # numbers checked first
        dtype = dtype or weights.default_dtype()
        weights.check_memory(int(weights.weight_bytes(config, dtype) * LOAD_MARGIN),
                             f"the model {folder.name} at {dtype}")
        return weights.load(model, dtype)
    except weights.ModelError as e:
        raise click.ClickException(str(e)) from None


INPUT_LIMIT = 16 * 2**20  # bytes of a prompt or a perplexity file: far beyond any context, short of /dev/zero


def bounded_read(f, hint: str) -> bytes:
    """All of a binary file, or a one-line error past INPUT_LIMIT (/dev/zero, a runaway pipe)."""
    data = f.read(INPUT_LIMIT + 1)
    if len(data) > INPUT_LIMIT:
        raise click.BadParameter(f"the input is larger than {INPUT_LIMIT // 2**20} MiB, the most read",
                                 param_hint=hint)
    return data


def stdin_closed() -> bool:
    """Whether the command started with stdin closed (<&-): main put /dev/null in its place."""
    return getattr(sys.stdin, "name", None) == os.devnull


def utf8_prompt(prompt: str | None, prompt_file) -> str:
    """The prompt: as given, from stdin for -, or the file's; refused with one line if it is not UTF-8."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt with --prompt or --prompt-file (one of them)")
    if prompt == "-" and stdin_closed():
        raise click.BadParameter("--prompt - reads standard input, which is closed", param_hint="--prompt")
    hint = "--prompt" if prompt_file is None else "--prompt-file"
    try:
        if prompt_file is not None:
            return bounded_read(prompt_file, hint).decode("utf-8")
        text = bounded_read(sys.stdin.buffer, hint).decode("utf-8") if prompt == "-" else prompt
        text.encode("utf-8")  # argv arrives with undecodable bytes as lone surrogates
        return text
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise click.BadParameter("the prompt is not valid UTF-8", param_hint=hint) from None
    except OSError as e:  # a read error, not standard output's (main's guess for an OSError without a file name)
        source = "standard input" if prompt_file is None else prompt_file.name
        raise click.BadParameter(f"cannot read {source}: {e.strerror or e}", param_hint=hint) from None


def templated(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template applied, or one line: there is none (we do not guess one), or it refused."""
    if not tokenizer.chat_template:
        raise click.ClickException("this model has no chat template; use generate --raw to continue plain text")
    try:
        return prompts.encode_chat(tokenizer, messages)
    except prompts.PromptError as e:
        raise click.ClickException(str(e)) from None


def quiet_broken_pipe():
    """The reader went away (| head): silence further writes and leave without a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def version_text() -> str:
    """What runs: the project, MLX, mlx_lm, Python, the device and the BLAS with the core it chose."""
    import importlib.metadata
    import platform

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return "\n".join([
        f"qwen2-scratch {version('qwen2-scratch')}",
        f"MLX {mx.__version__} ({mx.default_device()}), mlx_lm {version('mlx-lm')}, "
        f"Python {platform.python_version()} ({platform.system()} {platform.machine()})",
        f"BLAS: {blas.describe()}",
        f"attention on the CPU: {cpu_attention.describe()}",
    ])


def print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=print_version,
              help="Show the versions of the project, MLX, mlx_lm, Python and the BLAS in use, and exit.")
def cli():
    """Qwen2 from scratch in pure MLX: chat, generate, perplexity, pull, bench."""


def ctrl_c_through_python(command):
    """Run a command with SIGINT taken by a thread of ours and handed to Python (chat.ctrl_c_through_python):
    on a GPU NVRTC's own handler, in place while it compiles a kernel, would end the process with code 4."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with chat.ctrl_c_through_python():
            return command(*args, **kwargs)
    return run


@cli.command("generate")
@model_options
@click.option("--prompt", "-p", default=None, help="The prompt; - reads it from stdin.")
@click.option("--prompt-file", "-f", type=click.File("rb"), default=None,
              help="Read the prompt from this file (llama.cpp's -f).")
@click.option("--system", "--system-prompt", default=None, help="System message [default: the chat template's].")
@click.option("--raw", "--ignore-chat-template", is_flag=True,
              help="Continue the prompt as plain text, without the chat template.")
@click.option("--quiet", "-q", is_flag=True, help="No stats line on stderr.")
@sampling_options(GREEDY, max_tokens=256)
@speculation_options
@ctrl_c_through_python
def generate_command(model, dtype, kernels, prompt, prompt_file, system, raw, quiet, **o):
    """Generate text for one prompt: the text on stdout, one stats line on stderr.

    Sampling defaults come from the model's generation_config.json (the packaged model's:
    temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05), else greedy; --temp 0 is
    greedy (the penalty still applies: --repetition-penalty 1 turns it off).

    \b
    Examples:
      qwen2-scratch generate --prompt "Write a haiku about the sea"
      echo "def fib(n):" | qwen2-scratch generate --raw --prompt - --max-tokens 64
    """
    prompt = utf8_prompt(prompt, prompt_file)
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    if raw and system is not None:
        raise click.UsageError("--system needs the chat template: drop --raw or --system")
    speculate = chosen_speculation(o)
    params, config, tokenizer = load_model(model, dtype)
    sampling = sampling_from(o, model, GREEDY)
    runner = engine_for(params, config, tokenizer, kernels, o, speculate, dtype, max_batch=1)
    if raw:
        ids = prompts.encode_text(tokenizer, prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        ids = templated(tokenizer, messages + [{"role": "user", "content": prompt}])
    last = None
    try:
        for event in runner.generate(engine.Request(tuple(ids), sampling, o["max_tokens"], seed=o["seed"])):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            last = event
        sys.stdout.write("\n")
        sys.stdout.flush()
    except ValueError as e:
        raise click.ClickException(f"{e}; --max-kv-size sets the context" if "context" in str(e) else str(e)) from None
    except BrokenPipeError:
        quiet_broken_pipe()
    if last.finish_reason == "context":
        click.echo(f"notice: stopped at --max-kv-size {runner.max_kv}", err=True)
    if not quiet:
        click.echo(engine.stats_line(last.stats, last.usage), err=True)


@cli.command("chat")
@model_options
@click.option("--system", "--system-prompt", default=None, help="System message [default: the chat template's].")
@click.option("--quiet", "-q", is_flag=True, help="No stats line after each answer.")
@sampling_options(QWEN_CHAT, max_tokens=512)
@speculation_options
@ctrl_c_through_python  # from the load on: the threads MLX starts inherit the block
def chat_command(model, dtype, kernels, system, quiet, **o):
    """Chat with the model: answers stream as they are generated, and the history is kept.

    Sampling defaults come from the model's generation_config.json (the packaged model's:
    temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05), else the same values, which
    Qwen2.5's instruct models ship. In a terminal: a prompt,
    streamed answers and a stats line after each. With stdin not a terminal: one user turn per
    line, and stdout holds only the answers, each followed by an empty line; everything else goes
    to stderr. A message of several lines goes between \"\"\" lines. Type /help for the commands.

    \b
    Examples:
      qwen2-scratch chat
      printf 'My name is Ada.\\nWhat is my name?\\n' | qwen2-scratch chat --temp 0
    """
    speculate = chosen_speculation(o)
    params, config, tokenizer = load_model(model, dtype)
    runner = engine_for(params, config, tokenizer, kernels, o, speculate, dtype, max_batch=1)
    session = chat.Chat(runner, system, sampling_from(o, model, QWEN_CHAT), o["max_tokens"], o["seed"])
    templated(tokenizer, [{"role": "system", "content": system or ""}, {"role": "user", "content": "hi"}])
    sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, not fatal
    try:
        chat.repl(session, interactive=sys.stdin.isatty(), quiet=quiet)
    except chat.InputTooLong as e:
        raise click.ClickException(str(e)) from None
    except BrokenPipeError:
        quiet_broken_pipe()


@cli.command("perplexity")
@model_options
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False), help="A UTF-8 text file.")
@click.option("--context", type=Count(min=2), default=1024, show_default=True,
              help="Tokens per window; the file is split into consecutive windows of this many.")
@click.option("--json", "as_json", is_flag=True, help='Print only {"tokens", "nll", "perplexity"} as JSON.')
@ctrl_c_through_python
def perplexity_command(model, dtype, kernels, path, context, as_json):
    """Perplexity of a text file: mean negative log-likelihood per token, in nats, and its exp.

    The file is tokenized as it is (no BOS, no template) and split into consecutive windows
    of --context tokens (default 1024); every token after the first of each window is scored.

    \b
    Example:
      qwen2-scratch perplexity --file README.md --json
    """
    try:
        with open(path, "rb") as f:
            text = bounded_read(f, "--file").decode("utf-8")
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", param_hint="--file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not a readable UTF-8 file ({e})", param_hint="--file") from None
    params, config, tokenizer = load_model(model, dtype)
    check_window(config, context)
    try:
        result = q.perplexity(params, config, prompts.encode_text(tokenizer, text), context, kernels)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result._asdict()))
    else:
        click.echo(f"{result.tokens} tokens, nll {result.nll:.4f} nats/token, perplexity {result.perplexity:.3f}")


def window_bytes(config: q.Config, context: int) -> int:
    """What scoring one window of --context tokens allocates beside the weights (float32): each layer's
    attention scores (three [heads, C, C] arrays: scores, mask, softmax), the activations, a logits slice."""
    scores = 3 * config.num_attention_heads * context * context
    activations = context * (8 * config.hidden_size + 3 * config.intermediate_size)
    logits = 3 * 256 * config.vocab_size
    return 4 * (scores + activations + logits)


def check_window(config: q.Config, context: int) -> None:
    """--context within the model's positions and the memory at hand, else one line with the numbers."""
    if context > config.max_position_embeddings:
        raise click.BadParameter(f"{context} is beyond the model's {config.max_position_embeddings} positions "
                                 "(max_position_embeddings)", param_hint="--context")
    try:
        weights.check_memory(window_bytes(config, context), f"--context {context}")
    except weights.ModelError as e:
        raise click.BadParameter(f"{e}; give a smaller one", param_hint="--context") from None


@cli.command("pull")
@click.option("--model", "-m", default=None, metavar="M",
              help="Folder, .gguf file, alias or hub id [default: the packaged model].")
def pull_command(model):
    """Prepare a model and print the folder it loads from (the only line on stdout).

    \b
    Example:
      mlx_lm.generate --model "$(qwen2-scratch pull)" --prompt hi
    """
    try:
        click.echo(weights.resolve(model))
    except weights.ModelError as e:
        raise click.ClickException(str(e)) from None


@cli.command("bench")
@model_options
@click.option("--shape", type=click.Choice(list(bench.SHAPES)), default=None,
              help="Random weights of a real Qwen2 shape instead of --model (sizing hardware).")
@click.option("--prompt-tokens", default="128,512", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--gen-tokens", type=Count(min=2), default=128, show_default=True,
              help="Tokens decoded after the shortest prompt.")
@click.option("--trials", type=Count(min=1), default=3, show_default=True,
              help="Trials; each figure is the median, and the table gives each one's spread (max - min) / median.")
@click.option("--int4/--no-int4", default=True, show_default=True,
              help="Also time what mlx_lm gives by default: the int4 (group 64) model, and (CPU) mlx_lm "
                   "on MLX's own reference BLAS; one short run each.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number, versions, device and BLAS here.")
@click.option("--both-kernels/--one-kernel", default=True, show_default=True,
              help="Run ours with both --kernels (reference and fast), or only the one given.")
@click.option("--speculative", is_flag=True,
              help="Instead: a code edit and a question, each plain and with prompt lookup at each --num-draft "
                   "(greedy), and a verifier step's cost; with --shape, the cost only.")
@click.option("--num-draft", "num_drafts", default="4,8", show_default=True,
              help="With --speculative: the proposals per verifier step to try, comma-separated.")
@click.option("--serve", "serve", is_flag=True,
              help="Instead: our server against mlx_lm.server (same weights and BLAS), with --clients clients at once "
                   "each asking for --gen-tokens greedy tokens; aggregate tok/s, time to first token and latency; "
                   "then a short request's time to first token alone and while 8 others stream (three of each, "
                   "sent at random moments, medians).")
@click.option("--clients", default="1,8,32", show_default=True, help="With --serve: client counts, comma-separated.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None, help="With --serve: our server's --parallel.")
@click.option("--llama-bench", "llama_bench", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="PATH", help="llama.cpp's llama-bench, timed on the packaged model's F32 GGUF as one more "
                                   "contender [default: the one `make llama-cpp` builds, where it did].")
def bench_command(model, dtype, kernels, shape, prompt_tokens, gen_tokens, trials, int4, json_path, both_kernels,
                  speculative, num_drafts, serve, clients, parallel, llama_bench):
    """Benchmark ours against mlx_lm on the same weights, dtype and BLAS, in one process.

    Contenders run alternately, trial by trial, after one warm-up run of each; each figure is
    the median. Peak memory is measured for each contender in a subprocess of its own. The
    roofline is bytes read per decoded token x decode tok/s / the machine's read bandwidth,
    measured in the same run. On the packaged model, llama.cpp (llama-bench on its F32 GGUF)
    runs as one more contender where `make llama-cpp` built it.

    \b
    Examples:
      qwen2-scratch bench --json bench.json
      qwen2-scratch bench --shape qwen2-7b --prompt-tokens 128,2048 --no-int4
    """
    lengths = whole_numbers(prompt_tokens, "--prompt-tokens", "128,512")
    ks = whole_numbers(num_drafts, "--num-draft", "4,8", most=q.EXACT_ROWS - 1)  # as generate's --num-draft
    if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        raise click.BadParameter(f"the folder {os.path.dirname(os.path.abspath(json_path))} does not exist",
                                 param_hint="--json")
    levels = whole_numbers(clients, "--clients", "1,8,32", most=server.MAX_CONNECTIONS)  # beyond: 503s
    try:
        if serve:
            report = bench.run_serve(model, dtype, levels, gen_tokens, trials, parallel,
                                     command=" ".join(sys.orig_argv))
        elif speculative:
            report = bench.run_speculative(model, shape, dtype, kernels, ks, trials, command=" ".join(sys.orig_argv))
        else:
            report = bench.run(model, shape, dtype, ["reference", "fast"] if both_kernels else [kernels], lengths,
                               gen_tokens, trials, int4, command=" ".join(sys.orig_argv), llama_bench=llama_bench)
    except (weights.ModelError, bench.BenchError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(bench.serve_table(report) if serve else bench.speculative_table(report) if speculative
               else bench.table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        click.echo(f"wrote {json_path}", err=True)


def comma_list(text: str | None) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def serve_sampling_options(f):
    """serve's default sampling for requests that set none, over the model's generation_config.json."""
    given = "[default: the model's generation_config.json, else off]"
    for option in reversed([
        click.option("--temp", type=Finite(min=0), default=None, help=f"Temperature; 0 is greedy {given}."),
        click.option("--top-p", type=Finite(0, 1, min_open=True), default=None, help=f"Nucleus sampling {given}."),
        click.option("--top-k", type=click.IntRange(0, server.MAX_INT), default=None,
                     help=f"Keep the k likeliest tokens; 0 is off {given}."),
        click.option("--min-p", type=Finite(0, 1), default=None, help="Min-p filter; 0 is off [default: 0]."),
        click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None,
                     help=f"Penalty for recent tokens; 1 is off {given}."),
        click.option("--max-tokens", type=click.IntRange(1, server.MAX_INT), default=server.DEFAULT_MAX_TOKENS,
                     show_default=True, help="Most tokens a request generates when it sets no max_tokens."),
    ]):
        f = option(f)
    return f


def read_chat_template(path: str | None) -> str | None:
    """A Jinja chat template from a file, checked to parse; None without one."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {getattr(e, 'strerror', None) or e}",
                                 param_hint="--chat-template") from None
    except jinja2.TemplateSyntaxError as e:
        raise click.BadParameter(f"{path}: not a Jinja template (line {e.lineno}: {e.message})",
                                 param_hint="--chat-template") from None
    return text


@cli.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any other than a loopback one opens the API to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--api-key", "api_keys", type=ApiKey(), multiple=True, metavar="K", envvar=KEYS_VARIABLE,
              show_envvar=True,
              help="Require Authorization: Bearer K on every endpoint but /health; repeat for more keys, each with "
                   "a prompt cache of its own. The variable (keys separated by spaces) keeps them out of `ps`.")
@click.option("--max-kv-size", type=Count(min=2), default=None,
              help="Most tokens of context [default: the model's max_position_embeddings].")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Most requests decoding together in one batch; more wait in arrival order "
                   "[default: 32].")
@click.option("--served-model-name", default=None, metavar="NAMES",
              help="The model's ids, comma-separated: /v1/models lists them, requests may name any, responses "
                   "carry the first [default: --model, else the packaged model's name].")
@serve_sampling_options
@click.option("--chat-template", default=None, metavar="FILE", help="A Jinja chat template to use instead of the "
                                                                    "tokenizer's.")
@click.option("--allowed-hosts", default=None, metavar="NAMES",
              help="More Host names to answer, comma-separated (\"*.example.org\", or \"*\" for any) [default: "
                   "localhost, *.localhost, loopback addresses and --host].")
@click.option("--allowed-origins", default=None, metavar="ORIGINS",
              help="More web page origins allowed to call the API, comma-separated (\"https://app.example.org\", "
                   "or \"*\" for any) [default: http(s)://localhost, 127.0.0.1 and [::1], any port].")
@click.option("--read-timeout", type=Finite(min=0, min_open=True), default=server.BODY_SECONDS, show_default=True,
              help="Seconds a request body may take to arrive.")
@click.option("--write-timeout", type=Finite(min=0, min_open=True), default=server.WRITE_SECONDS,
              show_default=True, help="Seconds a client may read nothing of its answer before it is dropped.")
@speculation_options
def serve_command(model, dtype, kernels, host, port, api_keys, max_kv_size, parallel, served_model_name, temp, top_p,
                  top_k, min_p, repetition_penalty, max_tokens, chat_template, allowed_hosts, allowed_origins,
                  read_timeout, write_timeout, speculate, draft_model, num_draft):
    """Serve the model through an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    Up to --parallel requests decode together, each with its own settings and seed (a request's
    answer does not depend on what else runs); the rest wait in arrival order. Sampling fields a
    request leaves out come from the flags here, else the model's generation_config.json;
    "temperature": 0 is greedy. Only this machine's pages and names may call it unless
    --allowed-origins and --allowed-hosts say more (docs/server-security.md).

    \b
    Examples:
      qwen2-scratch serve
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "hi"}]}'
    """
    if not api_keys and KEYS_VARIABLE in os.environ:  # set, but empty or spaces: click reads that as unset
        raise click.BadParameter(f"{KEYS_VARIABLE} is set but holds no key.", param_hint="--api-key")
    template = read_chat_template(chat_template)
    params, config, tokenizer = load_model(model, dtype)
    if template is not None:
        tokenizer.chat_template = template
    try:
        sock = server.listen(host, port)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    defaults = weights.sampling_for(weights.sampling_defaults(weights.resolve(model)), temp=temp, top_p=top_p,
                                    top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty)
    defaults = defaults._replace(top_k=server.keep_k(defaults.top_k, config.vocab_size))._asdict()
    names = comma_list(served_model_name) or (model or weights.PACKAGED_NAME,)
    settings = server.Settings(
        names=names, defaults=server.Defaults(defaults, config.vocab_size, max_tokens), api_keys=api_keys,
        bind=host, hosts=comma_list(allowed_hosts), origins=comma_list(allowed_origins), body_seconds=read_timeout,
        write_seconds=write_timeout)
    parallel = parallel or 32  # at most 64: the CPU's row-exact kernel takes up to 64 rows, a GPU's steps are 64
    o = {"speculate": speculate, "draft_model": draft_model, "num_draft": num_draft}
    proposer = proposer_from(o, chosen_speculation(o), dtype, kernels, config, tokenizer)  # for a request alone
    backend = server.Engine(params, config, tokenizer, names[0], defaults, kernels, max_kv_size, parallel, proposer,
                            num_draft)
    if warning := server.exposure_warning(host):
        click.echo(warning, err=True)
    address = sock.getsockname()
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    click.echo(f"serving {backend.name} on http://{shown}:{address[1]}/v1 (Ctrl-C to stop)", err=True)
    server.serve(backend, sock, settings)


def whole_numbers(text: str, flag: str, example: str, most: int = 2**63 - 1) -> list[int]:
    """'128,512' -> [128, 512], sorted, each from 1 to most; else a one-line usage error."""
    try:
        numbers = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise click.BadParameter(f"give whole numbers separated by commas, like {example}", param_hint=flag) from None
    if not numbers or numbers[0] < 1:
        raise click.BadParameter("each number must be at least 1 (prompt lengths, proposals)", param_hint=flag)
    if numbers[-1] > most:
        raise click.BadParameter(f"each number must be at most {most}, not {numbers[-1]}", param_hint=flag)
    return numbers


def fill_closed_stdin() -> None:
    """Started with stdin closed (<&-): /dev/null on descriptor 0, else the first file the command opens
    (the weights) lands there and is read as stdin; stdin_closed() still tells."""
    if sys.stdin is not None:
        return
    try:
        os.fstat(0)
    except OSError:
        fd = os.open(os.devnull, os.O_RDONLY)
        if fd != 0:
            os.dup2(fd, 0)
            os.close(fd)
    sys.stdin = open(os.devnull, encoding="utf-8")


def os_error_line(e: OSError) -> str:
    """An OSError that reached main, named by its real cause: a deleted working directory, a file, or stdout."""
    try:
        os.getcwd()
    except OSError:
        return "the working directory no longer exists (deleted?); cd to one that does"
    if e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return f"cannot write to standard output: {e.strerror or e}"  # a full disk, say


def without_torch() -> None:
    """The command line never imports PyTorch. transformers (under mlx_lm's tokenizer loader) imports it wherever it
    is installed, for nothing a tokenizer needs: 2-5 s more a start and 176 MB more resident here with the CPU
    wheel, and on a CUDA machine a second CUDA stack in the process beside MLX's. None in sys.modules makes
    importlib's find_spec report it absent, so transformers takes it as not installed (and `import torch` would
    fail: not done for the Python API, whose caller's program may use PyTorch)."""
    sys.modules.setdefault("torch", None)


def main():
    without_torch()
    if sys.stdout is None:  # started with stdout closed (>&-)
        print("Error: standard output is closed; give the command somewhere to write", file=sys.stderr)
        sys.exit(1)
    fill_closed_stdin()
    try:
        cli(standalone_mode=False)
    except BrokenPipeError:
        quiet_broken_pipe()
    except OSError as e:  # the cause in one line, then no retry of stdout's flush at exit
        print(f"Error: {os_error_line(e)}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except click.ClickException as e:  # bad input: one line, exit 1 (usage errors: 2)
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C outside the chat's own handling
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
