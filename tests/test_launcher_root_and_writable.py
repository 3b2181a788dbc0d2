"""Writable containers the user may write anywhere in, `--root` (root inside, no privilege
outside), `--readonly`, `--unshare`, and their site defaults: hpcc run rootless, as root,
and as root for another user (--user, the Slurm helper's mode).

Real squashfs images, real user namespaces, kernel mounts (idmapped) and squashfuse_ll.
"""
import os
import shutil
import tempfile

import pytest

from tests.fixtures.launcher_images import make_image, run_hpcc

pytestmark = pytest.mark.root


def hpcc(launcher_env, who, *args, config=None, **kw):
    return run_hpcc(args, user=who, config=config or launcher_env["HPCC_CONFIG"], **kw)


@pytest.fixture(scope="module")
def apt_image():
    """A busybox image with /etc/apt/apt.conf.d (as Debian's) and a root-only /secret, in a
    directory chain only root may write (/run), so that root's launches kernel-mount it as
    a site image (an image under /tmp is served by squashfuse_ll)."""
    d = tempfile.mkdtemp(prefix="hpcc-apt-img-", dir="/run")
    os.chmod(d, 0o755)

    def tweak(tree):
        os.makedirs(os.path.join(tree, "etc", "apt", "apt.conf.d"))
        os.makedirs(os.path.join(tree, "usr", "local", "bin"))
        with open(os.path.join(tree, "secret"), "w") as f:
            f.write("root only\n")
        os.chmod(os.path.join(tree, "secret"), 0o600)

    yield make_image(d, "apt", tweak)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def site_config(launcher_env):
    """site_config(extra_toml) -> the path of a config the test user can read."""
    d = tempfile.mkdtemp(prefix="hpcc-site-cfg-")
    os.chmod(d, 0o755)

    def make(extra):
        cfg = os.path.join(d, "hpcc.toml")
        with open(cfg, "w") as f:
            f.write(f'[launcher]\nhooks_dir = "{launcher_env["hooks_dir"]}"\nbinds = []\n'
                    + extra)
        os.chmod(cfg, 0o644)
        return cfg

    yield make
    shutil.rmtree(d, ignore_errors=True)


WRITE_ANYWHERE = ("touch /newfile && mkdir -p /usr/local/bin/sub && echo x > /bin/newtool "
                  "&& echo changed >> /etc/passwd && rm /bin/vi && echo ok")


def test_writable_container_lets_the_user_write_anywhere(apt_image, launcher_env, who):
    p = hpcc(launcher_env, who, "run", "--writable", apt_image, "--", "sh", "-c",
             WRITE_ANYWHERE)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ok\n"


def test_writable_container_of_another_user_run_by_root(apt_image, launcher_env, test_user):
    """Root building a container for a user (the Slurm helper's mode): the image's files are
    the user's through an idmapped mount, so the user writes anywhere; nothing else is
    theirs (a root-only file of the image stays unreadable to others in a read-only one)."""
    u = test_user
    p = hpcc(launcher_env, None, "run", "--user", u.pw_name, "--writable", apt_image, "--",
             "sh", "-c", WRITE_ANYWHERE + "; id -u; stat -c %u /bin/busybox /")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"ok\n{u.pw_uid}\n{u.pw_uid}\n{u.pw_uid}\n"
    p = hpcc(launcher_env, None, "run", "--user", u.pw_name, apt_image, "--", "sh", "-c",
             "stat -c %u /bin/busybox; touch /newfile")
    assert p.stdout == "0\n"
    assert p.returncode != 0 and "Read-only file system" in p.stderr


@pytest.fixture
def users_own_image(apt_image, test_user):
    """apt_image copied into a directory of the test user's: root may not give it to the
    kernel, so squashfuse_ll (as the user) serves it."""
    d = tempfile.mkdtemp(prefix="hpcc-own-img-", dir="/var/tmp")
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    path = os.path.join(d, "own.sqfs")
    shutil.copy(apt_image, path)
    os.chown(path, test_user.pw_uid, test_user.pw_gid)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def test_writable_container_of_a_users_own_image_run_by_root(users_own_image, launcher_env,
                                                            test_user):
    """The same for an image root serves with squashfuse_ll (the user's own file): the FUSE
    connection belongs to a user namespace mapping the image's 0 to the user, so its files
    are the user's; the image's other owners stay as they are."""
    u = test_user
    p = hpcc(launcher_env, None, "-v", "run", "--user", u.pw_name, "--writable",
             users_own_image, "--", "sh", "-c",
             WRITE_ANYWHERE + "; id -u; stat -c %u /bin/busybox / /newfile")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"ok\n{u.pw_uid}\n" + f"{u.pw_uid}\n" * 3
    assert "image served for the user" in p.stderr
    assert "squashfuse_ll" in p.stderr  # not the kernel: the file is the user's
    # read-only, the files stay root's and root-only ones unreadable
    p = hpcc(launcher_env, None, "run", "--user", u.pw_name, users_own_image, "--", "sh",
             "-c", "stat -c %u /bin/busybox; cat /secret")
    assert p.stdout == "0\n" and p.returncode != 0 and "Permission denied" in p.stderr


def test_readonly_is_the_default_and_refuses_writes(apt_image, launcher_env, who):
    p = hpcc(launcher_env, who, "run", "--readonly", apt_image, "--", "touch", "/newfile")
    assert p.returncode == 1 and "Read-only file system" in p.stderr
    p = hpcc(launcher_env, who, "run", apt_image, "--", "touch", "/newfile")
    assert p.returncode == 1 and "Read-only file system" in p.stderr


def test_site_default_writable_and_readonly_override(apt_image, launcher_env, who,
                                                     site_config):
    cfg = site_config("writable = true\n")
    p = hpcc(launcher_env, who, "run", apt_image, "--", "touch", "/newfile", config=cfg)
    assert p.returncode == 0, p.stderr
    p = hpcc(launcher_env, who, "run", "--readonly", apt_image, "--", "touch", "/newfile",
             config=cfg)
    assert p.returncode == 1 and "Read-only file system" in p.stderr


@pytest.mark.parametrize("args", [["--writable", "--readonly"], ["--root", "--no-root"],
                                  ["--home", "--no-home"], ["--unshare", "pid"],
                                  ["--unshare", ""], ["--name", "bad/name"],
                                  ["--name", "x:sometimes"]])
def test_contradicting_or_bad_options_are_one_line_usage_errors(images, launcher_env, args):
    p = hpcc(launcher_env, None, "run", *args, images["base"], "true")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_root_inside_maps_to_the_user_outside(apt_image, launcher_env, who, test_user,
                                              shared_dir):
    """--root: uid 0 with capabilities inside, its files the user's outside; nothing beyond
    the user's own rights: it cannot mount, change the hostname or write /proc/sys."""
    outside = test_user.pw_uid if who else 0
    args = ["run", "--root", "--writable"]
    if who is None:
        args += ["--user", test_user.pw_name]
        outside = test_user.pw_uid
    script = ("id -u; id -g; stat -c %u /bin/busybox; touch /newfile && chown 0:0 /newfile "
              "&& echo wrote; touch made-inside; cat /etc/apt/apt.conf.d/00hpcc-remap-root; "
              "mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; "
              "hostname evil 2>/dev/null && echo RENAMED; "
              "(echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo PROCSYS; "
              "grep CapEff /proc/self/status")
    p = hpcc(launcher_env, who, *args, apt_image, "--", "sh", "-c", script, cwd=shared_dir)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[:4] == ["0", "0", "0", "wrote"]
    assert lines[4] == 'APT::Sandbox::User "root";'
    assert "MOUNTED" not in p.stdout and "RENAMED" not in p.stdout
    assert "PROCSYS" not in p.stdout
    assert lines[-1].split()[1] != "0000000000000000"  # root's capabilities, in its namespace
    st = os.stat(os.path.join(shared_dir, "made-inside"))
    assert st.st_uid == outside  # on the host, the file is the user's, not root's


def test_site_default_remap_root_and_no_root(images, launcher_env, test_user, site_config):
    cfg = site_config("remap_root = true\n")
    u = test_user.pw_name
    p = hpcc(launcher_env, u, "run", images["base"], "--", "id", "-u", config=cfg)
    assert (p.returncode, p.stdout) == (0, "0\n"), p.stderr
    p = hpcc(launcher_env, u, "run", "--no-root", images["base"], "--", "id", "-u",
             config=cfg)
    assert (p.returncode, p.stdout) == (0, f"{test_user.pw_uid}\n"), p.stderr
    p = hpcc(launcher_env, None, "run", "--user", u, images["base"], "--", "sh", "-c",
             "id -u; cat /proc/self/uid_map", config=cfg)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "0", str(test_user.pw_uid), "1"]


def test_unshare_gives_the_container_its_own_namespaces(images, launcher_env, who):
    host = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("net", "ipc", "uts")}
    p = hpcc(launcher_env, who, "run", "--unshare", "net,ipc,uts", images["base"], "--",
             "sh", "-c", "for n in net ipc uts; do readlink /proc/self/ns/$n; done; "
             "cat /proc/net/dev; ip link show lo | grep -q ',UP' && echo lo-up; "
             "grep -E ' /dev/(mqueue|shm) ' /proc/self/mounts | cut -d' ' -f1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] != host["net"] and lines[1] != host["ipc"] and lines[2] != host["uts"]
    ifaces = [ln.split(":")[0].strip() for ln in lines[5:] if ":" in ln]
    assert ifaces == ["lo"]
    assert "lo-up" in lines  # the new network namespace's loopback works
    assert "mqueue" in lines and "shm" in lines  # the IPC namespace's own, not the host's
    p = hpcc(launcher_env, who, "run", "--unshare", "ipc", images["base"], "--", "sh", "-c",
             "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc")
    assert p.returncode == 0, p.stderr
    net, ipc = p.stdout.split()
    assert net == host["net"] and ipc != host["ipc"]
