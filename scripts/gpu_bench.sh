#!/usr/bin/env bash
# The SD-shaped comparison in one go on a lent H100/H200 (docs/gpu.md): cnexp (default: disk
# cache, bf16 base; and cache off) vs diffusers' train_controlnet.py, SD 1.5 shapes at 512 px,
# batch 8, random weights. Installs nothing but the wheels carried in .bench/wheels
# (scripts/gpu_wheels.sh prepares them); results go to $OUT (the device tool's folder) or
# outputs/gpu_bench.
#   device:  bash scripts/gpu_bench.sh                 (run tool: carry [".bench"], ~7 min)
#            LEVERS=compile bash scripts/gpu_bench.sh  (adds trainer.compile=true, ~+4 min)
#   CPU:     bash scripts/gpu_bench.sh --dry-run       (width 0.05, 64 px, 1 timed step)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BENCH=${BENCH_DIR:-.bench}
OUT=${OUT:-outputs/gpu_bench}
SD=${SD:-15}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  sizes=(--width 0.05 --resolution 64 --batch 2 --images 8 --warmup 1 --steps 1 --rounds 1)
  echo "dry run: not installing; wheels carried: $(ls "$BENCH/wheels" 2>/dev/null | tr '\n' ' ')"
else
  sizes=(--width 1.0 --batch "${BATCH:-8}" --images "${IMAGES:-256}" --warmup "${WARMUP:-10}"
         --steps "${STEPS:-40}" --rounds "${ROUNDS:-1}")
  if compgen -G "$BENCH/wheels/*" > /dev/null; then
    # --no-deps: the image holds their dependencies; an sdist (antlr4) builds with its setuptools
    $PY -m pip install -q --no-index --no-deps --no-build-isolation "$BENCH"/wheels/*
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "diffusers", "transformers", "lightning", "hydra", "omegaconf",
                       "datasets", "accelerate", "peft") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {missing}; carry their wheels in .bench/wheels (scripts/gpu_wheels.sh)")
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
peer=()
if [ -f "$BENCH/diffusers/examples/controlnet/train_controlnet.py" ]; then
  peer=(--diffusers-src "$BENCH/diffusers")
else
  echo "no $BENCH/diffusers/examples/controlnet/train_controlnet.py: cnexp's side only"
fi
levers=()
[ -n "${LEVERS:-}" ] && levers=(--levers "$LEVERS")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CNEXP_CACHE="${CNEXP_CACHE:-/tmp/cnexp-cache}"
$PY -m cnexp.bench --sd "$SD" "${sizes[@]}" "${peer[@]}" "${levers[@]}" \
    --json "$OUT/bench_sd$SD.json" 2>&1 | tee "$OUT/bench_sd$SD.log" \
  | grep -v -e "it/s]" -e "Warning" -e "warn(" || true
test -s "$OUT/bench_sd$SD.json"
