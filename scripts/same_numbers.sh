#!/usr/bin/env bash
# Same numbers after a refactor: the default experiment, shortened (or whole with FULL=1), on a
# git ref and on the working tree, one torch thread each (a thread count changes float sums),
# compared bit for bit: losses, every evaluation, base damage. Wall-clock fields are left out.
#   scripts/same_numbers.sh d7c2d69            # 40 steps, both in parallel (~3 min, 2 cores)
#   FULL=1 scripts/same_numbers.sh d7c2d69     # the whole default run (1000 steps) on each
set -euo pipefail
REF=${1:?usage: scripts/same_numbers.sh <git ref>}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
SHORT="trainer.max_steps=40 data.train_size=128 data.val_size=16 data.test_size=16 data.eval_size=8
       eval.fid_reference_size=16 sampling.steps=4 trainer.log_every_n_steps=5"
ARGS="logger.mode=disabled trainer.enable_progress_bar=false"
[ -z "${FULL:-}" ] && ARGS="$ARGS $SHORT"
git -C "$ROOT" worktree add --detach "$OUT/ref" "$REF" >/dev/null
trap 'git -C "$ROOT" worktree remove --force "$OUT/ref"' EXIT
run() {  # tree, name
  (cd "$1" && PYTHONPATH="$1" OMP_NUM_THREADS=1 python run.py hydra.run.dir="$OUT/$2" \
     data.root="$OUT/data_$2" $ARGS > "$OUT/$2.log" 2>&1)
}
run "$OUT/ref" ref & run "$ROOT" tree & wait
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{n}/metrics.json")) for n in ("ref", "tree"))
timing = lambda row: {k: v for k, v in row.items() if "seconds" not in k}
keys = ("losses", "step0", "final", "base_damage_step0", "final_loss", "sudden_convergence")
same = {k: (timing(a[k]) if isinstance(a[k], dict) else a[k]) ==
           (timing(b[k]) if isinstance(b[k], dict) else b[k]) for k in keys}
same["history"] = [timing(r) for r in a["history"]] == [timing(r) for r in b["history"]]
for k, ok in same.items():
    print(f"{k:20s} {'same' if ok else 'DIFFERENT'}")
print("final:", {k: v for k, v in timing(b["final"]).items() if "/perfect/" in k})
sys.exit(0 if all(same.values()) else 1)
PY
