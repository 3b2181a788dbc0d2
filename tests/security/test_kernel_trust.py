"""Rule K (docs/launcher.md): root has the kernel's squashfs driver parse only image files that
nobody but root can change: a root-owned file, not group/other-writable, reached through
directories that are all root-owned and not group/other-writable, checked by walking that
chain by file descriptor (never through /proc/self/fd/N, which is root-owned and always
passed). Anything else is served by squashfuse_ll as the job user.

The attack (issue 10, §3): a root-owned .sqfs in a directory the user owns (so the user can
swap it by rename after the check) was loop-mounted because the check looked at the
directory of /proc/self/fd/N."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hpcc.runtime.imagemount import trusted_for_kernel
from tests.fixtures.slurm import busybox_tree, publish_tree

pytestmark = [pytest.mark.root]

U2 = "slurmuser2"


@pytest.fixture
def chain():
    """base/site (root, 0755) and base/user (owned by nobody), each with a root-owned
    image-like file, in a directory of /run (root-owned, 0755: unlike /tmp, trust can hold)."""
    base = tempfile.mkdtemp(prefix="hpcc-trust-", dir="/run")
    os.chmod(base, 0o755)
    site, user = Path(base) / "site", Path(base) / "user"
    site.mkdir(mode=0o755)
    user.mkdir(mode=0o755)
    os.chown(user, 65534, 65534)
    for d in (site, user):
        (d / "img.sqfs").write_bytes(b"hsqs" + bytes(100))
        os.chmod(d / "img.sqfs", 0o644)
    yield site, user
    shutil.rmtree(base)


def _trusted(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return trusted_for_kernel(fd)
    finally:
        os.close(fd)


def _chain_is_root_only(path):
    d = os.path.dirname(path)
    while True:
        st = os.stat(d)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def test_root_owned_image_in_a_users_directory_is_not_trusted(chain):
    site, user = chain
    assert not _trusted(user / "img.sqfs")
    # the bypass: the same file opened through /proc/self/fd/N (what the Slurm helper passes)
    fd = os.open(user / "img.sqfs", os.O_RDONLY)
    try:
        assert not _trusted(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_site_image_in_root_only_directories_is_trusted(chain):
    site, _ = chain
    if not _chain_is_root_only(str(site / "img.sqfs")):
        pytest.skip("/run lies below a directory others may write")
    assert _trusted(site / "img.sqfs")
    fd = os.open(site / "img.sqfs", os.O_RDONLY)
    try:
        assert _trusted(f"/proc/self/fd/{fd}")  # the same file, however it was opened
    finally:
        os.close(fd)


def test_a_file_swapped_after_open_is_not_trusted(chain):
    """The name the kernel reports is a hint: the walk must end on the very same inode."""
    site, _ = chain
    if not _chain_is_root_only(str(site / "img.sqfs")):
        pytest.skip("/run lies below a directory others may write")
    fd = os.open(site / "img.sqfs", os.O_RDONLY)
    try:
        os.rename(site / "img.sqfs", site / "old.sqfs")
        (site / "img.sqfs").write_bytes(b"hsqs")
        # /proc/self/fd now names old.sqfs: still the same file, still trusted
        assert trusted_for_kernel(fd)
        os.chmod(site / "old.sqfs", 0o666)
        assert not trusted_for_kernel(fd)  # writable by others
    finally:
        os.close(fd)


def _loop_backing_files():
    out = []
    for d in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{d}/loop/backing_file") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return out


@pytest.mark.slurm
def test_root_owned_image_in_a_users_store_is_never_loop_mounted(slurm_cluster, slurm_users,
                                                                  slurm_site):
    """Rule K under srun as an unprivileged user: the image is a root-owned file in the
    user's own store; the step runs from squashfuse_ll and no loop device is backed by it."""
    u = slurm_users[U2]
    store = os.path.join(u.pw_dir, ".local", "share", "hpcc", "images")
    tree = busybox_tree(slurm_site.root / "tree-rootowned",
                        os_release='NAME="root-owned file in a user store"\n')
    rec = publish_tree(store, tree, ["hpcctest/rootowned:1"])
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}",
                    os.path.join(u.pw_dir, ".local")], check=True)
    os.chown(rec.sqfs_path, 0, 0)
    os.chmod(rec.sqfs_path, 0o644)
    try:
        p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/rootowned:1", "sh", "-c",
                              "grep ^NAME= /etc/os-release; "
                              "cat /sys/block/loop*/loop/backing_file 2>/dev/null; "
                              "for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done",
                              user=U2)
        assert p.returncode == 0, p.stderr
        assert 'NAME="root-owned file in a user store"' in p.stdout
        real = os.path.realpath(rec.sqfs_path)
        assert real not in p.stdout and real not in _loop_backing_files()
    finally:
        shutil.rmtree(os.path.join(u.pw_dir, ".local", "share", "hpcc"), ignore_errors=True)
