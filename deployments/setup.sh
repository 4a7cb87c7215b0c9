#!/usr/bin/env bash
# Set up the Prefect API in PREFECT_API_URL for edgeopt's fleet; idempotent (safe to run again).
#   bash deployments/setup.sh [HOSTNAME ...]
# 1. the four work pools (process workers): intel-cpu, apple-silicon, nvidia-gpu, arm64
# 2. one benchmark slot per measuring host: the global concurrency limit edgeopt-benchmark-<host>
#    (default: this host; name every measuring host of the fleet here)
# 3. the automations of deployments/automations.yaml (those whose deployments exist: run this again
#    after `prefect deploy --all`)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFECT="${PREFECT:-prefect}"
command -v "$PREFECT" >/dev/null || { echo "setup: no '$PREFECT' command (activate the environment edgeopt is installed in)" >&2; exit 2; }
PYTHON="${PYTHON:-$(dirname "$(command -v "$PREFECT")")/python}"
[ -x "$PYTHON" ] || PYTHON=python
[ -n "${PREFECT_API_URL:-}" ] || { echo "setup: set PREFECT_API_URL to the Prefect server first" >&2; exit 2; }
for pool in intel-cpu apple-silicon nvidia-gpu arm64; do
  if "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: exists"
  else
    "$PREFECT" work-pool create "$pool" --type process >/dev/null
    echo "work pool $pool: created"
  fi
done
for host in "${@:-$(hostname)}"; do
  if "$PREFECT" global-concurrency-limit inspect "edgeopt-benchmark-${host}" >/dev/null 2>&1; then
    echo "benchmark limit edgeopt-benchmark-${host}: exists"
  else
    "$PREFECT" global-concurrency-limit create --limit 1 "edgeopt-benchmark-${host}" >/dev/null
    echo "benchmark limit edgeopt-benchmark-${host}: created (1 slot)"
  fi
done
"$PYTHON" "$here/automations.py"
