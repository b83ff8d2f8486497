#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the integration test of `ser-cache slurm extract`.
#
#   tests/integration/slurm_cluster.sh start|stop|status|env [STATE_DIR]
#
# start   starts munged, slurmctld and slurmd (nothing if they already run) and waits until `sinfo` shows
#         the node idle; stop kills them; status says what runs; env prints the `export SLURM_CONF=...`
#         line for the Slurm commands (eval "$(tests/integration/slurm_cluster.sh env)").
#
# Needs root and the Debian packages (22.05 on bookworm): apt-get install -y slurm-wlm munge
# Installs nothing and writes nothing under /etc: munged runs on its own key and socket and slurm.conf
# lives in STATE_DIR (default /tmp/ser-cache-slurm), with the daemons' state, spool, logs and pid files.
# No cgroups (proctrack/linuxproc, task/none), no accounting storage (sacct answers from the controller's
# memory: jobcomp/none, so it knows the jobs of this controller's life only).
# Ports: SER_CACHE_SLURMCTLD_PORT (6817) and SER_CACHE_SLURMD_PORT (6818).
set -euo pipefail

ACTION=${1:-}
STATE=${2:-${SER_CACHE_SLURM_STATE:-/tmp/ser-cache-slurm}}
CTLD_PORT=${SER_CACHE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SER_CACHE_SLURMD_PORT:-6818}
WAIT_S=${SER_CACHE_SLURM_WAIT_S:-60}
CONF=$STATE/slurm.conf
MUNGE=$STATE/munge
SOCKET=$MUNGE/munge.socket.2
NODE=$(hostname -s)

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

usage() { die "usage: slurm_cluster.sh start|stop|status|env [STATE_DIR] (got '${ACTION}')"; }

# pid from a pid file when that process still runs, else nothing
running() { local f=$1 pid; [[ -s $f ]] || return 1; pid=$(<"$f"); kill -0 "$pid" 2>/dev/null && echo "$pid"; }

need_tools() {
    local missing=() t
    for t in munged munge slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]} == 0)) || die "not installed: ${missing[*]} (apt-get install -y slurm-wlm munge)"
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their users; SlurmUser=root here)"
}

write_conf() {
    # The node as slurmd sees it (CPUs, boards, sockets, cores, threads, RealMemory), so that the node
    # is not drained for a mismatch; the memory a little lower than found, as slurmd sees it after start.
    local node_line mem
    node_line=$(slurmd -C | head -1)
    [[ $node_line == NodeName=* ]] || die "slurmd -C printed '$node_line', not a NodeName= line"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" <<<"$node_line")
    cat >"$CONF.tmp" <<EOF
# Written by tests/integration/slurm_cluster.sh: a one-node Slurm for tests. Regenerated on start.
ClusterName=sercache
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munged() {
    running "$MUNGE/munged.pid" >/dev/null && return 0
    # munged's own checks: the key, log and pid files owned by the user it runs as (root here), the socket's
    # folder searchable by all. Its own key, so /etc/munge is never touched.
    mkdir -p "$MUNGE" && chown root:root "$MUNGE" && chmod 755 "$MUNGE"
    if [[ ! -s $MUNGE/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE/munge.key.tmp") && mv "$MUNGE/munge.key.tmp" "$MUNGE/munge.key"
    fi
    munged --key-file="$MUNGE/munge.key" --socket="$SOCKET" --pid-file="$MUNGE/munged.pid" \
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
        || die "munged did not start: see $MUNGE/munged.log"
}

alive() {  # name pidfile: fail when the daemon has exited (its pid file comes a moment after it forks)
    running "$2" >/dev/null && return 0
    [[ ! -s $2 ]] && ((SECONDS < started + 10)) && return 0
    echo "slurm_cluster.sh: $1 is not running; the end of $STATE/log/$1.log:" >&2
    tail -n 5 "$STATE/log/$1.log" >&2 || true
    exit 1
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) started=$SECONDS state=""
    while ((SECONDS < deadline)); do
        # a daemon that exited (a port taken by another cluster, a bad conf) fails the start at once
        alive slurmctld "$STATE/slurmctld.pid"
        alive slurmd "$STATE/slurmd.pid"
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) return 0 ;;
            drain* | down*)
                # a node drained by an earlier life of this cluster (e.g. "Kill task failed"): resume it
                scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "the node $NODE is not idle after ${WAIT_S} s (sinfo: '${state:-no answer}'); logs: $STATE/log/"
}

start() {
    need_tools
    mkdir -p "$STATE"/{ctld,spool,log}
    chmod 755 "$STATE"
    start_munged
    export SLURM_CONF=$CONF
    if ! running "$STATE/slurmctld.pid" >/dev/null || ! running "$STATE/slurmd.pid" >/dev/null; then
        stop_slurm
        write_conf
        # -c: a clean start (no jobs or node states from an earlier life of this STATE_DIR)
        slurmctld -c -f "$CONF" || die "slurmctld did not start: see $STATE/log/slurmctld.log"
        slurmd -f "$CONF" || die "slurmd did not start: see $STATE/log/slurmd.log"
    fi
    wait_idle
    echo "slurm up: node $NODE idle, SLURM_CONF=$CONF"
}

stop_daemons() {  # pidfile...: TERM to all at once (each takes ~2 s), KILL what is left after 10 s; the pid
    # files go, so that a next start waits for new ones
    local f pid pids=() i
    for f in "$@"; do
        if pid=$(running "$f"); then kill "$pid" 2>/dev/null || true; pids+=("$pid"); fi
    done
    for ((i = 0; i < 100; i++)); do
        local left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        ((${#left[@]} == 0)) && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
    rm -f "$@"
}

stop_slurm() {
    stop_daemons "$STATE/slurmd.pid" "$STATE/slurmctld.pid"
}

cancel_jobs() {  # what is still queued or running ends with the cluster, not orphaned under a dead slurmd
    local jobs i
    running "$STATE/slurmctld.pid" >/dev/null || return 0
    export SLURM_CONF=$CONF
    jobs=$(squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    echo "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do [[ -z $(squeue -h 2>/dev/null) ]] && return 0; sleep 0.1; done
}

stop() {
    cancel_jobs
    stop_daemons "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$MUNGE/munged.pid"
    echo "slurm stopped ($STATE)"
}

status() {
    local name f pid rc=0
    for name in munged slurmctld slurmd; do
        f=$STATE/$name.pid
        [[ $name == munged ]] && f=$MUNGE/munged.pid
        if pid=$(running "$f"); then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=3; fi
    done
    if ((rc == 0)); then SLURM_CONF=$CONF sinfo; fi
    return $rc
}

case $ACTION in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
