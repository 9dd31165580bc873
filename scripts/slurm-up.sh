#!/usr/bin/env bash
# Bring up a one-node SLURM 22.05 cluster with accounting (slurmdbd + a
# private MariaDB) on this Debian machine. Idempotent: when everything is
# already up it only checks and exits 0.
#
#   scripts/slurm-up.sh            # state in ${NANOGPT_SLURM_DIR:-/tmp/nanogpt-slurm}
#   scripts/slurm-down.sh [--purge]
#
# Needs root (installs packages, writes /etc/slurm/slurm.conf, runs daemons).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm.env
source "$HERE/slurm.env"

D="$NANOGPT_SLURM_DIR"
ETC="$D/etc" LOG="$D/log" RUN="$D/run" DB="$D/mariadb" MUNGE="$D/munge"
CONF="$ETC/slurm.conf" DBDCONF="$ETC/slurmdbd.conf"
DB_SOCK="$RUN/mariadb.sock"
SYS_CONF=/etc/slurm/slurm.conf
WAIT_S="${NANOGPT_SLURM_WAIT_S:-60}"
T0=$(date +%s%3N)
elapsed() { local ms=$(( $(date +%s%3N) - T0 )); printf '%d.%ds' $((ms/1000)) $((ms%1000/100)); }

say() { printf 'slurm-up: %s\n' "$*"; }
die() { printf 'slurm-up: ERROR: %s\n' "$*" >&2; show_logs; exit 1; }

show_logs() {
    local f
    for f in "$LOG"/*.log "$MUNGE"/*.log; do
        [[ -s $f ]] || continue
        printf -- '----- tail %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

# True when the pid file names a live process whose command is $2; the name
# check guards against a stale pid file whose pid was reused.
alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$name" ]] || return 1
    # A killed daemon stays a zombie until pid 1 reaps it: that is not alive.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# wait_for SECONDS DESCRIPTION CMD... : poll CMD until it succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < end )) || die "timed out after ${limit}s waiting for $what"
        sleep 0.2
    done
}

[[ $(id -u) -eq 0 ]] || { echo "slurm-up: must run as root" >&2; exit 1; }

# ---------------------------------------------------------------- packages
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) == ii* ]] || missing+=("$p")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]} (apt-get)"
    # Keep the packages' init scripts from starting system-wide daemons that
    # would compete with ours for ports and pid files.
    added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    rc=0
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/tmp/nanogpt-slurm-apt.log 2>&1 || rc=$?
    if (( added_policy )); then rm -f /usr/sbin/policy-rc.d; fi
    if (( rc )); then tail -n 30 /tmp/nanogpt-slurm-apt.log >&2; echo "slurm-up: apt-get install failed" >&2; exit 1; fi
fi

mkdir -p "$ETC" "$LOG" "$RUN" "$D/ctld" "$D/slurmd"

# ---------------------------------------------------------------- configs
# Node line: name and memory from the hardware, CPUs raised to MIN_CPUS (as
# cores of one socket) - with task/none nothing is pinned, so oversubscribing
# the 2 real cores is only a matter of speed.
hw=$(slurmd -C 2>/dev/null | head -n 1)
node=$(sed -n 's/.*NodeName=\([^ ]*\).*/\1/p' <<<"$hw")
real_cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n $node && -n $real_cpus && -n $real_mem ]] || die "cannot parse 'slurmd -C': $hw"
cpus=$(( real_cpus > NANOGPT_SLURM_MIN_CPUS ? real_cpus : NANOGPT_SLURM_MIN_CPUS ))
mem=$(( real_mem * 95 / 100 ))   # headroom for the daemons and MariaDB

new_conf=$(cat <<EOF
# Written by scripts/slurm-up.sh; edits are overwritten.
ClusterName=$NANOGPT_SLURM_CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: plain /proc process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Start jobs at once instead of on the next scheduler tick, and rescan the
# queue every 2 s (default 60) so a requeued job restarts soon after it is eligible.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
# A requeued job waits cred_expire+1 s before it may start again (default
# 120 s); shorter keeps preemption/requeue tests quick. Step launch must
# still happen within this window, which is ample on one local node.
AuthInfo=cred_expire=${NANOGPT_SLURM_CRED_EXPIRE:-20}
# Refuse impossible requests at submit time rather than pend forever.
EnforcePartLimits=ALL
# Trust the node line below over the detected hardware (CPUs > real cores).
SlurmdParameters=config_overrides
ReturnToService=2
# submitit requeues on timeout/preemption.
JobRequeue=1
KillWait=10
# No mail on this machine; the default mail program does not exist.
MailProg=/bin/true
InactiveLimit=0
# submitit polls sacct to learn that a job ended; without accounting a job
# that dies before writing its result is waited for forever.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$NANOGPT_SLURM_PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

# The DB password is made once and kept; slurmdbd.conf holds it, hence 0600.
[[ -s $ETC/db.pass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$ETC/db.pass")
db_pass=$(<"$ETC/db.pass")
new_dbd=$(cat <<EOF
# Written by scripts/slurm-up.sh; edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$NANOGPT_SLURM_DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
)

conf_changed=0
if [[ ! -f $CONF || $(<"$CONF") != "$new_conf" ]]; then
    [[ -f $CONF ]] && conf_changed=1
    printf '%s\n' "$new_conf" > "$CONF"
fi
if [[ ! -f $DBDCONF || $(<"$DBDCONF") != "$new_dbd" ]]; then
    [[ -f $DBDCONF ]] && conf_changed=1
    (umask 077; printf '%s\n' "$new_dbd" > "$DBDCONF")
fi
chmod 0600 "$DBDCONF"

# Plain `sbatch` in any shell (and submitit's subprocesses) reads
# /etc/slurm/slurm.conf, so point it at ours. A foreign real file is kept aside.
mkdir -p /etc/slurm
if [[ -e $SYS_CONF && ! -L $SYS_CONF ]]; then
    bak="$SYS_CONF.before-nanogpt.$(date +%s)"
    say "moving existing $SYS_CONF to $bak"
    mv "$SYS_CONF" "$bak"
fi
[[ $(readlink "$SYS_CONF" 2>/dev/null) == "$CONF" ]] || ln -sfn "$CONF" "$SYS_CONF"

# Daemons find slurmdbd.conf next to SLURM_CONF (not next to the symlink).
export SLURM_CONF="$CONF"

# A changed config (other hostname, memory, ...) needs restarted daemons.
# Jobs survive: slurmctld reloads them from its state, and their
# slurmstepd processes do not depend on slurmd staying up.
if (( conf_changed )) && alive "$RUN/slurmctld.pid" slurmctld; then
    say "config changed: restarting the daemons (jobs are kept)"
    "$HERE/slurm-down.sh" --keep-jobs
fi

node_ready() {
    local st
    st=$(sinfo -h -N -n "$node" -o '%t' 2>/dev/null) || return 1
    [[ $st =~ ^(idle|mix|alloc|comp)$ ]]
}
sacct_ready() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

# ---------------------------------------------------------------- fast path
if alive "$MUNGE/munged.pid" munged && alive "$RUN/mariadbd.pid" mariadbd \
   && alive "$RUN/slurmdbd.pid" slurmdbd && alive "$RUN/slurmctld.pid" slurmctld \
   && alive "$RUN/slurmd.pid" slurmd && node_ready && sacct_ready; then
    say "already up (node $node, partition $NANOGPT_SLURM_PARTITION, $(elapsed))"
    exit 0
fi

# ---------------------------------------------------------------- munge
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! alive "$MUNGE/munged.pid" munged; then
    if munge_ok; then
        say "munged: a munged not started by us is already serving; using it"
    else
        [[ -s /etc/munge/munge.key ]] || { say "creating munge key"; runuser -u munge -- mungekey --create; }
        # /run is a tmpfs on most machines: recreate the socket folder each boot.
        install -d -o munge -g munge -m 0755 /run/munge
        # munged runs as munge and insists on owning its pid/log folder.
        install -d -o munge -g munge -m 0700 "$MUNGE"
        say "starting munged"
        runuser -u munge -- munged --force --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log"
    fi
fi
wait_for 15 "munge" munge_ok

# ---------------------------------------------------------------- MariaDB
db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping; }
if ! alive "$RUN/mariadbd.pid" mariadbd; then
    if [[ ! -d $DB/mysql ]]; then
        say "initialising MariaDB in $DB"
        mkdir -p "$DB"
        mariadb-install-db --no-defaults --datadir="$DB" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    say "starting MariaDB on 127.0.0.1:$NANOGPT_SLURM_DB_PORT"
    # setsid + redirected stdio: a caller capturing our output must not be
    # kept waiting by a daemon holding its pipe.
    setsid mariadbd --no-defaults --user=root --datadir="$DB" --socket="$DB_SOCK" \
        --port="$NANOGPT_SLURM_DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 30 "MariaDB" db_ping
fi
# Idempotent; the two hosts cover TCP from 127.0.0.1 with or without name resolution.
mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF || die "cannot create the slurm DB user"
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# ---------------------------------------------------------------- slurmdbd
if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    slurmdbd </dev/null >/dev/null 2>&1 || die "slurmdbd failed to start"
fi
# The first start creates the tables, which takes a few seconds.
wait_for "$WAIT_S" "slurmdbd" sacctmgr -n show cluster format=cluster
if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$NANOGPT_SLURM_CLUSTER"; then
    say "registering cluster $NANOGPT_SLURM_CLUSTER in accounting"
    sacctmgr -i add cluster "$NANOGPT_SLURM_CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ! alive "$RUN/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld </dev/null >/dev/null 2>&1 || die "slurmctld failed to start"
fi
wait_for 30 "slurmctld" scontrol ping
if ! alive "$RUN/slurmd.pid" slurmd; then
    say "starting slurmd"
    slurmd </dev/null >/dev/null 2>&1 || die "slurmd failed to start"
fi

# A node left DOWN/DRAIN by an unclean stop would never take jobs.
end=$(( $(date +%s) + WAIT_S ))
until node_ready; do
    st=$(sinfo -h -N -n "$node" -o '%t' 2>/dev/null || true)
    if [[ $st =~ ^(down|drain|drng|fail) ]]; then
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    fi
    (( $(date +%s) < end )) || die "node $node not ready after ${WAIT_S}s (state '${st}')"
    sleep 0.2
done
wait_for "$WAIT_S" "sacct" sacct_ready

say "up: node $node ($cpus CPUs advertised, ${mem} MB), partition $NANOGPT_SLURM_PARTITION, SLURM_CONF=$SYS_CONF -> $CONF ($(elapsed))"
