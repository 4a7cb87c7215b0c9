#!/usr/bin/env bash
# A local fleet for trying the scale-out: PostgreSQL, a Prefect server on it, an MLflow tracking server
# (PostgreSQL backend, artifacts served by the server), the work pools, limits and deployments, and one
# process worker per pool whose profile fits this host. Everything listens on 127.0.0.1 only; all state
# (data folders, logs, pid files) lives under $FLEET_DIR.
#
#   bash deployments/fleet.sh up      # idempotent: starts what is not running, prints the export line
#   bash deployments/fleet.sh down    # workers first, then the servers, then PostgreSQL
#   bash deployments/fleet.sh env     # the export line for this fleet
#   bash deployments/fleet.sh status  # which processes are up
#
# Settings (environment): FLEET_DIR (default ./.edgeopt/fleet), FLEET_PG_PORT (54329),
# FLEET_PREFECT_PORT (4200), FLEET_MLFLOW_PORT (5000), FLEET_POOLS (default: the pools whose profile
# fits this host, see `python -m flows._pools`), FLEET_DEPLOY (1: `prefect deploy` the deployments whose
# entrypoint exists; 0: skip), FLEET_BIN (folder with python/prefect/mlflow; default .venv/bin or PATH),
# FLEET_WORKER_QUERY_SECONDS (2: how often a worker asks the server for runs; Prefect's default is 10).
# Workers clone EDGEOPT_GIT_URL (default: this checkout) at EDGEOPT_GIT_BRANCH (default: its branch)
# and read models and data from EDGEOPT_HOME (default: ./.edgeopt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEET_DIR="$(mkdir -p "${FLEET_DIR:-$ROOT/.edgeopt/fleet}" && cd "${FLEET_DIR:-$ROOT/.edgeopt/fleet}" && pwd)"
PG_PORT="${FLEET_PG_PORT:-54329}"
PREFECT_PORT="${FLEET_PREFECT_PORT:-4200}"
MLFLOW_PORT="${FLEET_MLFLOW_PORT:-5000}"
if [ -n "${FLEET_BIN:-}" ]; then BIN="$FLEET_BIN"
elif [ -x "$ROOT/.venv/bin/prefect" ]; then BIN="$ROOT/.venv/bin"
else BIN="$(dirname "$(command -v prefect)")"; fi
PG_USER=edgeopt
API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}"
PG_DATA="$FLEET_DIR/pg/data"
LOGS="$FLEET_DIR/logs"
PIDS="$FLEET_DIR/pids"
export PATH="$BIN:$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

say() { printf 'fleet: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_bin() {
  local d
  for d in $(command -v initdb 2>/dev/null | xargs -r dirname) /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_postgres_installed() {
  pg_bin >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing PostgreSQL (Debian's postgresql package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    pg_bin >/dev/null && return 0
  fi
  die "PostgreSQL is not installed (initdb, pg_ctl): apt-get install postgresql, or put its bin folder on PATH"
}

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# start NAME CMD...: in its own session (its pid is its process group), logs under $LOGS
start() {
  local name="$1"; shift
  if alive "$name"; then say "$name already running (pid $(cat "$PIDS/$name.pid"))"; return 0; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$PIDS/$name.pid"
  say "$name started (pid $!, log $LOGS/$name.log)"
}

# descendants PID: every process under PID (children first-level, then theirs)
descendants() {
  local p
  for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$p"; descendants "$p"; done
}

# stop NAME: SIGTERM to its process group, SIGKILL after 15 s; then the same to what it started in sessions
# of their own (a worker's flow-run processes), which its process group does not hold
stop() {
  local name="$1" pid i p kids left=""
  [ -f "$PIDS/$name.pid" ] || return 0
  pid="$(cat "$PIDS/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kids="$(descendants "$pid" | tr '\n' ' ')"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || true; say "$name killed"; }
    if [ -n "${kids// /}" ]; then
      # shellcheck disable=SC2086
      kill -TERM $kids 2>/dev/null || true
      for i in $(seq 1 20); do
        left=""; for p in $kids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
        [ -z "$left" ] && break; sleep 0.5
      done
      # shellcheck disable=SC2086
      [ -n "$left" ] && { kill -KILL $left 2>/dev/null || true; say "$name: killed what it had started:$left"; }
    fi
  fi
  rm -f "$PIDS/$name.pid"
  say "$name stopped"
}

# wait_http URL NAME SECONDS
wait_http() {
  local url="$1" name="$2" limit="$3" i
  for i in $(seq 1 "$limit"); do
    "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" \
      2>/dev/null && return 0
    alive "$name" || die "$name exited; see $LOGS/$name.log: $(tail -n 5 "$LOGS/$name.log" 2>/dev/null)"
    sleep 1
  done
  die "$name did not answer at $url within $limit s; see $LOGS/$name.log"
}

pg_up() {
  local bin; bin="$(pg_bin)"
  mkdir -p "$FLEET_DIR/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$FLEET_DIR/pg"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust -E UTF8 >"$LOGS/initdb.log" 2>&1 \
      || die "initdb failed; see $LOGS/initdb.log"
  fi
  if as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    say "postgres already running"
  else
    [ "$(id -u)" = 0 ] && touch "$LOGS/postgres.log" && chown postgres "$LOGS/postgres.log"
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$LOGS/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$FLEET_DIR/pg" start >/dev/null \
      || die "PostgreSQL did not start; see $LOGS/postgres.log"
    say "postgres started (port $PG_PORT, data $PG_DATA)"
  fi
  local db
  for db in prefect mlflow; do
    if ! as_pg psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "select 1 from pg_database where datname='$db'" | grep -q 1; then
      as_pg psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "create database $db" >/dev/null
    fi
  done
}

pg_down() {
  local bin; bin="$(pg_bin)" || return 0
  [ -f "$PG_DATA/PG_VERSION" ] || return 0
  if as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null && say "postgres stopped"
  fi
}

pools() {
  if [ -n "${FLEET_POOLS:-}" ]; then echo "$FLEET_POOLS"; return; fi
  (cd "$ROOT" && "$BIN/python" -m flows._pools --fitting)
}

env_line() {
  echo "export PREFECT_API_URL=$API_URL MLFLOW_TRACKING_URI=$TRACKING_URI"
}

up() {
  mkdir -p "$LOGS" "$PIDS" "$FLEET_DIR/mlflow/artifacts" "$FLEET_DIR/prefect" "$FLEET_DIR/worker"
  ensure_postgres_installed
  pg_up
  local pg="127.0.0.1:${PG_PORT}"
  PREFECT_HOME="$FLEET_DIR/prefect" \
  PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://${PG_USER}@${pg}/prefect" \
  PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_UI_API_URL="$API_URL" \
    start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  start mlflow-server "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "postgresql+psycopg2://${PG_USER}@${pg}/mlflow" \
    --serve-artifacts --artifacts-destination "$FLEET_DIR/mlflow/artifacts"
  wait_http "$API_URL/health" prefect-server 180
  wait_http "$TRACKING_URI/health" mlflow-server 180
  export PREFECT_API_URL="$API_URL" MLFLOW_TRACKING_URI="$TRACKING_URI" PREFECT_HOME="$FLEET_DIR/worker"
  local fitting; fitting="$(pools)"
  (cd "$ROOT" && bash deployments/setup.sh) >&2
  export EDGEOPT_GIT_URL="${EDGEOPT_GIT_URL:-$ROOT}"
  export EDGEOPT_GIT_BRANCH="${EDGEOPT_GIT_BRANCH:-$(git -C "$ROOT" rev-parse --abbrev-ref HEAD)}"
  export EDGEOPT_HOME="${EDGEOPT_HOME:-$ROOT/.edgeopt}"
  if [ "${FLEET_DEPLOY:-1}" = 1 ]; then
    local args; args="$(cd "$ROOT" && "$BIN/python" -m flows._pools --deploy-args)"
    # shellcheck disable=SC2086  # one -n NAME per deployment whose entrypoint exists in this checkout
    (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy $args >"$LOGS/deploy.log" 2>&1) \
      && say "deployed: ${args//-n /}; log $LOGS/deploy.log" \
      || die "prefect deploy failed; see $LOGS/deploy.log"
    (cd "$ROOT" && "$BIN/python" deployments/setup.py) >&2  # the automations, now that their deployments exist
  fi
  local pool
  # a worker asks for work every PREFECT_WORKER_QUERY_SECONDS (Prefect's default 10: a run started from the
  # CLI or the UI waits 5 s on average, up to 10, before anything happens); 2 s costs one small query
  for pool in $fitting; do
    PREFECT_WORKER_QUERY_SECONDS="${FLEET_WORKER_QUERY_SECONDS:-2}" \
      start "worker-$pool" "$BIN/prefect" worker start --pool "$pool" --type process --name "$(hostname)-$pool"
  done
  [ -n "$fitting" ] || say "no pool's profile fits this host: no worker started (set FLEET_POOLS to force)"
  say "Prefect UI: http://127.0.0.1:${PREFECT_PORT}   MLflow UI: $TRACKING_URI"
  env_line
}

down() {
  local f name
  # workers first (a worker stopped after its server retries and logs errors), then the servers
  for f in "$PIDS"/worker-*.pid; do [ -e "$f" ] || continue; name="$(basename "$f" .pid)"; stop "$name" & done
  wait
  stop prefect-server &
  stop mlflow-server &
  wait
  pg_down
}

status() {
  local f name
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    if alive "$name"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
  done
  local bin; bin="$(pg_bin)" || true
  if [ -n "$bin" ] && [ -f "$PG_DATA/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    echo "postgres: running (port $PG_PORT)"
  else
    echo "postgres: not running"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_line ;;
  status) status ;;
  *) die "usage: $0 up|down|env|status" ;;
esac
