#!/usr/bin/env bash
# Prepare .bench/ for scripts/gpu_bench.sh, on a machine with package-registry access (the lent
# GPU machines have none): the wheels the GPU image lacks, at the versions installed here, and
# diffusers' ControlNet training script (the peer) from a diffusers checkout.
#   bash scripts/gpu_wheels.sh /path/to/diffusers-checkout
# Then run on the device with carry [".bench"] (see docs/gpu.md). About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_SRC=${1:?give the root of a diffusers source checkout}
BENCH=.bench
mkdir -p "$BENCH/wheels" "$BENCH/diffusers/examples/controlnet"
cp "$DIFFUSERS_SRC/examples/controlnet/train_controlnet.py" "$BENCH/diffusers/examples/controlnet/"
# what run.py and the peer import that the GPU image ('cuda': torch, transformers, accelerate,
# lightning, tensorboard, ... are there) does not hold; pinned to this machine's versions
pin() { python -c "from importlib.metadata import version; print('$1==' + version('$1'))"; }
# wheels for the image's Python (3.12; PY_VERSION to change); antlr4 exists as source only
rm -f "$BENCH"/wheels/*
python -m pip download -q --no-deps -d "$BENCH/wheels" --only-binary=:all: \
  --python-version "${PY_VERSION:-3.12}" $(for n in diffusers hydra-core omegaconf datasets dill peft \
  multiprocess; do pin $n; done)
python -m pip download -q --no-deps -d "$BENCH/wheels" --no-binary=:all: \
  "$(pin antlr4-python3-runtime)"
ls -la "$BENCH/wheels"
