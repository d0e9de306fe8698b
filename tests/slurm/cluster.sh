#!/usr/bin/env bash
# A single-node Slurm for the tests: munged, slurmctld and slurmd started by hand (no systemd, no slurmdbd),
# four fake GPUs (gres.conf `File=DIR/gpu[0-3]`,
# character devices like /dev/null), two partitions: `cpu` (the default) and `gpu`.
#
#   bash tests/slurm/cluster.sh start DIR   # config, state and logs under DIR; prints SLURM_CONF=DIR/slurm.conf
#   SLURM_CONF=DIR/slurm.conf sbatch --wrap hostname
#   bash tests/slurm/cluster.sh stop DIR    # stops only the daemons this script started (their PIDs in DIR/pids)
#
# /etc/slurm/slurm.conf becomes a link to DIR/slurm.conf while the cluster runs: Snakemake's job step drops
# SLURM_CONF from the environment of the `srun` it runs inside each job, so srun must find the config at the
# default place. An /etc/slurm/slurm.conf that is not this script's link is never touched (start fails instead).
#
# Needs root and Debian's slurm-wlm and munge (`bash setup.sh test` installs them). Without slurmdbd there is no
# accounting: `sacct` fails, so Snakemake's Slurm plugin must poll with `squeue` (MinJobAge=7200 keeps finished jobs
# visible to squeue and `scontrol show job` for 2 hours, longer than the test run). The node declares more CPUs and memory than this
# machine has (SlurmdParameters=config_overrides) so that the jobs' real requests (8 CPUs per GPU, GBs of memory)
# are accepted; they then share the real cores.
set -euo pipefail

command=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")
host=$(hostname -s)

running() {  # a PID that exists and is not a zombie (dead daemons can linger as zombies here)
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ') || return 1
    [ -n "$state" ] && [[ $state != Z* ]]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 4))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "cluster.sh: $what did not come up within ${seconds}s; logs in $dir" >&2
    return 1
}

start() {
    for tool in munged slurmctld slurmd sbatch squeue scontrol; do
        command -v "$tool" >/dev/null || { echo "cluster.sh: $tool not found; run: bash setup.sh test" >&2; exit 1; }
    done
    if [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
        local target
        target=$(readlink /etc/slurm/slurm.conf || true)
        if [ -z "$target" ] || ! grep -qs "^ClusterName=alignflow-test$" "$target"; then
            echo "cluster.sh: /etc/slurm/slurm.conf exists and is not a test cluster's; not touching it" >&2
            exit 1
        fi
        if [ "$target" != "$dir/slurm.conf" ] && ps -C slurmctld -o stat= | grep -qv "^Z"; then
            echo "cluster.sh: another test cluster runs ($target); stop it first: cluster.sh stop $(dirname "$target")" >&2
            exit 1
        fi  # else: the link of a test cluster that is gone (a killed test run); it is replaced below
    fi
    mkdir -p "$dir"/{state,spool} /etc/slurm
    : > "$dir/pids"
    cat > "$dir/slurm.conf" <<EOF
ClusterName=alignflow-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=7200
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=sched_interval=1
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=64 RealMemory=256000 Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    for i in 0 1 2 3; do  # four GPU jobs at once, as the fan-out rules want; each "GPU" is a /dev/null twin
        [ -c "$dir/gpu$i" ] || mknod "$dir/gpu$i" c 1 3
    done
    echo "NodeName=$host Name=gpu File=$dir/gpu[0-3]" > "$dir/gres.conf"
    ln -sfn "$dir/slurm.conf" /etc/slurm/slurm.conf
    export SLURM_CONF=$dir/slurm.conf

    if ! munge -n >/dev/null 2>&1; then  # a munged already serving this machine is used, not restarted
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munged munge -n
        pgrep -u munge -n -x munged >> "$dir/pids"
    fi
    slurmctld
    wait_for 30 slurmctld bash -c "scontrol ping | grep -q UP"
    cat "$dir/slurmctld.pid" >> "$dir/pids"
    slurmd -N "$host"
    wait_for 30 slurmd bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
    cat "$dir/slurmd.pid" >> "$dir/pids"
    echo "SLURM_CONF=$dir/slurm.conf"
}

stop() {
    [ -f "$dir/pids" ] || { [ "$(readlink /etc/slurm/slurm.conf)" != "$dir/slurm.conf" ] || rm -f /etc/slurm/slurm.conf; return 0; }
    while read -r pid; do
        running "$pid" && kill "$pid" 2>/dev/null || true
    done < "$dir/pids"
    while read -r pid; do
        for _ in $(seq 40); do running "$pid" || break; sleep 0.25; done
        running "$pid" && kill -9 "$pid" 2>/dev/null || true
    done < "$dir/pids"
    rm -f "$dir/pids"
    [ "$(readlink /etc/slurm/slurm.conf)" != "$dir/slurm.conf" ] || rm -f /etc/slurm/slurm.conf
}

case $command in
    start) start ;;
    stop) stop ;;
    *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
