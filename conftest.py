"""pytest set-up: run MLX on OpenBLAS, as every command of ours does (re-executes pytest once)."""

import os

# The tests hold float32 to 1e-4; on a GPU, MLX's default TF32 matmuls round inputs to 10 bits.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# No test ever reaches for a model hub: the hub tests use a hub cache folder they build.
os.environ["HF_HUB_OFFLINE"] = "1"

import qwen2_scratch  # noqa: E402


def pytest_configure(config):
    capture = config.pluginmanager.getplugin("capturemanager")
    # pytest has redirected fds 1 and 2 by now: give them back before re-executing
    qwen2_scratch.use_openblas(before_exec=capture.stop_global_capturing if capture else None)
