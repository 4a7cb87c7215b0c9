#!/usr/bin/env bash
# Set up the Prefect API in PREFECT_API_URL for edgeopt's fleet; idempotent (safe to run again).
#   bash deployments/setup.sh [HOSTNAME ...]
# 1. the four work pools (process workers): intel-cpu, apple-silicon, nvidia-gpu, arm64
# 2. one benchmark slot per measuring host: the global concurrency limit edgeopt-benchmark-<host>
#    (default: this host; name every measuring host of the fleet here)
# 3. the automations of deployments/automations.yaml (those whose deployments exist: run this again
#    after `prefect deploy --all`)
# The work is done by deployments/setup.py, in the Python environment edgeopt is installed in.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if command -v prefect >/dev/null 2>&1; then PYTHON="$(dirname "$(command -v prefect)")/python"
  elif [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"
  else PYTHON=python3; fi
fi
hosts=()
for h in "$@"; do hosts+=(--host "$h"); done
exec "$PYTHON" "$here/setup.py" "${hosts[@]}"
