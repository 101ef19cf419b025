"""pytest set-up: run MLX on OpenBLAS, as every command of ours does (re-executes pytest once)."""

import qwen2_scratch


def pytest_configure(config):
    capture = config.pluginmanager.getplugin("capturemanager")
    # pytest has redirected fds 1 and 2 by now: give them back before re-executing
    qwen2_scratch.use_openblas(before_exec=capture.stop_global_capturing if capture else None)
