"""Top-p's kept set, ours (the mass against 1) against mlx_lm's (against its float32 sum of the sorted
probabilities), on the model's own log-probabilities over a text: at how many positions they differ, and whether
any differ among the k likeliest (what a draw with top-k on can pick).

    python tools/top_p_vs_mlx_lm.py [--model M] [--positions 1200] [--top-p 0.8] [--top-k 20]

The text: this repository's README.md and engine.py, in pieces of 200 tokens.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import sample_utils as su

from qwen2s import cli

HERE = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--positions", type=int, default=1200)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    params, config, tokenizer = cli.load_model(args.model, None)
    ids = tokenizer.encode((HERE / "README.md").read_text() + (HERE / "engine.py").read_text())[: args.positions]
    differ = differ_among_k = 0
    totals = []
    for start in range(0, len(ids), 200):
        logits, _ = q.forward(params, config, mx.array(ids[start : start + 200])[None])
        for i in range(logits.shape[1]):
            lp = q.log_softmax(logits[:, i])
            ours = np.isfinite(np.array(q.apply_top_p(lp, args.top_p)))[0]
            theirs = np.isfinite(np.array(su.apply_top_p(lp, args.top_p)))[0]
            top = np.array(q.top_k_ids(lp, args.top_k))[0]
            differ += bool((ours != theirs).any())
            differ_among_k += bool((ours[top] != theirs[top]).any())
            probs = mx.exp(mx.sort(lp, axis=-1))
            totals.append((mx.cumsum(probs, axis=-1, reverse=True, inclusive=False) + probs)[0, 0].item())
    print(f"top-p {args.top_p}: kept sets differ at {differ} of {len(ids)} positions, among the {args.top_k} "
          f"likeliest at {differ_among_k}; mlx_lm's total: min {min(totals):.7f}, median "
          f"{float(np.median(totals)):.7f}, max {max(totals):.7f}")


if __name__ == "__main__":
    main()
