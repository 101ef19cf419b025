"""How many graph nodes a compiled decode step has for each layer (what a GPU's host sends off, node by node).

    python tools/step_nodes.py [--kernels fast] [--rows 64]

A small random model at 2 and 3 layers, 4 rows at their own offsets; `mx.export_to_dot` of the compiled step's
outputs, nodes counted by primitive; the difference is one layer's. On the CPU mx.fast's functions fall back to
their parts (more nodes than on a GPU); the model's own nodes (products, masks, cache writes) are the same.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import reference_model  # noqa: E402  (the tests' small random model)


def nodes(layers: int, kernels: str, rows: int | None) -> collections.Counter:
    _, params, config, _ = reference_model(num_hidden_layers=layers)
    cache = q.reserve(q.new_cache(config, 4, mx.float32), 256)
    cache = {"layers": cache["layers"], "offset": mx.array([10, 20, 30, 40], mx.int32)}
    mx.eval(cache)  # a cache as the engine holds it: computed (unevaluated, its zeros would count as the step's)
    logits, cache = q.compiled_decode_step(params, config, mx.full((4, 1), 5, mx.int32), cache, kernels, rows)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step.dot"
        mx.export_to_dot(str(path), logits, cache)
        return collections.Counter(re.findall(r'label ="([A-Za-z]+)', path.read_text()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default="fast", choices=["reference", "fast"])
    parser.add_argument("--rows", type=int, default=None, help="a fixed-shape step of this many rows (a GPU's: 64)")
    a = parser.parse_args()
    two, three = nodes(2, a.kernels, a.rows), nodes(3, a.kernels, a.rows)
    layer = three - two
    print(f"{a.kernels} kernels, rows {a.rows}: {sum(two.values())} nodes with 2 layers, {sum(layer.values())} a layer")
    print("a layer's:", ", ".join(f"{k} {v}" for k, v in layer.most_common()))


if __name__ == "__main__":
    main()
