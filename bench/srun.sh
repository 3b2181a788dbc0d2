#!/usr/bin/env bash
# Slurm benchmark on an embedded 2-node cluster (each slurmd in its own mount+UTS namespace):
#   1. srun -N2 -n8 --container=IMG true  vs  srun -N2 -n8 true   (target <= 1.25x)
#   2. MPI ping-pong under srun --mpi=pmi2 -N2 -n2: container (--container-mpi, host MPICH
#      injected) vs native                                         (target >= 0.98x)
#   3. in one allocation: a step in an existing named container (--container-name) vs a
#      plain step                                                  (target <= 1.1x)
#   4. the first-use pull of an image from srun vs gateway pull of it (target <= 1.1x)
# Options: --reps N, --mpi-reps N, --named-reps N, --pull-reps N, --named-only.
# Run as root after `make install` (make bench does it). See bench/srun.py.
set -euo pipefail
VENV=${VENV:-/opt/hpcc/venv}
cd "$(dirname "$0")"
exec "$VENV/bin/python" -P srun.py "$@"
