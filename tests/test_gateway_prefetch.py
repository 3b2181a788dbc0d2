"""`gateway prefetch` on a real Slurm cluster: images named by pending jobs are pulled
before the jobs start."""
import json
import os
import subprocess
import tempfile
import time

import pytest

from hpcc.testkit.busybox import busybox_image
from tests.conftest import tool

pytestmark = [pytest.mark.slurm, pytest.mark.root]


def _wait_gone(cluster, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T")
        if p.returncode == 0 and not p.stdout.strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still in the queue after {timeout}s")


def test_prefetch_pulls_the_image_of_a_held_job_which_then_runs_in_it(
        registry, slurm_cluster, slurm_site, slurm_users):
    registry.push("prefetch/busybox", "1", busybox_image())
    ref = registry.ref("prefetch/busybox", "1")
    outdir = tempfile.mkdtemp(prefix="hpcc-prefetch-", dir="/tmp")
    os.chmod(outdir, 0o777)
    out = os.path.join(outdir, "job.out")
    gw_env = dict(slurm_cluster.env, HPCC_CONFIG=str(slurm_site.config))

    def gateway(*args):
        return subprocess.run([tool("gateway"), *args], env=gw_env, capture_output=True,
                              text=True, timeout=300)

    assert gateway("inspect", ref).returncode == 1           # not in the store yet
    p = slurm_cluster.run("sbatch", "--hold", "--parsable", f"--container={ref}",
                          f"--output={out}", "--wrap", "cat /etc/os-release /app/README",
                          user="slurmuser1")
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    try:
        dry = json.loads(gateway("prefetch", "--dry-run", "--json").stdout)
        assert {"image": ref, "status": "would pull"} in dry
        p = gateway("prefetch", "--json")
        assert p.returncode == 0, p.stderr
        done = [r for r in json.loads(p.stdout) if r["image"] == ref]
        assert done[0]["status"] == "pulled"
        assert gateway("inspect", ref).returncode == 0
        again = [r for r in json.loads(gateway("prefetch", "--json").stdout) if r["image"] == ref]
        assert again[0]["status"] == "present"
        assert slurm_cluster.run("scontrol", "release", job_id).returncode == 0
        _wait_gone(slurm_cluster, job_id)
        text = open(out).read()
        assert "hpcc demo image (busybox)" in text and "hpcc demo image" in text, text
    finally:
        slurm_cluster.run("scancel", job_id)
        subprocess.run(["rm", "-rf", outdir])
