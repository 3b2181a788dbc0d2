"""`hpcc doctor`: check that this host can run hpcc's containers, and say how to fix what
cannot.

Each check does the real thing where it can (a user namespace, a FUSE mount of a small
squashfs image with squashfuse_ll, an overlay inside the namespace, a kernel loop mount when
run as root, `srun --help` with the plugin, the MPI and GPU hooks' own planning on an image)
and otherwise reads the setting that decides it. Probes that change namespaces or mount run
in a forked child, which takes its mounts with it when it exits; as root, the unprivileged
probes run as `nobody`, because that is who they are about.

JSON (`--json`, schema "hpcc-doctor/1", documented in docs/doctor.md):
    {"schema": "hpcc-doctor/1", "ok": bool, "user": {"uid": N, "name": S},
     "checks": [{"id": S, "title": S, "status": "ok"|"warn"|"fail"|"off"|"skip",
                 "summary": S, "fix": S|null, "details": {...}}, ...]}
Exit status: 0 when no check failed, 1 when one did, 2 for a bad command line.
"""
from .check import SCHEMA, STATUSES, Check
from .cli import USAGE, main
from .report import render, run_checks
from .slurmconf import slurm_facts

__all__ = ["SCHEMA", "STATUSES", "USAGE", "Check", "main", "render", "run_checks",
           "slurm_facts"]
