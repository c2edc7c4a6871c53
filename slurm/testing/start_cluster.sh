#!/usr/bin/env bash
# Starts a single-node Slurm cluster on this machine, for the test suite and for trying the sbatch
# scripts without a cluster (docs/slurm.md). Debian/Ubuntu, as root.
#
#   bash slurm/testing/start_cluster.sh      # idempotent: a second call only checks and waits
#
# Installs slurm-wlm and munge with apt-get when missing, writes a munge key, writes
# /etc/slurm/slurm.conf (one node named $(hostname -s) with CPUs=$(nproc) and RealMemory below the
# machine's, one partition "debug"), starts munged, slurmctld and slurmd, and waits until the node
# takes jobs. A config that differs from the one on disk restarts the daemons this script started.
#
# Exit codes: 0 the node is ready; 3 the cluster cannot run here (not root, no apt-get, a daemon
# refused to start); the message on stderr says which.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
WAIT_S=${START_CLUSTER_WAIT_S:-60}

die() {
    echo "start_cluster: $*" >&2
    exit 3
}

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons); run it as root"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
    echo "start_cluster: installing slurm-wlm and munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
    apt_install || { apt-get update -q >/dev/null && apt_install; } \
        || die "apt-get install slurm-wlm munge failed (see the output above)"
fi

# --- munge: a shared secret key, then the daemon as user munge ----------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged \
        || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged runs but a credential does not round-trip"
fi

# --- slurm.conf ---------------------------------------------------------------------------------
node=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) # nproc obeys OMP_NUM_THREADS
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb * 9 / 10)) # below the machine's, or slurmd drains the node ("Low RealMemory")
def_mem=$((real_mb / cpus))  # per CPU, so jobs without --mem share the node
conf=$(
    cat <<EOF
# Written by slurm/testing/start_cluster.sh: a one-node test cluster.
ClusterName=megatron-ts-test
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it starts again (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults: 60 s and 30 s), so a requeued job starts at once.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${def_mem}
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ ! -f $SLURM_CONF ]] || [[ $(cat "$SLURM_CONF") != "$conf" ]]; then
    printf '%s\n' "$conf" >"$SLURM_CONF"
    # daemons started with another config: stop them (by their pid files) and start afresh
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi

if ! running /run/slurmctld.pid; then
    slurmctld || die "slurmctld did not start (see ${LOG_DIR}/slurmctld.log)"
fi
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
scontrol ping | grep -q "is UP" || die "slurmctld does not answer (see ${LOG_DIR}/slurmctld.log)"
if ! running /run/slurmd.pid; then
    slurmd || die "slurmd did not start (see ${LOG_DIR}/slurmd.log)"
fi

# --- wait until the node takes jobs -------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
state=unknown
while ((SECONDS < deadline)); do
    state=$(sinfo -h -n "$node" -o %t 2>/dev/null | head -1)
    case $state in
        idle | mix | alloc | comp) break ;;
        drain* | down* | drng*)
            # left over from an earlier run of the daemons; the node is fine now
            scontrol update nodename="$node" state=resume 2>/dev/null || true
            ;;
    esac
    sleep 0.5
done
case $state in
    idle | mix | alloc | comp) ;;
    *) die "node ${node} is '${state}' after ${WAIT_S}s (see ${LOG_DIR}/slurmd.log, sinfo -R)" ;;
esac
echo "start_cluster: node ${node} ${state}: ${cpus} CPUs, ${real_mb} MB, partition debug" >&2
