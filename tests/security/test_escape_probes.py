"""Escape probes, in both modes: rootless `hpcc run` as an unprivileged user (squashfuse_ll,
and a site image's kernel mount from the setuid mount helper), and `srun` on the test cluster
as an unprivileged user (site image: kernel squashfs; the user's own image: squashfuse_ll as
the user). A static C program (probe.c) attempts each escape from inside the
container; every attempt must be refused by the kernel. Rules (docs/launcher.md, "Security
rules"):

- P (the process): the command runs with the user's uid, gid and groups, every capability
  set empty, no_new_privs, on nosuid/nodev mounts, with a read-only root: no chroot, setuid,
  setgroups, mknod, mount, remount or unmount of /, no signal to host root processes, no
  /proc/kcore, /dev/mem, sysrq-trigger, core_pattern or /sys/kernel writes, and a setuid-root
  program in the image runs with the user's euid.
- I (the image): nothing written in the container reaches the image file.
- B (binds): a host directory the user cannot write stays unwritable through a bind.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest

from hpcc.testkit.busybox import busybox_tree, squash
from tests.fixtures.launcher_images import run_hpcc
from tests.fixtures.slurm import publish_tree

pytestmark = [pytest.mark.root]

HERE = os.path.dirname(os.path.abspath(__file__))
U1 = "slurmuser1"
RULES = {  # probe -> the rule it checks
    "chroot": "P", "setuid0": "P", "setgroups": "P", "mknod_mem": "P", "mount_tmpfs": "P",
    "remount_root_rw": "P", "umount_root": "P", "signal_root": "P", "proc_kcore": "P",
    "dev_mem": "P", "sysrq_trigger": "P", "core_pattern": "P", "sys_uevent_helper": "P",
    "image_write": "I", "image_create": "I", "hostdir_create": "B", "hostdir_write": "B",
}


@pytest.fixture(scope="module")
def probe_tree(tmp_path_factory):
    """A busybox root with /bin/probe and a setuid-root copy /bin/probe-suid."""
    work = tmp_path_factory.mktemp("probe")
    exe = work / "probe"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(exe),
                    os.path.join(HERE, "probe.c")], check=True, capture_output=True)
    tree = busybox_tree(work / "root")
    for name, mode in (("probe", 0o755), ("probe-suid", 0o4755)):
        shutil.copy(exe, tree / "bin" / name)
        os.chmod(tree / "bin" / name, mode)
    os.mkdir(tree / "hostdir")
    return tree


@pytest.fixture
def hostdir():
    """A root-owned directory (0755) with a file: the user may read, not write."""
    d = tempfile.mkdtemp(prefix="hpcc-probe-host-")
    os.chmod(d, 0o755)
    with open(os.path.join(d, "file"), "w") as f:
        f.write("host\n")
    yield d
    shutil.rmtree(d)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check(stdout, stderr, euid_out, uid):
    results = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        if name in RULES:
            results[name] = rest
    assert set(results) == set(RULES), (stdout, stderr)
    unsafe = {f"{n} (rule {RULES[n]})": r for n, r in results.items() if not r.startswith("SAFE")}
    assert not unsafe, unsafe
    assert euid_out.strip() == str(uid), f"rule P: setuid-root program ran with euid {euid_out}"


def _listing(d):
    return sorted((n, os.lstat(os.path.join(d, n)).st_size) for n in os.listdir(d))


def test_probes_rootless_hpcc_run(probe_tree, hostdir, test_user, launcher_env):
    out = tempfile.mkdtemp(prefix="hpcc-probe-img-")
    try:
        os.chmod(out, 0o755)
        img = str(squash(probe_tree, os.path.join(out, "probe.sqfs")))
        before, files = _digest(img), _listing(hostdir)
        cfg = launcher_env["HPCC_CONFIG"]
        common = ["--no-home", "--no-cwd", "--mount", f"{hostdir}:/hostdir"]
        p = run_hpcc(["exec", *common, img, "/bin/probe"], user=test_user.pw_name,
                     config=cfg)
        assert p.returncode == 0, p.stderr
        e = run_hpcc(["exec", *common, img, "/bin/probe-suid", "euid"],
                     user=test_user.pw_name, config=cfg)
        _check(p.stdout, p.stderr, e.stdout, test_user.pw_uid)
        assert _digest(img) == before, "rule I: the image file changed"
        assert _listing(hostdir) == files, "rule B: the bound host directory changed"
    finally:
        shutil.rmtree(out)


def test_probes_rootless_hpcc_run_kernel_mount_from_the_helper(probe_tree, hostdir, test_user,
                                                               mount_helper_site):
    """The same probes on the other unprivileged mount kind: a site image the mount helper
    kernel-mounts (read-only, nosuid, nodev, flags locked, owners id-mapped)."""
    out = tempfile.mkdtemp(prefix="hpcc-probe-img-")
    try:
        img = str(mount_helper_site.publish(squash(probe_tree, os.path.join(out, "p.sqfs")),
                                            "probe.sqfs"))
    finally:
        shutil.rmtree(out)
    before, files = _digest(img), _listing(hostdir)
    cfg = str(mount_helper_site.config)
    common = ["--no-home", "--no-cwd", "--mount", f"{hostdir}:/hostdir"]
    p = run_hpcc(["-v", "exec", *common, img, "/bin/probe"], user=test_user.pw_name, config=cfg)
    assert p.returncode == 0, p.stderr
    if "cannot id-map" in p.stderr:
        pytest.skip("this kernel cannot id-map a squashfs mount: the helper refuses")
    assert "image mounted (kernel, from the mount helper)" in p.stderr, p.stderr
    e = run_hpcc(["exec", *common, img, "/bin/probe-suid", "euid"], user=test_user.pw_name,
                 config=cfg)
    _check(p.stdout, "\n".join(ln for ln in p.stderr.splitlines() if "hpcc: [" not in ln),
           e.stdout, test_user.pw_uid)
    assert _digest(img) == before, "rule I: the image file changed"
    assert _listing(hostdir) == files, "rule B: the bound host directory changed"


@pytest.mark.slurm
@pytest.mark.parametrize("where", ["site", "user"], ids=["site-image-kernel", "user-image-fuse"])
def test_probes_srun(probe_tree, hostdir, slurm_cluster, slurm_site, slurm_users, where):
    u = slurm_users[U1]
    if where == "site":
        store = slurm_site.store
    else:
        store = os.path.join(u.pw_dir, ".local", "share", "hpcc", "images")
    rec = publish_tree(store, probe_tree, [f"hpcctest/probe-{where}:1"])
    if where == "user":
        subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}",
                        os.path.join(u.pw_dir, ".local")], check=True)
    try:
        before, files = _digest(rec.sqfs_path), _listing(hostdir)
        args = ["srun", "-n1", f"--container=hpcctest/probe-{where}:1",
                f"--container-mounts={hostdir}:/hostdir"]
        p = slurm_cluster.run(*args, "/bin/probe", user=U1)
        assert p.returncode == 0, p.stderr
        e = slurm_cluster.run(*args, "/bin/probe-suid", "euid", user=U1)
        _check(p.stdout, p.stderr, e.stdout, u.pw_uid)
        assert _digest(rec.sqfs_path) == before, "rule I: the image file changed"
        assert _listing(hostdir) == files, "rule B: the bound host directory changed"
    finally:
        if where == "user":
            shutil.rmtree(os.path.join(u.pw_dir, ".local", "share", "hpcc"),
                          ignore_errors=True)
