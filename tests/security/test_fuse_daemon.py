"""Rule F (docs/launcher.md): an image root may not give to the kernel (rule K) is served by a
squashfuse_ll daemon that runs as the job user: root only opens /dev/fuse and mounts; the
daemon gets the fuse fd and the image fd, the user's uid, gid and groups, no capabilities,
no_new_privs. A user who rewrites their image during the job gets I/O errors in their job
and nothing else (issue 10, §2)."""
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from tests.fixtures.slurm import busybox_tree, publish_tree

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U2 = "slurmuser2"


@pytest.fixture
def user_image(slurm_users, slurm_site):
    u = slurm_users[U2]
    store = os.path.join(u.pw_dir, ".local", "share", "hpcc", "images")
    tree = busybox_tree(slurm_site.root / f"tree-fuse-{os.getpid()}",
                        files={"data/blob": os.urandom(4 << 20)})
    rec = publish_tree(store, tree, ["hpcctest/fusemine:1"])
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}",
                    os.path.join(u.pw_dir, ".local")], check=True)
    yield u, rec
    shutil.rmtree(os.path.join(u.pw_dir, ".local", "share", "hpcc"), ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)


def _daemon_of(image):
    """(pid, {field: value} of /proc/PID/status) of the squashfuse_ll serving `image`."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() != "squashfuse_ll":
                    continue
            if os.path.realpath(f"/proc/{d}/fd/4") != image:
                continue
            with open(f"/proc/{d}/status") as f:
                return int(d), dict(ln.split(":\t", 1) for ln in f.read().splitlines()
                                    if ":\t" in ln)
        except OSError:
            continue
    return None, None


def _in_background(cluster, *argv, user):
    out = {}
    t = threading.Thread(target=lambda: out.update(p=cluster.run(*argv, user=user,
                                                                 timeout=120)))
    t.start()
    return t, out


def _wait_daemon(image, t):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and t.is_alive():
        pid, status = _daemon_of(image)
        if pid:
            return pid, status
        time.sleep(0.05)
    return None, None


def test_fuse_daemon_runs_as_the_job_user_without_privileges(slurm_cluster, user_image):
    u, rec = user_image
    image = os.path.realpath(rec.sqfs_path)
    t, out = _in_background(slurm_cluster, "srun", "-n1", "--container=hpcctest/fusemine:1",
                            "sleep", "4", user=U2)
    pid, status = _wait_daemon(image, t)
    t.join()
    assert out["p"].returncode == 0, out["p"].stderr
    assert pid, "no squashfuse_ll served the user's image"
    assert status["Uid"].split() == [str(u.pw_uid)] * 4
    assert status["Gid"].split() == [str(u.pw_gid)] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"


def test_image_rewritten_during_the_job_gives_io_errors_in_the_job_only(slurm_cluster,
                                                                        user_image):
    u, rec = user_image
    image = os.path.realpath(rec.sqfs_path)
    sig = tempfile.mkdtemp(prefix="hpcc-fuse-sig-")
    os.chmod(sig, 0o755)
    os.chown(sig, u.pw_uid, u.pw_gid)
    t, out = _in_background(
        slurm_cluster, "srun", "-n1", "--container=hpcctest/fusemine:1",
        f"--container-mounts={sig}:/sig", "sh", "-c",
        "touch /sig/started; i=0; while [ ! -e /sig/go ] && [ $i -lt 600 ]; do sleep 0.1; "
        "i=$((i+1)); done; cat /data/blob > /dev/null; echo blob=$?", user=U2)
    try:
        pid, _ = _wait_daemon(image, t)
        assert pid, "no squashfuse_ll served the user's image"
        deadline = time.monotonic() + 60  # the command runs (its shell is loaded)
        while not os.path.exists(os.path.join(sig, "started")) and t.is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        # the user rewrites their own file in place (as themselves) while it is mounted
        size = os.path.getsize(image)
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=64k",
                        f"count={size // 65536 + 1}", "conv=notrunc"], user=U2, check=True,
                       capture_output=True)
    finally:
        open(os.path.join(sig, "go"), "w").close()
        t.join()
        shutil.rmtree(sig)
    p = out["p"]
    # reads fail with EIO, or the task dies of SIGBUS when a page of its own (mmap'd)
    # executable can no longer be read: an I/O error either way, never data from garbage
    assert "blob=0" not in p.stdout, (p.stdout, p.stderr)
    assert ("blob=1" in p.stdout and "Input/output error" in p.stderr) or \
        (p.returncode == 128 + 7 and "Bus error" in p.stderr), (p.returncode, p.stdout, p.stderr)
    # nothing else: the node still runs containers, the daemon went with the step
    deadline = time.monotonic() + 10
    while _daemon_of(image)[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _daemon_of(image)[0] is None
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "true", user=U2)
    assert p.returncode == 0, p.stderr


def test_setuid_file_of_the_users_own_id_gains_nothing_in_a_writable_container(
        slurm_cluster, slurm_users, slurm_site):
    """A writable container of a FUSE-served image exchanges 0 and the user's ids in the
    connection's user namespace: a file the user's image gives their own uid/gid, setuid
    and setgid, shows as root's. Executing it gives no privilege (nosuid, no_new_privs),
    in the user's and in a remap-root step; writing anywhere still works."""
    u = slurm_users[U2]
    d = tempfile.mkdtemp(prefix="hpcc-suid-", dir=slurm_site.root)
    try:
        tree = busybox_tree(os.path.join(d, "tree"))
        os.mkdir(os.path.join(tree, "suid"))
        box = os.path.join(tree, "suid", "id")  # busybox runs the applet its name says
        shutil.copy(os.path.join(tree, "bin", "busybox"), box)
        os.chown(box, u.pw_uid, u.pw_gid)
        os.chmod(box, 0o6755)
        image = os.path.join(d, "suid.sqfs")
        subprocess.run(["mksquashfs", tree, image, "-noappend", "-quiet", "-no-progress"],
                       check=True, capture_output=True)
        for p in (d, image):
            os.chown(p, u.pw_uid, u.pw_gid)
        os.chmod(d, 0o755)
        for remap, inside in (("--no-container-remap-root", str(u.pw_uid)),
                              ("--container-remap-root", "0")):
            p = slurm_cluster.run(
                "srun", "-n1", f"--container-image={image}", "--container-writable", remap,
                "sh", "-c", "stat -c '%u %a' /suid/id; id -u; /suid/id -u; id -g; "
                "/suid/id -g; touch /newfile && echo wrote", user=U2)
            assert p.returncode == 0, p.stderr
            mode, uid, suid_uid, gid, suid_gid, wrote = p.stdout.split("\n")[:6]
            # shown as root's in the user's step; as nobody's (not theirs) when remapped
            assert mode == ("0 6755" if inside != "0" else "65534 6755"), p.stdout
            assert uid == suid_uid == inside and gid == suid_gid, p.stdout
            assert wrote == "wrote"
    finally:
        shutil.rmtree(d, ignore_errors=True)
