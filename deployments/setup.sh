#!/usr/bin/env bash
# Create the work pools and the per-host benchmark concurrency limits on the Prefect API in
# PREFECT_API_URL. Usage: bash deployments/setup.sh [HOSTNAME ...]   (default: this host)
set -euo pipefail
for pool in intel-cpu; do
  prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
done
for host in "${@:-$(hostname)}"; do
  prefect global-concurrency-limit inspect "edgeopt-benchmark-${host}" >/dev/null 2>&1 || \
    prefect global-concurrency-limit create --limit 1 "edgeopt-benchmark-${host}"
done
