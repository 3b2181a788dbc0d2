"""The user's view under Slurm with the gateway service: `srun --container=IMAGE` of an
image in no store pulls it on first use through the service (into the site store, nothing
in the user's home), then runs it; the next user's srun finds it there."""
import pwd
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]


def test_first_use_under_srun_pulls_through_the_service(gateway_service, registry,
                                                        slurm_site, slurm_users):
    from hpcc.testkit.busybox import busybox_image
    from hpcc.testkit.slurmcluster import SlurmCluster

    t0 = time.time()
    svc = gateway_service(run=False)
    d = Path(tempfile.mkdtemp(prefix="slurm-gwsvc-", dir=slurm_site.root))
    line = f"required {slurm_site.plugin} python={sys.executable} config={svc.config}"
    cluster = SlurmCluster(d, nodes=1, plugstack_lines=[line])
    cluster.start()
    try:
        svc.start()
        registry.push("svc/firstuse", "1", busybox_image())
        ref = registry.ref("svc/firstuse", "1")
        homes = {}
        for user in ("slurmuser1", "slurmuser2"):
            home = pwd.getpwnam(user).pw_dir
            homes[user] = home
            p = cluster.run("srun", f"--container={ref}", "cat", "/etc/os-release",
                            user=user, env={"HOME": home}, timeout=180)
            assert p.returncode == 0, p.stderr
            assert "hpcc demo image" in p.stdout, p.stdout
        recs = [r for r in svc.audit() if r.get("op") == "pull"]
        assert [(r["user"], r["outcome"]) for r in recs] == [("slurmuser1", "pulled")], recs
        assert len(svc.images()) == 1
        for home in homes.values():   # (these homes keep other tests' images: new ones?)
            leftovers = [str(p) for p in Path(home).rglob("*")
                         if p.is_file() and p.stat().st_mtime >= t0
                         and ("/hpcc/images/" in str(p))]
            assert leftovers == [], leftovers
    finally:
        cluster.stop()
        svc.kill()
