#!/usr/bin/env bash
# A throw-away SLURM cluster on this one machine, for tests: munged, slurmctld and two
# slurmd daemons posing as nodes n1 and n2 (127.0.0.1, ports 17001/17002).
#
#   scripts/slurm/testcluster.sh install # install slurm-wlm + munge (apt-get, root) if missing;
#                                        # `bash scripts/setup.sh --slurm` runs this
#   scripts/slurm/testcluster.sh up      # start, wait for idle nodes (installs nothing)
#   scripts/slurm/testcluster.sh down    # cancel its jobs, stop only the daemons it started
#   scripts/slurm/testcluster.sh status  # sinfo / squeue against it
#   . "$SLURM_TEST_DIR/env.sh"           # then sbatch/squeue/scontrol talk to this cluster
#
# Only `install` changes the system, and only when asked; `up` (what the tests run) refuses
# with exit code 3 when SLURM is not installed.
# Everything else (config, state, logs, pid files, the munge key and socket) lives in
# $SLURM_TEST_DIR (default /tmp/ftlaunch-slurm), so it touches no system-wide SLURM or
# munge set-up and `down` kills exactly the PIDs recorded in its pid files.
#
# Settings that make it usable for tests (each would otherwise cost minutes):
#   AuthInfo=cred_expire=5            a requeued job may start again after 5 s, not 120 s
#   SchedulerParameters=sched_interval=1,bf_interval=1   pending jobs are looked at every second
#   SlurmdParameters=config_overrides nodes advertise CPUS_PER_NODE CPUs whatever the host has
# and one that keeps runs apart: slurmctld starts with an empty job list (-c), so job ids
# would start at 1 again on every `up`, and train.sbatch's default run directory
# (runs/<job name>-<job id>) of a new job would be an old job's, which it would resume.
#   FirstJobId=<clock seconds mod 6e7>    ids go on from one `up` to the next (SLURM's limit is 67043328)
#
# Environment: SLURM_TEST_DIR, SLURMCTLD_PORT (17000), SLURMD_PORTS ("17001 17002"),
# CPUS_PER_NODE (4), SLURM_UP_TIMEOUT (60 s).
# Exit codes: 0 done; 3 SLURM is not installed (`up`) or cannot be installed here (`install`);
# 1 anything else.
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/ftlaunch-slurm}
CTLD_PORT=${SLURMCTLD_PORT:-17000}
CPUS=${CPUS_PER_NODE:-4}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}
NODES=(n1 n2)
read -r -a _ports <<<"${SLURMD_PORTS:-17001 17002}"
declare -A PORT=([n1]=${_ports[0]} [n2]=${_ports[1]})

log() { echo "testcluster: $*" >&2; }

# The commands the test cluster needs, and the Debian packages that bring them.
COMMANDS=(slurmctld slurmd munged sbatch scontrol sinfo squeue scancel)
PACKAGES=(slurm-wlm munge)
ENABLE="bash scripts/setup.sh --slurm"

missing() {
    local c out=()
    for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || out+=("$c"); done
    echo "${out[*]}"
}

install_slurm() {
    local gone
    gone=$(missing)
    if [ -z "$gone" ]; then
        log "SLURM and munge are installed ($(slurmctld -V))"
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "cannot install ${PACKAGES[*]} (missing: $gone): needs root and apt-get; install them with your" \
            "system's package manager"
        exit 3
    fi
    log "installing ${PACKAGES[*]} with apt-get (missing: $gone)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq >&2 && apt-get install -y -qq "${PACKAGES[@]}" >&2; }; then
        log "apt-get could not install ${PACKAGES[*]} (no network or no such packages?)"
        exit 3
    fi
    gone=$(missing)
    [ -z "$gone" ] || { log "still missing after the install: $gone"; exit 3; }
    log "installed: $(slurmctld -V)"
}

require_slurm() {
    local gone
    gone=$(missing)
    [ -z "$gone" ] && return 0
    log "SLURM is not installed (missing: $gone); run \`$ENABLE\` once to install ${PACKAGES[*]}" \
        "(apt-get, as root), or install them yourself"
    exit 3
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$STATE"/ctld "$STATE"/spool/n1 "$STATE"/spool/n2
    chmod 700 "$STATE"
    cat >"$STATE/slurm.conf" <<CONF
# Written by scripts/slurm/testcluster.sh: a 2-node test cluster on one host.
ClusterName=ftlaunch-test
FirstJobId=$(( $(date +%s) % 60000000 + 1000 ))
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge.socket,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
# True preemption: a job in "urgent" requeues a running job of "debug" (see docs/slurm.md).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORT[n1]} CPUs=$CPUS RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORT[n2]} CPUs=$CPUS RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=2
CONF
    echo "export SLURM_CONF=$STATE/slurm.conf" >"$STATE/env.sh"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    alive "$STATE/munged.pid" && return 0
    [ -s "$STATE/munge.key" ] || { dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none; chmod 400 "$STATE/munge.key"; }
    # --force: munged refuses a socket under world-writable /tmp and running as root otherwise.
    munged --force --socket="$STATE/munge.socket" --key-file="$STATE/munge.key" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munged.seed"
}

wait_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT)) states
    while [ $SECONDS -lt $deadline ]; do
        if [ "$(sinfo -h -N -p debug -t idle,alloc,mix -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then
            log "up: $(sinfo -h -N -p debug -o '%N %t' | sort -u | tr '\n' ' ')(SLURM_CONF=$STATE/slurm.conf)"
            return 0
        fi
        states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
        sleep 0.5
    done
    log "nodes not idle after ${UP_TIMEOUT}s: ${states:-no answer from slurmctld}; logs in $STATE"
    tail -n 20 "$STATE"/slurmctld.log "$STATE"/slurmd-n1.log >&2 || true
    return 1
}

up() {
    require_slurm
    write_config
    export SLURM_CONF=$STATE/slurm.conf
    start_munge
    # -c: start from an empty job list, not the state of a previous test cluster.
    alive "$STATE/slurmctld.pid" || slurmctld -c -f "$SLURM_CONF"
    for n in "${NODES[@]}"; do
        alive "$STATE/slurmd-$n.pid" || slurmd -N "$n" -f "$SLURM_CONF"
    done
    wait_idle
}

stop_pidfile() {
    local f=$1 pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    [ -d "$STATE" ] || return 0
    export SLURM_CONF=$STATE/slurm.conf
    if alive "$STATE/slurmctld.pid"; then
        # End the jobs first, so their slurmstepd processes (children of no daemon we
        # stop) exit by themselves instead of lingering.
        scancel --full --quiet -p debug,urgent 2>/dev/null || true
        for _ in $(seq 1 100); do
            [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    for n in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$n.pid"; done
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"
    log "down"
}

case "${1:-}" in
    install) install_slurm ;;
    up) up ;;
    down) down ;;
    status) export SLURM_CONF=$STATE/slurm.conf; sinfo; squeue ;;
    *) echo "usage: $0 install|up|down|status   (state in \${SLURM_TEST_DIR:-/tmp/ftlaunch-slurm})" >&2; exit 2 ;;
esac
