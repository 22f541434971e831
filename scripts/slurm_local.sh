#!/usr/bin/env bash
# slurm_local.sh - a real single-node SLURM on this machine, for hybridmim's tests and for trying
# the SLURM profile on a workstation. Debian 12 (bookworm) packages, run as root, no systemd needed.
#
#   munged + slurmctld + slurmd          always
#   private MariaDB (127.0.0.1:3307)     in accounting mode (the default), so that `sacct` works,
#   + slurmdbd                           which is what snakemake-executor-plugin-slurm polls with
#
# Usage: scripts/slurm_local.sh start | stop | restart | status | check | install | purge
#   start    install missing packages (apt-get --no-install-recommends), write the config, start the
#            daemons and wait until the node is idle. Idempotent: a second start is a quick no-op;
#            a changed config restarts the slurm daemons.
#   stop     stop the daemons this script started (pid files + /proc/<pid>/comm check; never by name).
#   status   which daemons run, the mode, and sinfo. Exit 0 when the cluster answers, 3 otherwise.
#   check    smoke test: sinfo, srun, sbatch, squeue and (accounting mode) sacct.
#   install  only install the packages.
#   purge    stop, then delete the state folder and the config files this script wrote.
#
# Environment (defaults in brackets):
#   SLURM_LOCAL_MODE       [accounting]  accounting: MariaDB + slurmdbd, `sacct` works and the plugin's
#                          defaults work. squeue: no accounting (3 packages fewer, ~190 MB less); then
#                          snakemake MUST get `--slurm-status-command squeue`, or it waits forever.
#   SLURM_LOCAL_DIR        [/var/lib/slurm-local]  state, spool, logs, pid files, MariaDB datadir
#   SLURM_LOCAL_PARTITION  [debug]    SLURM_LOCAL_CLUSTER [hybridmim]
#   SLURM_LOCAL_DB_PORT    [3307]     the private MariaDB's port, bound to 127.0.0.1 only
#   SLURM_LOCAL_CGROUP     [0]        1: proctrack/cgroup + task/cgroup (memory limits enforced; then
#                                     give jobs mem_mb >= 300, the in-job snakemake needs ~250 MB)
#   SLURM_LOCAL_NO_APT     [0]        1: never call apt-get; fail if a package is missing
#   SLURM_LOCAL_FORCE      [0]        1: overwrite /etc/slurm/*.conf files this script did not write
#   SLURM_LOCAL_TIMEOUT    [60]       seconds any single wait may take before start fails
#
# A test cluster only: every daemon runs as root, the DB password is fixed, nothing listens
# beyond 127.0.0.1 except slurmctld/slurmd/slurmdbd's standard ports (6817-6819).
set -euo pipefail

MODE=${SLURM_LOCAL_MODE:-accounting}
BASE=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-hybridmim}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
CGROUP=${SLURM_LOCAL_CGROUP:-0}
NO_APT=${SLURM_LOCAL_NO_APT:-0}
FORCE=${SLURM_LOCAL_FORCE:-0}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}

case "$MODE" in accounting|squeue) ;; *) echo "SLURM_LOCAL_MODE must be accounting or squeue, not '$MODE'" >&2; exit 2;; esac

ETC=/etc/slurm
SLURM_CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
CG_CONF=$ETC/cgroup.conf
MARK="# written by hybridmim scripts/slurm_local.sh"
RUN=$BASE/run          # pid files of the daemons we start
LOG=$BASE/log
DB_DIR=$BASE/mysql
DB_RUN=$BASE/mysql-run
DB_SOCK=$DB_RUN/mysqld.sock
DB_PASS=hybridmim-local-only
NODE=$(hostname -s)

say() { printf '[slurm_local %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------------------------ helpers
# wait_until SECONDS WHAT CMD... : run CMD until it succeeds or the deadline passes, then fail
# naming WHAT. Every CMD used with it is itself bounded (timeout, or a local TCP connect).
wait_until() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        [ "$SECONDS" -ge "$deadline" ] && die "gave up after ${secs}s waiting for $what (logs: $LOG)"
        sleep 0.2
    done
}

# our_pid PIDFILE COMM : print the pid if PIDFILE names a live process whose comm is COMM
our_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# end_pid PIDFILE COMM : TERM the process named by PIDFILE (only if its comm matches), wait at most
# 30 s, then KILL. Nothing else is ever signalled.
end_pid() {
    local pid deadline
    if pid=$(our_pid "$1" "$2"); then
        say "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then say "$2 still alive after 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

packages() {
    echo munge slurm-client slurmctld slurmd
    if [ "$MODE" = accounting ]; then echo mariadb-server slurmdbd; fi
}

# ------------------------------------------------------------------------------------ install
do_install() {
    local p missing=()
    for p in $(packages); do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then return 0; fi
    [ "$NO_APT" = 1 ] && die "packages missing and SLURM_LOCAL_NO_APT=1: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian 12 (or install ${missing[*]} yourself)"
    say "installing ${missing[*]} (apt-get --no-install-recommends)"
    export DEBIAN_FRONTEND=noninteractive
    # Images without systemd usually carry a policy-rc.d that keeps postinst scripts from starting
    # the services; this script starts them itself either way.
    timeout 300 apt-get update -qq -o DPkg::Lock::Timeout=120 || die "apt-get update failed or took > 300 s"
    timeout 600 apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed or took > 600 s"
}

# ------------------------------------------------------------------------------------ config
# The node line comes from `slurmd -C` (the real topology, so slurmd does not complain that the
# socket/core layout differs); RealMemory is 90 % of what it detects, leaving room for the OS.
node_line() {
    local probe k v line="NodeName=$NODE NodeAddr=127.0.0.1"
    probe=$(timeout 20 slurmd -C | head -1) || die "slurmd -C failed"
    for k in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore RealMemory; do
        v=$(grep -o "$k=[0-9]*" <<<"$probe" | cut -d= -f2)
        [ -n "$v" ] || die "slurmd -C did not report $k: $probe"
        [ "$k" = RealMemory ] && v=$((v * 90 / 100))
        line+=" $k=$v"
    done
    echo "$line State=UNKNOWN"
}

slurm_conf() {
    cat <<EOF
$MARK
# Regenerated on every start; change the script (or its environment knobs), not this file.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
# Reject at submit time a job that asks for more than the partition/node has; without this a
# rule with too many threads stays PENDING forever and the workflow never ends.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue for 5 min (squeue status mode relies on it; the plugin
# needs MinJobAge >= 3 x --slurm-init-seconds-before-status-checks).
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobCompType=jobcomp/none
EOF
    if [ "$CGROUP" = 1 ]; then
        printf 'ProctrackType=proctrack/cgroup\nTaskPlugin=task/cgroup,task/affinity\n'
    else
        printf 'ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n'
    fi
    if [ "$MODE" = accounting ]; then
        printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819\n'
        printf 'JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=30\n'
    else
        printf 'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n'
    fi
    node_line
    echo "PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
}

dbd_conf() {
    cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

# put_file TMP DEST MODE : install TMP as DEST; return 0 when DEST changed, 1 when identical.
# Refuses to replace a file this script did not write, unless SLURM_LOCAL_FORCE=1 (keeps a .bak).
put_file() {
    local tmp=$1 dst=$2 mode=$3
    if [ -e "$dst" ] && cmp -s "$tmp" "$dst"; then rm -f "$tmp"; return 1; fi
    if [ -e "$dst" ] && ! grep -qF "$MARK" "$dst"; then
        if [ "$FORCE" != 1 ]; then rm -f "$tmp"; die "$dst exists and was not written by this script; set SLURM_LOCAL_FORCE=1 to replace it (a .bak copy is kept)"; fi
        cp -a "$dst" "$dst.bak.$(date +%s)"
    fi
    install -m "$mode" -o root -g root "$tmp" "$dst"
    rm -f "$tmp"
    say "wrote $dst"
    return 0
}

CHANGED=0
write_config() {
    local t
    mkdir -p "$ETC" "$BASE/state" "$BASE/spool" "$RUN" "$LOG"
    t=$(mktemp); slurm_conf >"$t"; if put_file "$t" "$SLURM_CONF" 0644; then CHANGED=1; fi
    if [ "$CGROUP" = 1 ]; then
        t=$(mktemp); printf '%s\nCgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\n' "$MARK" >"$t"
        if put_file "$t" "$CG_CONF" 0644; then CHANGED=1; fi
    elif [ -e "$CG_CONF" ] && grep -qF "$MARK" "$CG_CONF"; then
        rm -f "$CG_CONF"; CHANGED=1
    fi
    if [ "$MODE" = accounting ]; then
        # slurmdbd refuses a slurmdbd.conf that is not 0600 and owned by its SlurmUser
        t=$(mktemp); dbd_conf >"$t"; if put_file "$t" "$DBD_CONF" 0600; then CHANGED=1; fi
    fi
}

# ------------------------------------------------------------------------------------ daemons
munge_works() { timeout 5 bash -c 'munge -n | unmunge' >/dev/null 2>&1; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then   # normally made by the package's postinst
        install -d -o munge -g munge -m 0700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    if munge_works; then return 0; fi   # a munged (ours or the system's) already answers: reuse it
    # no systemd: /run is a fresh tmpfs, and munged must run as the key's owner
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    say "starting munged"
    timeout 60 runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >/dev/null 2>&1
    wait_until "$TIMEOUT" "munged" munge_works
    cp /run/munge/munged.pid "$RUN/munged.started"   # so that stop only stops a munged we started
}

sql() { timeout 20 mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }

start_mariadb() {
    our_pid "$DB_RUN/mariadbd.pid" mariadbd >/dev/null && return 0
    install -d -o mysql -g mysql -m 0750 "$DB_DIR"
    install -d -o mysql -g mysql -m 0755 "$DB_RUN"
    touch "$LOG/mariadb.err"; chown mysql:mysql "$LOG/mariadb.err"
    if [ ! -d "$DB_DIR/mysql" ]; then
        say "creating the private MariaDB datadir $DB_DIR"
        timeout 120 mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    say "starting a private mariadbd on 127.0.0.1:$DB_PORT"
    port_open "$DB_PORT" && die "port $DB_PORT is already taken; set SLURM_LOCAL_DB_PORT"
    # --no-defaults: /etc/mysql/* is ignored, so a system MariaDB (3306, /var/lib/mysql) is untouched.
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
        --socket="$DB_SOCK" --pid-file="$DB_RUN/mariadbd.pid" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --log-error="$LOG/mariadb.err" \
        --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_until "$TIMEOUT" "mariadbd (see $LOG/mariadb.err)" sql -e 'SELECT 1'
    sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
            FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    if ! our_pid "$RUN/slurmdbd.pid" slurmdbd >/dev/null; then
        say "starting slurmdbd"
        timeout 60 slurmdbd </dev/null >/dev/null 2>&1
    fi
    wait_until "$TIMEOUT" "slurmdbd on port 6819" port_open 6819
    # sacctmgr only talks to slurmdbd once slurm.conf names accounting_storage/slurmdbd (written above)
    if ! timeout 20 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed (see $LOG/slurmdbd.log)"
        say "registered cluster $CLUSTER with slurmdbd (account root, user root)"
    fi
}

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }
node_up() { case "$(node_state)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }

start_slurm() {
    if ! our_pid "$RUN/slurmctld.pid" slurmctld >/dev/null; then say "starting slurmctld"; timeout 60 slurmctld </dev/null >/dev/null 2>&1; fi
    wait_until "$TIMEOUT" "slurmctld (scontrol ping)" timeout 10 scontrol ping
    if ! our_pid "$RUN/slurmd.pid" slurmd >/dev/null; then say "starting slurmd"; timeout 60 slurmd </dev/null >/dev/null 2>&1; fi
    local deadline=$((SECONDS + 15))
    until node_up || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
    if ! node_up; then   # e.g. DOWN after an unclean stop
        say "node is '$(node_state)': resuming it"
        timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_until "$TIMEOUT" "node $NODE to become idle (see $LOG/slurmd.log)" node_up
    fi
}

stop_slurm_daemons() {
    end_pid "$RUN/slurmd.pid" slurmd
    end_pid "$RUN/slurmctld.pid" slurmctld
    end_pid "$RUN/slurmdbd.pid" slurmdbd
}

# ------------------------------------------------------------------------------------ commands
do_start() {
    local t0=$SECONDS running=0
    [ "$(id -u)" = 0 ] || die "start must run as root (it installs packages and starts daemons)"
    do_install
    write_config
    { our_pid "$RUN/slurmctld.pid" slurmctld || our_pid "$RUN/slurmd.pid" slurmd || our_pid "$RUN/slurmdbd.pid" slurmdbd; } >/dev/null && running=1
    if [ "$CHANGED" = 1 ] && [ "$running" = 1 ]; then say "config changed: restarting the slurm daemons"; stop_slurm_daemons; fi
    if [ "$MODE" = squeue ]; then
        # switched from accounting mode: slurmdbd and our MariaDB are no longer needed
        end_pid "$RUN/slurmdbd.pid" slurmdbd; end_pid "$DB_RUN/mariadbd.pid" mariadbd
    fi
    start_munge
    if [ "$MODE" = accounting ]; then start_mariadb; start_slurmdbd; fi
    start_slurm
    echo "$MODE" >"$RUN/mode"
    say "cluster up in $((SECONDS - t0)) s: cluster=$CLUSTER partition=$PARTITION node=$NODE mode=$MODE"
    if [ "$MODE" = squeue ]; then
        say "no accounting: run snakemake with --slurm-status-command squeue (otherwise it waits forever)"
    fi
}

do_stop() {
    local pid
    stop_slurm_daemons
    end_pid "$DB_RUN/mariadbd.pid" mariadbd
    if [ -s "$RUN/munged.started" ]; then
        pid=$(tr -dc '0-9' <"$RUN/munged.started")
        # only the munged we started, and only while it is still that process
        if [ "$(tr -dc '0-9' </run/munge/munged.pid 2>/dev/null)" = "$pid" ]; then end_pid /run/munge/munged.pid munged; fi
        rm -f "$RUN/munged.started"
    fi
    rm -f "$RUN/mode"
    say "stopped"
}

do_status() {
    local d f pid rc=3
    for d in slurmctld:$RUN/slurmctld.pid slurmd:$RUN/slurmd.pid slurmdbd:$RUN/slurmdbd.pid \
             mariadbd:$DB_RUN/mariadbd.pid munged:/run/munge/munged.pid; do
        f=${d#*:}
        if pid=$(our_pid "$f" "${d%%:*}"); then echo "${d%%:*}: running (pid $pid)"; else echo "${d%%:*}: not running"; fi
    done
    echo "mode: $(cat "$RUN/mode" 2>/dev/null || echo none)"
    # sinfo retries for ~10 s when slurmctld is down; only ask when ours runs
    if our_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && timeout 10 sinfo; then rc=0; fi
    return $rc
}

do_check() {
    local tmp job out state
    timeout 10 sinfo || die "sinfo does not answer: is the cluster started?"
    out=$(timeout 30 srun -N1 -n1 --mem=50 -t 1 hostname) || die "srun failed"
    echo "srun: $out"
    tmp=$(mktemp -d)
    # shellcheck disable=SC2016  # $SLURM_JOB_ID is expanded inside the job
    job=$(cd "$tmp" && timeout 20 sbatch --parsable -p "$PARTITION" --mem=50 -t 1 -o "$tmp/out" --wrap 'echo done-$SLURM_JOB_ID')
    # poll squeue, not `sbatch --wait` (that one backs off to ~10 s between polls)
    wait_until 60 "sbatch job $job to finish" \
        timeout 10 bash -c "squeue -h --states=all -j $job -o %T | grep -qxE 'COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL'"
    state=$(timeout 10 squeue -h --states=all -j "$job" -o %T)
    out=$(cat "$tmp/out" 2>/dev/null || true); rm -rf "$tmp"
    if [ "$state" != COMPLETED ] || [ "$out" != "done-$job" ]; then die "sbatch job $job: state '$state', output '$out'"; fi
    echo "sbatch + squeue: job $job $state, output '$out'"
    if grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$SLURM_CONF"; then
        # the record reaches slurmdbd asynchronously
        wait_until 30 "sacct to report job $job" timeout 10 bash -c "sacct -X -n -P -j $job -o State | grep -qx COMPLETED"
        echo "sacct: $(timeout 10 sacct -X -n -P -j "$job" -o JobIDRaw,JobName,Account,State,ExitCode)"
    else
        echo "sacct: skipped (squeue mode, no accounting)"
    fi
    echo "check OK"
}

do_purge() {
    local f
    do_stop
    for f in "$SLURM_CONF" "$DBD_CONF" "$CG_CONF"; do
        if [ -e "$f" ] && grep -qF "$MARK" "$f"; then rm -f "$f"; say "removed $f"; fi
    done
    case "$BASE" in /|/var|/var/lib|/etc|/usr|"") die "refusing to delete SLURM_LOCAL_DIR=$BASE";; esac
    rm -rf "$BASE"; say "removed $BASE"
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    check) do_check ;;
    install) [ "$(id -u)" = 0 ] || die "install must run as root"; do_install ;;
    purge) do_purge ;;
    *) sed -n '2,31p' "$0" >&2; exit 2 ;;
esac
