#!/bin/bash
# hpcc's squashfs writer vs tar2sqfs: same tar (a slice of /usr), same compressor settings.
# Prints both timings and image sizes and the ratio ours/tar2sqfs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$(dirname "$(readlink -f "$(command -v hpcc)")")/python}
cd /    # import the installed package, not a checkout
exec "$py" "$here/squashfs_writer.py" --compressor zstd --level 6 "$@"
