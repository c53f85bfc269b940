#!/bin/sh
# Start the API the way `make serve` does: uvicorn with the app factory, uvloop and httptools
# (with a deadline on request headers: service/http.py).
# With several uvicorn processes, Prometheus counters are summed through files in a fresh dir.
set -eu
workers="${API_WORKERS:-1}"
if [ "$workers" -gt 1 ]; then
    PROMETHEUS_MULTIPROC_DIR="$(mktemp -d /tmp/metrics.XXXXXX)"
    export PROMETHEUS_MULTIPROC_DIR
fi
exec python -m uvicorn --factory service.app:create_app \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" --workers "$workers" \
    --loop uvloop --http service.http:HeaderTimeoutProtocol --no-access-log --proxy-headers \
    --timeout-graceful-shutdown 5 "$@"
