"""The Python API, close to mlx_lm's names: `load`, `generate`, `stream_generate`.

    from qwen2s import api
    model = api.load()  # the packaged model; or api.load("qwen2-0.5b")
    print(api.generate(model, [{"role": "user", "content": "Name one prime number."}], temp=0))
    for event in api.stream_generate(model, "def add(a, b):", max_tokens=16):
        print(event.text, end="")

A prompt is a string (continued as it is) or a list of chat messages (run through the model's
chat template). Sampling options not given come from the model's generation_config.json.
Importing this module (or any of ours) before MLX loads the fast BLAS; where MLX came first,
one warning line says that MLX keeps its slow reference BLAS.

A model may be used from any number of threads at once: one worker thread of the model's engine computes every
request, several in one batch (each answer the one it gets alone), and is stopped before the process exits.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
from collections.abc import Iterator
from typing import NamedTuple

from qwen2s import prompts, weights
from qwen2s.engine import Engine, Event, Request, stats_line

__all__ = ["Model", "load", "generate", "stream_generate", "Event", "stats_line"]


class Model(NamedTuple):
    """A loaded model: its weights, config and tokenizer, its sampling defaults, and the engine that runs it."""

    params: dict
    config: q.Config
    tokenizer: object
    defaults: dict
    engine: Engine


def load(model: str | None = None, dtype: str | None = None, kernels: str = "reference",
         max_kv_size: int | None = None) -> Model:
    """A model by name (a folder, a .gguf file, an alias, a hub id, or None: the packaged model)."""
    params, config, tokenizer = weights.load(model, dtype)
    defaults = weights.sampling_defaults(weights.resolve(model))
    engine = Engine(params, config, tokenizer, kernels, max_kv_size=max_kv_size)
    engine.start()  # one worker computes every thread's requests, in one batch (see Engine.start)
    return Model(params, config, tokenizer, defaults, engine)


def prompt_ids(model: Model, prompt: str | list[dict]) -> tuple[int, ...]:
    """Text is text (a control token's name in it is not the control token); messages go through the template."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None
        return tuple(prompts.encode_text(model.tokenizer, prompt))
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(f"the prompt is a {type(prompt).__name__}: give a string or a list of chat messages (dicts)")
    return tuple(prompts.encode_chat(model.tokenizer, prompt))


def stream_generate(model: Model, prompt: str | list[dict], max_tokens: int = 256, seed: int | None = 0,
                    stop: str | tuple[str, ...] = (), **sampling) -> Iterator[Event]:
    """The answer as typed events: text pieces with their token and log-probability, then the finish
    reason with usage and stats. sampling: temp, top_p, top_k, min_p, repetition_penalty, repetition_context."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())  # one string is one stop, not its letters
    request = Request(prompt_ids(model, prompt), weights.sampling_for(model.defaults, **sampling), max_tokens,
                      stops, seed)
    for event in model.engine.generate(request):
        if event.finish_reason == "error":  # the worker's step failed (a line in its log): no answer, not an empty one
            raise RuntimeError(event.error)
        yield event


def generate(model: Model, prompt: str | list[dict], **options) -> str:
    """The whole answer as text (options as stream_generate's)."""
    return "".join(event.text for event in stream_generate(model, prompt, **options))
