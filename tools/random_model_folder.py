"""A model folder of random weights: another folder's config and tokenizer, weights drawn at random.

    python tools/random_model_folder.py SOURCE_FOLDER OUT_FOLDER [--dtype bfloat16]

For timing whole programs (a server, `bench --serve`) where the real weights cannot travel (the lent
GPU machine reaches no hub, and the packaged model is 1.2 GB): the shapes, the tokenizer and the
chat template are the source's, so every request takes the same path; the text is noise.
"""

from qwen2s import weights  # first: the fast BLAS before MLX

# isort: split
import argparse
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2 as ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = ref.Model(ref.ModelArgs.from_dict(weights.read_config(a.source)))
    model.set_dtype(getattr(mx, a.dtype))
    skip = ("model.safetensors.index.json", "complete.json")  # the real weights' index; our cache's own mark
    for f in a.source.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja") and f.name not in skip:
            shutil.copy(f, a.out / f.name)
    flat = dict(tree_flatten(model.parameters()))  # mlx_lm's names are the checkpoint's
    mx.save_safetensors(str(a.out / "model.safetensors"), flat, metadata={"format": "pt"})
    print(f"wrote {a.out}: {len(flat)} tensors of random {a.dtype} weights")


if __name__ == "__main__":
    main()
