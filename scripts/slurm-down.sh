#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by scripts/slurm-up.sh.
#
#   scripts/slurm-down.sh           # cancel jobs, stop daemons, keep state
#   scripts/slurm-down.sh --purge   # ... and delete the state folder (DB, logs, job ids)
#   scripts/slurm-down.sh --keep-jobs  # stop daemons only; jobs resume on the next slurm-up
#
# Only the daemons named by the pid files in the state folder are stopped,
# never processes found by name, so nothing else on the machine is touched.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm.env
source "$HERE/slurm.env"

purge=0 keep_jobs=0
for a in "$@"; do
    case $a in
        --purge) purge=1 ;;
        --keep-jobs) keep_jobs=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "slurm-down: unknown argument: $a" >&2; exit 2 ;;
    esac
done

D="$NANOGPT_SLURM_DIR"
RUN="$D/run" CONF="$D/etc/slurm.conf"
SYS_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"

say() { printf 'slurm-down: %s\n' "$*"; }

# Same check as slurm-up.sh: the pid is live and really is that daemon.
pid_of() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/$pid/comm) == "$name" ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

stop() {
    local pidfile=$1 name=$2 limit=${3:-30} pid i
    pid=$(pid_of "$pidfile" "$name") || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for (( i = 0; i < limit * 10; i++ )); do
        [[ -d /proc/$pid ]] || return 0
        # A zombie has exited; its parent (not us) has yet to reap it.
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
        sleep 0.1
    done
    say "$name did not exit within ${limit}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

[[ $(id -u) -eq 0 ]] || { echo "slurm-down: must run as root" >&2; exit 1; }

# Cancel jobs first so that their end is recorded in accounting while
# slurmctld and slurmdbd are still up.
if (( ! keep_jobs )) && [[ -f $CONF ]] && pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o '%A' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for (( i = 0; i < 150; i++ )); do
            [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

stop "$RUN/slurmd.pid" slurmd
stop "$RUN/slurmctld.pid" slurmctld
stop "$RUN/slurmdbd.pid" slurmdbd
stop "$RUN/mariadbd.pid" mariadbd 60
stop "$D/munge/munged.pid" munged

if (( purge )); then
    # Only our own symlink; a foreign /etc/slurm/slurm.conf is left alone.
    if [[ -L $SYS_CONF && $(readlink "$SYS_CONF") == "$CONF" ]]; then
        rm -f "$SYS_CONF"
    fi
    case $D in
        ""|/|/tmp|/root|/home) say "refusing to delete '$D'"; exit 1 ;;
    esac
    say "removing $D"
    rm -rf -- "$D"
fi
say "down"
