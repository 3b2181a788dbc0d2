"""Rule B (docs/launcher.md): a user's bind source is opened with the user's rights, and under
Slurm (root assembles the container) it is mounted read-only unless the user may write the
source on the host: a bind never gives anyone more than the user has there."""
import os
import shutil

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"
IMG = "hpcctest/busybox:1"


@pytest.fixture
def dirs(slurm_site, slurm_users):
    base = slurm_site.root / f"binds-{os.getpid()}"
    (base / "rootdir").mkdir(parents=True)
    (base / "userdir").mkdir()
    os.chmod(base, 0o755)
    u = slurm_users[U1]
    os.chown(base / "userdir", u.pw_uid, u.pw_gid)
    yield base
    shutil.rmtree(base)


def _mount_opts(out, dest):
    for line in out.splitlines():
        f = line.split()
        if len(f) > 5 and f[4] == dest:
            return f[5].split(",")
    return None


def test_bind_of_a_source_the_user_cannot_write_is_read_only(slurm_cluster, dirs):
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}",
                          f"--container-mounts={dirs}/rootdir:/r,{dirs}/userdir:/u",
                          "cat", "/proc/self/mountinfo", user=U1)
    assert p.returncode == 0, p.stderr
    assert "ro" in _mount_opts(p.stdout, "/r"), p.stdout
    assert "rw" in _mount_opts(p.stdout, "/u"), p.stdout
