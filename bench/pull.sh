#!/usr/bin/env bash
# Pull benchmark: gateway pull vs skopeo+umoci+mksquashfs vs Charliecloud vs tar2sqfs floor.
# Run as root after `make install bench-deps` (make bench does both). See bench/pull.py.
set -euo pipefail
VENV=${VENV:-/opt/hpcc/venv}
cd "$(dirname "$0")"
exec "$VENV/bin/python" -P pull.py "$@"
