#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/cluster/test_slurm.py (run as root; idempotent).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes /etc/slurm/slurm.conf
# (one node: this host with all its CPUs and 90% of its memory, in two partitions, `cpu` (default) and
# `gpu`, as on a GPU cluster), starts munged, slurmctld and slurmd unless they already run with this
# configuration, and waits until the node takes jobs. No accounting database: job records stay in
# slurmctld for MinJobAge = 600 s, so Snakemake polls them with `squeue`.
#
# The node advertises 2 GPUs as a generic resource (GRES) with no device behind them, so that the GPU
# requests of workflow/profiles/slurm (`--gpus=1` for training jobs) are scheduled as on a real cluster;
# the jobs themselves train on the CPU.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "setup-slurm.sh: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge

# slurmd counts GRES gpus by their device files: two character devices that are /dev/null underneath
# (where no device can be made, the node has no GPUs and the test runs training on the CPU partition)
FAKE_GPUS=/var/spool/slurmd/fake-gpu
GPUS=2
mkdir -p "$FAKE_GPUS"
for i in 0 1; do
    [[ -c $FAKE_GPUS/$i ]] || mknod "$FAKE_GPUS/$i" c 1 3 2>/dev/null || GPUS=0
done
if ((GPUS)); then
    gres_types="GresTypes=gpu"
    node_gres=" Gres=gpu:$GPUS"
    new_gres="NodeName=${HOST} Name=gpu File=${FAKE_GPUS}/[0-1]"
else
    gres_types="" node_gres="" new_gres=""
fi

new_conf=$(
    cat <<EOF
# Written by .ci/setup-slurm.sh: a single-node test cluster (overwritten on the next run).
ClusterName=papa
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
${gres_types}
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB}${node_gres} State=UNKNOWN
PartitionName=cpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${HOST} MaxTime=INFINITE State=UP
EOF
)
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$CONF"
    changed=1
fi
if [[ ! -f $GRES_CONF ]] || [[ "$(cat "$GRES_CONF")" != "$new_gres" ]]; then
    printf '%s\n' "$new_gres" >"$GRES_CONF"
    changed=1
fi

# munge: the package creates the key (make one if it did not); munged runs as its own user
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then
        mkdir -p /var/lib/munge /var/log/munge
        chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
        runuser -u munge -- munged
    else
        munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "setup-slurm.sh: munged does not answer (see /var/log/munge/munged.log)" >&2
        exit 1
    fi
fi

running() { # the daemon of this pid file is alive
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop() { # by its pid file, then wait until it is gone
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

if ((changed)); then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
running /run/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
running /run/slurmd.pid || slurmd

# wait until the node takes jobs (a node that went away comes back DOWN: resume it)
state=
for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)
    case $state in # a trailing * means not responding (yet)
        idle | mix | alloc) break ;;
        down* | drain* | drng* | inval*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case $state in
    idle | mix | alloc) ;;
    *)
        echo "setup-slurm.sh: node $HOST is '${state:-unknown}' (see /var/log/slurm/)" >&2
        exit 1
        ;;
esac
echo "SLURM ready: node $HOST ($CPUS CPUs, $MEM_MB MB, $GPUS GRES gpus), partitions cpu (default) and gpu"
