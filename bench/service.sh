#!/usr/bin/env bash
# Gateway service benchmark: N concurrent requests vs one gateway pull; a present image's
# request time. Run as root after `make install`. See bench/service.py.
set -euo pipefail
VENV=${VENV:-/opt/hpcc/venv}
cd "$(dirname "$0")"
exec "$VENV/bin/python" -P service.py "$@"
