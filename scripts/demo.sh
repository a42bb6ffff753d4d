#!/usr/bin/env bash
# The main job: a two-node fault-tolerant training on localhost, with a failure on purpose.
#
# Two "nodes" (two launcher agents on 127.0.0.1, one worker each, c10d rendezvous) train the
# temporal encoder into runs/demo. Part-way through, the whole job is SIGKILLed, as a power
# loss would; the same command is then run again and training continues from the latest
# verified checkpoint to the end. Sets up .venv first if needed. Options (environment):
#   RUN_DIR=runs/demo  CONFIG=configs/encoder.yaml  STEPS=200  KILL_AT=70  PORT=29517
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs/demo}
CONFIG=${CONFIG:-configs/encoder.yaml}
STEPS=${STEPS:-200}
KILL_AT=${KILL_AT:-70}
PORT=${PORT:-29517}
PY=.venv/bin/python
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

start_nodes() {  # two agents, each in its own process group so we can end exactly what we started
    PIDS=()
    for node in 0 1; do
        setsid "$PY" -m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d \
            --rdzv_endpoint="127.0.0.1:$PORT" --rdzv_id=demo --max_restarts=3 \
            launcher/run.py --config "$CONFIG" --run-dir "$RUN_DIR" --set "train.max_steps=$STEPS" \
            >>"$RUN_DIR/node$node.out" 2>&1 &
        PIDS+=($!)
    done
}
stop_nodes() { for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done; }
trap stop_nodes EXIT

last_step() { tail -n 1 "$RUN_DIR/metrics.jsonl" 2>/dev/null | sed -n 's/.*"step": \([0-9]*\).*/\1/p'; }

echo "== attempt 1: two nodes on 127.0.0.1, $STEPS steps; will SIGKILL everything after step $KILL_AT"
start_nodes
for _ in $(seq 1 600); do
    s=$(last_step); [ -n "$s" ] && [ "$s" -ge "$KILL_AT" ] && break
    sleep 0.5
done
echo "== power loss at step $(last_step): SIGKILL of both nodes (agents and workers)"
stop_nodes
sleep 1
echo "== attempt 2: the very same command again"
start_nodes
for pid in "${PIDS[@]}"; do wait "$pid"; done
trap - EXIT
grep -h "Resum\|Training finished" "$RUN_DIR/node0.out" | sed 's/^/   /'
echo "== done: checkpoints in $RUN_DIR/checkpoints, metrics in $RUN_DIR/metrics.jsonl"
"$PY" -m launcher.ckpt list "$RUN_DIR" || true
