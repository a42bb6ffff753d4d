#!/usr/bin/env bash
# The CUDA + NCCL path, checked on a machine with one GPU (run by hand; CI has no GPU).
#   1. encoder and recommender train on cuda:0 with the nccl backend (one process via torchrun);
#   2. a run SIGKILLed right after its step-15 checkpoint and resumed ends bit-equal to an
#      uninterrupted one on the GPU (or the script prints where it differs);
#   3. an async-save run equals a synchronous one;
#   4. examples/own_loop.py (the public API) killed after its step-20 checkpoint and resumed ends
#      bit-equal to an uninterrupted run on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
rm -rf "$OUT"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
FAST=(--set data.synthetic_length=1024 --set data.window=16 --set data.batch_size=16 --set model.d_model=16
      --set model.n_layers=1 --set model.ff_dim=32 --set train.max_steps=30 --set checkpoint.interval_steps=5)
trun() { "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 launcher/run.py "$@"; }
trun --config configs/encoder.yaml --run-dir "$OUT/clean" "${FAST[@]}" > "$OUT/clean.log" 2>&1; echo "clean exit $?"
grep -h -m1 "Process group" "$OUT/clean.log"
FTLAUNCH_FAILPOINT=after_meta:15 trun --config configs/encoder.yaml --run-dir "$OUT/broken" "${FAST[@]}" > "$OUT/broken.log" 2>&1
echo "failpoint run exit $? (expected non-zero: killed after step 15's checkpoint)"
trun --config configs/encoder.yaml --run-dir "$OUT/broken" "${FAST[@]}" > "$OUT/resume.log" 2>&1; echo "resume exit $?"
grep -h "Resumed at" "$OUT/resume.log"
trun --config configs/encoder.yaml --run-dir "$OUT/async" "${FAST[@]}" --set checkpoint.async=true > "$OUT/async.log" 2>&1; echo "async exit $?"
trun --config configs/recommender.yaml --run-dir "$OUT/rec" --set train.max_steps=30 > "$OUT/rec.log" 2>&1; echo "recommender exit $?"
grep -h "epoch .* done" "$OUT/rec.log" | tail -1
OWN=(--epochs 2 --samples 512 --batch-size 32 --save-every 10)  # 28 steps
own() { "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 examples/own_loop.py "$@"; }
own --run-dir "$OUT/own" "${OWN[@]}" > "$OUT/own.log" 2>&1; echo "own loop exit $?"
FTLAUNCH_FAILPOINT=after_meta:20 own --run-dir "$OUT/own-broken" "${OWN[@]}" > "$OUT/own-broken.log" 2>&1
echo "own loop failpoint run exit $? (expected non-zero)"
own --run-dir "$OUT/own-broken" "${OWN[@]}" > "$OUT/own-resume.log" 2>&1; echo "own loop resume exit $?"
"$PY" - "$OUT" <<'PYEOF'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from helpers import checkpoint_tensors, assert_bit_equal
out = Path(sys.argv[1])
pairs = [("clean", "broken", 30), ("clean", "async", 30), ("own", "own-broken", 28)]
for ref, other, step in pairs:
    try:
        name = f"checkpoints/step_{step:08d}"
        n = assert_bit_equal(checkpoint_tensors(out / ref / name), checkpoint_tensors(out / other / name),
                             ("model", "optim", "lr_scheduler", "rng", "best"))
        print(f"{other}: {n} tensors bit-equal to the uninterrupted GPU run")
    except (AssertionError, OSError) as e:
        print(f"{other}: DIFFERS: {e}")
PYEOF
for f in "$OUT"/clean.log "$OUT"/resume.log "$OUT"/async.log "$OUT"/rec.log "$OUT"/own.log "$OUT"/own-resume.log; do if grep -q "Traceback" "$f"; then echo "== $f"; grep -A 30 Traceback "$f" | head -40; fi; done
