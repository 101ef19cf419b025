"""pytest set-up: run MLX on OpenBLAS, as every command of ours does (re-executes pytest once)."""

import qwen2_scratch

qwen2_scratch.use_openblas()
