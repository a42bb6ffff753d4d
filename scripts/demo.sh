#!/usr/bin/env bash
# The main job: a two-node fault-tolerant training on localhost, with a node lost on purpose.
#
# Two "nodes" (two ftrun agents on 127.0.0.1, one worker each, c10d rendezvous) train the
# temporal encoder into runs/demo. Part-way through, node 1 is SIGKILLed whole (its agent
# and its worker), as a lost machine would be; a replacement node 1 is started a few seconds
# later with the same command. The job re-forms at full size from the latest verified
# checkpoint and finishes; ftrun prints a summary (restarts, downtime, steps lost, goodput).
# Both nodes' consoles are shown here as they happen (step, loss, steps/s, ETA, the failure and
# the recovery); each node's full output is in RUN_DIR/node<N>.out, the details in RUN_DIR/logs/.
# Sets up .venv first if needed. Options (environment):
#   RUN_DIR=runs/demo  CONFIG=configs/encoder.yaml  STEPS=200  KILL_AT=60  PORT=29517
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs/demo}
CONFIG=${CONFIG:-configs/encoder.yaml}
STEPS=${STEPS:-200}
KILL_AT=${KILL_AT:-60}
PORT=${PORT:-29517}
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

declare -A NODE_PID FOLLOW_PID
# Routine lines left out of the live view (they stay in RUN_DIR/node<N>.out and RUN_DIR/logs/).
ROUTINE='Checkpoint step_[0-9]+ \(|Retention: |Process group: |Attempt: |Resuming from checkpoint: |Removing leftover'
follow() {  # node $1's console, live, prefixed; node 1 leaves the summary box to node 0 (the same figures)
    local box=''
    [ "$1" = 0 ] || box='/ftrun summary/,/^=====*$/d'
    setsid bash -c "tail -s 0.2 -n +1 -F '$RUN_DIR/node$1.out' 2>/dev/null | grep --line-buffered -v -E '$ROUTINE' \
        | sed -u -e '$box' -e 's/^/   node$1 | /'" &
    FOLLOW_PID[$1]=$!
    disown  # ended with SIGKILL at the end; no "Killed" notice from bash
}
start_node() {  # each node in its own session, so it can be lost whole and nothing else with it
    setsid .venv/bin/ftrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d \
        --rdzv_endpoint="127.0.0.1:$PORT" --rdzv_id=demo --max_restarts=5 \
        launcher/run.py --config "$CONFIG" --run-dir "$RUN_DIR" --set "train.max_steps=$STEPS" \
        >>"$RUN_DIR/node$1.out" 2>&1 &
    NODE_PID[$1]=$!
}
stop_all() { for pid in "${NODE_PID[@]}" "${FOLLOW_PID[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done; }
trap stop_all EXIT
last_step() { { tail -n 1 "$RUN_DIR/metrics.jsonl" 2>/dev/null || true; } | sed -n 's/.*"step": \([0-9]*\).*/\1/p'; }

echo "== two nodes on 127.0.0.1 (ftrun, c10d rendezvous), $STEPS steps; node 1 will be lost after step $KILL_AT"
: >"$RUN_DIR/node0.out"; : >"$RUN_DIR/node1.out"
follow 0
follow 1
start_node 0
start_node 1
for _ in $(seq 1 1200); do
    s=$(last_step); [ -n "$s" ] && [ "$s" -ge "$KILL_AT" ] && break
    sleep 0.5
done
echo "== node 1 lost at step $(last_step): SIGKILL of its agent and worker"
kill -KILL -- "-${NODE_PID[1]}"
wait "${NODE_PID[1]}" 2>/dev/null || true
sleep 3
echo "== a replacement node 1 starts with the same command"
start_node 1
status=0
wait "${NODE_PID[0]}" || status=$?
wait "${NODE_PID[1]}" || status=$?
sleep 0.5  # let the live view print the last lines
for pid in "${FOLLOW_PID[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
trap - EXIT
echo "== checkpoints of the run:"
.venv/bin/python -m launcher.ckpt list "$RUN_DIR"
echo "== checkpoints, metrics, events, TensorBoard and plots are in $RUN_DIR (exit status $status)"
exit "$status"
