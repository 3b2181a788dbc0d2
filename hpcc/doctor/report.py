"""Run every check (a bug in one is reported as that check failing) and render the
report for a terminal."""
import os
import shutil
import tempfile

from ..errors import HpccError
from .check import Check
from .host import (
    check_fuse,
    check_kernel_squashfs,
    check_loop,
    check_mount_helper,
    check_overlay,
    check_squashfuse,
    check_syscalls,
    check_userns,
)
from .mpigpu import check_gpu, check_image, check_mpi
from .probes import _fork_probe, _kernel_probe, _probe_image, _unprivileged_probe
from .slurmconf import check_slurm, slurm_facts
from .stores import check_service, check_stores


def run_checks(config, image=None):
    work = tempfile.mkdtemp(prefix="hpcc-doctor-")
    try:
        os.chmod(work, 0o755)
        probe_img = os.path.join(work, "probe.sqfs")
        try:
            _probe_image(probe_img)
        except HpccError:
            probe_img = None
        mnt = os.path.join(work, "mnt")
        os.mkdir(mnt, 0o755)
        probe = _fork_probe(_unprivileged_probe, mnt, probe_img)
        kprobe = None
        if os.geteuid() == 0 and probe_img:
            kprobe = _fork_probe(_kernel_probe, mnt, probe_img)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        slurm = slurm_facts()
    except Exception:  # noqa: BLE001 - reported by check_slurm's guard below
        slurm = {"srun": None, "slurm_conf": None, "lines": []}
    checks = []
    for cid, fn, args in (("host.userns", check_userns, (probe, slurm)),
                          ("host.fuse", check_fuse, (probe,)),
                          ("host.squashfuse", check_squashfuse, (probe,)),
                          ("host.kernel_squashfs", check_kernel_squashfs, (kprobe,)),
                          ("host.overlay", check_overlay, (probe,)),
                          ("host.loop", check_loop, (kprobe,)),
                          ("host.syscalls", check_syscalls, (probe,)),
                          ("host.mount_helper", check_mount_helper, (config,)),
                          ("store.site", check_stores, (config,)),
                          ("gateway.service", check_service, (config,)),
                          ("slurm.plugin", check_slurm, (slurm,)),
                          ("mpi.host", check_mpi, (config,)),
                          ("gpu.driver", check_gpu, (config,))):
        checks += _guarded(cid, fn, *args)
    if image:
        by_id = {c.id: c for c in checks}
        checks += _guarded("image.mount", check_image, image, config, by_id["mpi.host"],
                           by_id["gpu.driver"])
    return checks


def _guarded(cid, fn, *args):
    """fn's checks; a bug in one check is reported as that check failing, not a traceback
    that hides the others."""
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001
        return [Check(cid, cid, "fail", f"internal error in this check: {type(e).__name__}: "
                      f"{e}", "report it to hpcc's developers with the output of "
                      "`hpcc doctor --json`")]
    return out if isinstance(out, list) else [out]


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "off": "off ", "skip": "skip"}


def render(checks, out):
    for c in checks:
        out.write(f"[{_MARK[c.status]}] {c.title}: {c.summary}\n")
        if c.fix and c.status in ("fail", "warn"):
            out.write(f"       fix: {c.fix}\n")
    bad = [c for c in checks if c.status == "fail"]
    out.write("all checks passed\n" if not bad else
              f"{len(bad)} problem(s): " + ", ".join(c.id for c in bad) + "\n")
