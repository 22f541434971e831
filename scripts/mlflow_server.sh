#!/usr/bin/env bash
# mlflow_server.sh - run an MLflow tracking server for hybridmim (clusters, many concurrent jobs).
#
# Usage: scripts/mlflow_server.sh start | stop | status | restart
#   start   start `mlflow server` in the background (pid file + log file) and wait until /health
#           answers; a second start while it runs is a no-op. Prints the line for the jobs:
#               export MLFLOW_TRACKING_URI=http://<host>:<port>
#   stop    stop the server this script started (its process group, found by the pid file).
#   status  exit 0 and print the URI when the server answers /health, exit 3 otherwise.
#
# Jobs then log through HTTP: put MLFLOW_TRACKING_URI=http://<host>:<port> in their environment
# (SLURM jobs inherit it: the plugin submits with --export=ALL). That env var takes precedence over
# the config's tracking.uri (hybridmim/tracking/store.py). Only the server touches the database,
# so the SQLite file is written by one host; for many hundreds of concurrent jobs use PostgreSQL.
#
# Environment (defaults in brackets; paths relative to the repository root):
#   MLFLOW_SERVER_HOST           [127.0.0.1]  interface to bind; 0.0.0.0 for jobs on other nodes
#   MLFLOW_SERVER_PORT           [5000]
#   MLFLOW_SERVER_BACKEND_URI    [sqlite:///<repo>/results/mlflow/mlflow.db]  the same DB the jobs
#                                use without a server, so earlier runs stay visible. Or PostgreSQL:
#                                postgresql://user:pass@dbhost:5432/mlflow (needs psycopg2 in the env)
#   MLFLOW_SERVER_ARTIFACTS      [<repo>/results/mlflow/artifacts]
#   MLFLOW_SERVER_ARTIFACTS_MODE [proxy]  proxy: --artifacts-destination (clients upload through the
#                                server); direct: --default-artifact-root + --no-serve-artifacts
#                                (clients write to the shared path themselves). Experiments made by
#                                `hybridmim tracking init` carry an explicit file:// location
#                                under the artifact root, which clients write directly either way.
#   MLFLOW_SERVER_WORKERS        [2]
#   MLFLOW_SERVER_ALLOWED_HOSTS  []  extra Host headers to accept (MLflow 3 rejects anything but
#                                localhost and private IPs), e.g. 'login01,login01.cluster.org:5000'
#   MLFLOW_SERVER_DIR            [<repo>/results/mlflow/server]  pid file and log file
#   MLFLOW_SERVER_TIMEOUT        [60]  seconds to wait for /health (start) or for the exit (stop)
#   MLFLOW                       [<repo>/.venv/bin/mlflow, else `mlflow` on PATH]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${MLFLOW_SERVER_HOST:-127.0.0.1}
PORT=${MLFLOW_SERVER_PORT:-5000}
BACKEND=${MLFLOW_SERVER_BACKEND_URI:-sqlite:///$ROOT/results/mlflow/mlflow.db}
ARTIFACTS=${MLFLOW_SERVER_ARTIFACTS:-$ROOT/results/mlflow/artifacts}
ART_MODE=${MLFLOW_SERVER_ARTIFACTS_MODE:-proxy}
WORKERS=${MLFLOW_SERVER_WORKERS:-2}
ALLOWED=${MLFLOW_SERVER_ALLOWED_HOSTS:-}
DIR=${MLFLOW_SERVER_DIR:-$ROOT/results/mlflow/server}
TIMEOUT=${MLFLOW_SERVER_TIMEOUT:-60}
PIDFILE=$DIR/mlflow-server-$PORT.pid
LOGFILE=$DIR/mlflow-server-$PORT.log

if [ -n "${MLFLOW:-}" ]; then :; elif [ -x "$ROOT/.venv/bin/mlflow" ]; then MLFLOW=$ROOT/.venv/bin/mlflow; else MLFLOW=mlflow; fi

say() { printf '[mlflow_server %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# The address jobs should use: the bound interface, or this host's name when bound to all.
client_host() { if [ "$HOST" = 0.0.0.0 ] || [ "$HOST" = "::" ]; then hostname -f 2>/dev/null || hostname; else echo "$HOST"; fi; }
URI="http://$(client_host):$PORT"

healthy() { [ "$(curl -s -m 3 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" 2>/dev/null || true)" = 200 ] \
            || [ "$(curl -s -m 3 -o /dev/null -w '%{http_code}' "$URI/health" 2>/dev/null || true)" = 200 ]; }

# server_pid : the pid from the pid file, if that process is alive and is an mlflow server
server_pid() {
    local pid
    [ -s "$PIDFILE" ] || return 1
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'mlflow.* server' || return 1
    echo "$pid"
}

do_start() {
    local pid deadline args
    if pid=$(server_pid); then
        healthy || die "an mlflow server (pid $pid) runs but does not answer /health; see $LOGFILE"
        say "already running (pid $pid)"; echo "export MLFLOW_TRACKING_URI=$URI"; return 0
    fi
    command -v "$MLFLOW" >/dev/null || die "mlflow not found ($MLFLOW); run scripts/install.sh or set MLFLOW"
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && die "port $PORT is already in use; set MLFLOW_SERVER_PORT"
    mkdir -p "$DIR"
    case "$BACKEND" in sqlite:///*)
        mkdir -p "$(dirname "${BACKEND#sqlite:///}")"
        # Create the tables under hybridmim's file lock and switch the file to WAL (3x faster
        # commits, readers never block the writer); skipped where hybridmim is not installed.
        if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c 'import hybridmim.tracking.store' 2>/dev/null; then
            timeout "$TIMEOUT" "$ROOT/.venv/bin/python" -c 'import sys; from hybridmim.tracking.store import prepare_sqlite; prepare_sqlite(sys.argv[1], sys.argv[2])' \
                "$BACKEND" "$ARTIFACTS" >>"$LOGFILE" 2>&1 || die "could not prepare $BACKEND; see $LOGFILE"
        fi ;;
    esac
    args=(server --backend-store-uri "$BACKEND" --host "$HOST" --port "$PORT" --workers "$WORKERS")
    case "$ART_MODE" in
        proxy)  mkdir -p "$ARTIFACTS"; args+=(--serve-artifacts --artifacts-destination "$ARTIFACTS") ;;
        direct) mkdir -p "$ARTIFACTS"; args+=(--no-serve-artifacts --default-artifact-root "$ARTIFACTS") ;;
        *) die "MLFLOW_SERVER_ARTIFACTS_MODE must be proxy or direct, not '$ART_MODE'" ;;
    esac
    if [ -n "$ALLOWED" ]; then args+=(--allowed-hosts "localhost,127.0.0.1,localhost:$PORT,127.0.0.1:$PORT,$ALLOWED"); fi
    say "starting: $MLFLOW ${args[*]}  (log: $LOGFILE)"
    # own session + process group, so stop can end the server and its workers and nothing else
    # MLflow 3's background job runner (huey consumers, for GenAI evaluation jobs) is not needed
    # here and adds ~8 processes and seconds of start-up; set the variable to true to keep it.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
        setsid "$MLFLOW" "${args[@]}" </dev/null >>"$LOGFILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    deadline=$((SECONDS + TIMEOUT))
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then rm -f "$PIDFILE"; tail -n 20 "$LOGFILE" >&2; die "mlflow server exited during start-up; see $LOGFILE"; fi
        if [ "$SECONDS" -ge "$deadline" ]; then do_stop; tail -n 20 "$LOGFILE" >&2; die "no answer from $URI/health within ${TIMEOUT}s; see $LOGFILE"; fi
        sleep 0.25
    done
    say "up (pid $pid): $URI  backend=$BACKEND  artifacts=$ARTIFACTS ($ART_MODE)"
    echo "export MLFLOW_TRACKING_URI=$URI"
}

do_stop() {
    local pid deadline
    if ! pid=$(server_pid); then say "not running (no live server in $PIDFILE)"; rm -f "$PIDFILE"; return 0; fi
    say "stopping mlflow server (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while kill -0 -- "-$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 -- "-$pid" 2>/dev/null; then say "still alive after ${TIMEOUT}s: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
    say "stopped"
}

do_status() {
    local pid
    if pid=$(server_pid) && healthy; then echo "running (pid $pid): $URI"; echo "export MLFLOW_TRACKING_URI=$URI"; return 0; fi
    echo "not running (port $PORT)"; return 3
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    *) sed -n '2,36p' "$0" >&2; exit 2 ;;
esac
