"""The command line (console script `qwen2-scratch`): options, one-line errors, exit codes.

Each command is a thin layer over the model (qwen2_scratch), the loader (weights), the chat
and the benchmark. Bad input is a one-line error with exit code 1 (usage errors 2); Ctrl-C
outside the chat ends any command with exit code 130; a closed pipe ends it quietly.
"""

import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import json
import os
import sys

import click
import mlx.core as mx

import bench
import blas
import chat
import speculative
import weights


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


def sampling_options(temp, top_p, rep, max_tokens):
    """The sampling flags, with each command's own defaults."""
    def decorate(f):
        for option in reversed([
            click.option("--max-tokens", type=click.IntRange(min=1), default=max_tokens, show_default=True,
                         help="Most tokens to generate."),
            click.option("--temp", type=click.FloatRange(min=0), default=temp, show_default=True,
                         help="Sampling temperature; 0 is greedy."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=top_p,
                         show_default=True, help="Nucleus sampling; 1 is off."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Keep the k likeliest tokens; 0 is off."),
            click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                         help="Drop tokens less likely than min-p times the likeliest; 0 is off."),
            click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=rep,
                         show_default=True, help="Penalty for recent tokens; 1 is off."),
            click.option("--repetition-context", type=click.IntRange(min=1), default=20, show_default=True,
                         help="How many recent tokens the penalty looks at."),
            click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling."),
            click.option("--max-kv-size", type=click.IntRange(min=1), default=None,
                         help="Most tokens the KV cache holds [default: the model's max_position_embeddings]."),
        ]):
            f = option(f)
        return f
    return decorate


def speculation_options(f):
    """--speculate, --draft-model and --num-draft, the same on generate and chat."""
    f = click.option("--num-draft", type=click.IntRange(min=1), default=speculative.NUM_DRAFT, show_default=True,
                     help="Proposals checked per verifier step (k).")(f)
    f = click.option("--draft-model", default=None, metavar="M",
                     help="A smaller model with the same tokenizer (any --model source), for --speculate draft.")(f)
    f = click.option("--speculate", type=click.Choice(["none", "lookup", "draft"]), default=None,
                     help="Speculative decoding, exact: propose tokens by prompt lookup or a draft model and check "
                          f"them in one step [default: draft with --draft-model, else {speculative.DEFAULT}].")(f)
    return f


def chosen_speculation(o: dict) -> str:
    """--speculate as given or defaulted, checked against --draft-model."""
    speculate = o["speculate"] or ("draft" if o["draft_model"] else speculative.DEFAULT)
    if speculate == "draft" and not o["draft_model"]:
        raise click.UsageError("--speculate draft needs --draft-model M")
    if speculate != "draft" and o["draft_model"]:
        raise click.UsageError(f"--draft-model needs --speculate draft (not {speculate})")
    return speculate


def speculation_from(o: dict, speculate: str, dtype, kernels, config, tokenizer) -> dict:
    """The options q.generate takes to speculate as o says; {} for plain decoding."""
    if speculate == "none":
        return {}
    propose = speculative.Lookup()
    if speculate == "draft":
        params, draft_config, draft_tokenizer = load_model(o["draft_model"], dtype)
        if draft_tokenizer.vocab != tokenizer.vocab:
            raise click.ClickException(f"the draft model {o['draft_model']} has another tokenizer than the model")
        propose = speculative.DraftModel(params, draft_config, config.vocab_size, kernels)
    return dict(tokens=speculative.speculative_tokens, propose=propose, num_draft=o["num_draft"])


def sampling_from(o: dict) -> q.Sampling:
    return q.Sampling(o["temp"], o["top_p"], o["top_k"], o["min_p"], o["repetition_penalty"], o["repetition_context"])


def load_model(model, dtype):
    """weights.load, with its errors as one-line Click errors."""
    try:
        return weights.load(model, dtype)
    except weights.ModelError as e:
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


@cli.command("generate")
@model_options
@click.option("--prompt", "-p", required=True, help="The prompt; - reads it from stdin.")
@click.option("--system", default=None, help="System message [default: the chat template's].")
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the chat template.")
@sampling_options(temp=0.0, top_p=1.0, rep=1.0, max_tokens=256)
@speculation_options
def generate_command(model, dtype, kernels, prompt, system, raw, **o):
    """Generate text for one prompt: the text on stdout, one stats line on stderr.

    \b
    Examples:
      qwen2-scratch generate --prompt "Write a haiku about the sea"
      echo "def fib(n):" | qwen2-scratch generate --raw --prompt - --max-tokens 64
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    if raw and system is not None:
        raise click.UsageError("--system needs the chat template: drop --raw or --system")
    speculate = chosen_speculation(o)
    params, config, tokenizer = load_model(model, dtype)
    speculation = speculation_from(o, speculate, dtype, kernels, config, tokenizer)
    if raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
    mx.random.seed(o["seed"])
    report = {}
    try:
        for segment in q.generate(params, config, tokenizer, ids, report=report, kernels=kernels,
                                  sampling=sampling_from(o), max_tokens=o["max_tokens"],
                                  max_kv_size=o["max_kv_size"], **speculation):
            sys.stdout.write(segment)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except BrokenPipeError:
        quiet_broken_pipe()
    if report.get("finish_reason") == "context":
        click.echo(f"notice: stopped at --max-kv-size {o['max_kv_size'] or config.max_position_embeddings}",
                   err=True)
    click.echo(q.stats_line(report), err=True)


@cli.command("chat")
@model_options
@click.option("--system", default=None, help="System message [default: the chat template's].")
@sampling_options(temp=0.7, top_p=0.8, rep=1.05, max_tokens=512)
@speculation_options
def chat_command(model, dtype, kernels, system, **o):
    """Chat with the model: answers stream as they are generated, and the history is kept.

    Defaults follow Qwen's guidance for its chat models (temperature 0.7, top-p 0.8,
    repetition penalty 1.05). In a terminal: a prompt, streamed answers and a stats line
    after each. With stdin not a terminal: one user turn per line, and stdout holds only the
    answers, each followed by an empty line; everything else goes to stderr. Type /help for
    the commands.

    \b
    Examples:
      qwen2-scratch chat
      printf 'My name is Ada.\\nWhat is my name?\\n' | qwen2-scratch chat --temp 0
    """
    speculate = chosen_speculation(o)
    params, config, tokenizer = load_model(model, dtype)
    speculation = speculation_from(o, speculate, dtype, kernels, config, tokenizer)
    mx.random.seed(o["seed"])
    session = chat.Chat(params, config, tokenizer, system, sampling_from(o), o["max_tokens"], o["max_kv_size"],
                        kernels, speculation)
    try:
        chat.repl(session, interactive=sys.stdin.isatty())
    except BrokenPipeError:
        quiet_broken_pipe()


@cli.command("perplexity")
@model_options
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False), help="A UTF-8 text file.")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Tokens per window; the file is split into consecutive windows of this many.")
@click.option("--json", "as_json", is_flag=True, help='Print only {"tokens", "nll", "perplexity"} as JSON.')
def perplexity_command(model, dtype, kernels, path, context, as_json):
    """Perplexity of a text file: mean negative log-likelihood per token, in nats, and its exp.

    The file is tokenized as it is (no BOS, no template) and split into consecutive windows
    of --context tokens (default 1024); every token after the first of each window is scored.

    \b
    Example:
      qwen2-scratch perplexity --file README.md --json
    """
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", param_hint="--file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not a readable UTF-8 file ({e})", param_hint="--file") from None
    params, config, tokenizer = load_model(model, dtype)
    try:
        result = q.perplexity(params, config, tokenizer.encode(text), context, kernels)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result['tokens']} tokens, nll {result['nll']:.4f} nats/token, "
                   f"perplexity {result['perplexity']:.3f}")


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
@click.option("--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens decoded after the shortest prompt.")
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="Trials; each figure is the median.")
@click.option("--int4/--no-int4", default=True, show_default=True,
              help="Also time what mlx_lm gives by default: the int4 (group 64) model, one short run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number, versions, device and BLAS here.")
@click.option("--both-kernels/--one-kernel", default=True, show_default=True,
              help="Run ours with both --kernels (reference and fast), or only the one given.")
@click.option("--speculative", is_flag=True,
              help="Instead: a code edit and a question, each plain and with prompt lookup at each --num-draft "
                   "(greedy), and a verifier step's cost; with --shape, the cost only.")
@click.option("--num-draft", "num_drafts", default="4,8", show_default=True,
              help="With --speculative: the proposals per verifier step to try, comma-separated.")
def bench_command(model, dtype, kernels, shape, prompt_tokens, gen_tokens, trials, int4, json_path, both_kernels,
                  speculative, num_drafts):
    """Benchmark ours against mlx_lm on the same weights, dtype and BLAS, in one process.

    Contenders run alternately, trial by trial, after one warm-up run of each; each figure is
    the median. Peak memory is measured for each contender in a subprocess of its own. The
    roofline is bytes read per decoded token x decode tok/s / the machine's read bandwidth,
    measured in the same run.

    \b
    Examples:
      qwen2-scratch bench --json bench.json
      qwen2-scratch bench --shape qwen2-7b --prompt-tokens 128,2048 --no-int4
    """
    lengths = whole_numbers(prompt_tokens, "--prompt-tokens", "128,512")
    ks = whole_numbers(num_drafts, "--num-draft", "4,8")
    try:
        if speculative:
            report = bench.run_speculative(model, shape, dtype, kernels, ks, trials, command=" ".join(sys.orig_argv))
        else:
            report = bench.run(model, shape, dtype, ["reference", "fast"] if both_kernels else [kernels], lengths,
                               gen_tokens, trials, int4, command=" ".join(sys.orig_argv))
    except (weights.ModelError, bench.BenchError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(bench.speculative_table(report) if speculative else bench.table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        click.echo(f"wrote {json_path}", err=True)


def whole_numbers(text: str, flag: str, example: str) -> list[int]:
    """'128,512' -> [128, 512], sorted, each at least 1; else a one-line usage error."""
    try:
        numbers = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise click.BadParameter(f"give whole numbers separated by commas, like {example}", param_hint=flag) from None
    if not numbers or numbers[0] < 1:
        raise click.BadParameter("each number must be at least 1", param_hint=flag)
    return numbers


def main():
    try:
        cli(standalone_mode=False)
    except click.ClickException as e:  # bad input: one line, exit 1 (usage errors: 2)
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C outside the chat's own handling
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
