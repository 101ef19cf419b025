"""What a CPU decode step costs beyond its arithmetic: the compiled step of a model with the packaged model's graph
(24 layers, heads of 64) but tiny widths (hidden 128, MLP 256, vocabulary 512), whose products and attention take
microseconds, so that what is left is MLX's cost per graph node. Then the same with parts taken out, to size them:
RoPE as the identity, no mask, and the ranges (RoPE's positions and frequencies, the cache's slots) as graph nodes
of every call, as before `qwen2_scratch.arange_constant` (whose constants let mx.compile compute them once a step).

    python tools/step_overhead.py [--context 128] [--reps 60]

One row, float32, our reference kernels; medians of --reps steps, each variant measured twice, alternated.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen2 as ref

RAW = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=24, intermediate_size=256, num_attention_heads=2,
           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6)


def step_ms(params, config, context: int, reps: int) -> float:
    step = mx.compile(q.decode_step)  # traced again: the variants change what the step's functions are
    cache = q.reserve(q.new_cache(config, 1), context + 64)
    cache = {"layers": cache["layers"], "offset": mx.array([context], mx.int32)}
    token = mx.array([[5]])
    mx.eval(cache)
    for _ in range(5):
        mx.eval(step(params, config, token, cache)[0])
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(step(params, config, token, cache)[0])
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def ranges_as_nodes():
    """rope and cache_slots as they were before `arange_constant`: each call's ranges its own mx.arange nodes, which
    mx.compile cannot merge (no inputs), so each layer computed RoPE's angles and the cache's slots again."""
    def rope(x, theta, offset=0, traditional=False):
        L, D = x.shape[-2], x.shape[-1]
        inv_freq = theta ** (-mx.arange(0, D, 2, dtype=mx.float32) / D)
        positions = mx.arange(L, dtype=mx.float32) + mx.expand_dims(mx.array(offset, mx.float32), -1)
        angles = positions[..., None] * inv_freq
        angles = angles[:, None] if angles.ndim == 3 else angles
        cos, sin = mx.cos(angles), mx.sin(angles)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    def cache_slots(offset, shape):
        return mx.broadcast_to(offset[:, None, None, None] + mx.arange(shape[2])[:, None], shape)
    return rope, cache_slots


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()
    model = ref.Model(ref.ModelArgs.from_dict(RAW))
    mx.eval(model.parameters())
    params, config = tree_unflatten(tree_flatten(model.parameters())), q.config_from_dict(RAW)
    reference, causal_mask, cache_slots = q.KERNELS["reference"], q.causal_mask, q.cache_slots

    def plain():
        pass

    def no_rope():
        q.KERNELS["reference"] = reference._replace(rope=lambda x, theta, offset=0, traditional=False: x)

    def no_mask():
        q.causal_mask = lambda L, S, offset=None: None

    def ranges():
        rope, q.cache_slots = ranges_as_nodes()
        q.KERNELS["reference"] = reference._replace(rope=rope)

    variants = {"the step as it is": plain, "RoPE as the identity": no_rope, "no mask": no_mask,
                "ranges as nodes (before arange_constant)": ranges}
    results = {name: [] for name in variants}
    for _ in range(2):
        for name, apply in variants.items():
            apply()
            results[name].append(step_ms(params, config, args.context, args.reps))
            q.KERNELS["reference"], q.causal_mask, q.cache_slots = reference, causal_mask, cache_slots
    for name, times in results.items():
        print(f"{name:40s} {' '.join(f'{t:6.2f}' for t in times)} ms")


if __name__ == "__main__":
    main()
