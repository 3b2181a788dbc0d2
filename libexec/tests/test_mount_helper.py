"""hpcc-mount, the setuid mount helper, as a real setuid-root program run by a real
unprivileged user: what it mounts, what it refuses (hostile arguments, every trust
violation), and how it fails (fd exhaustion, a non-squashfs file, no free loop device),
each time leaving no loop device or mount behind.

Each test builds nothing: one module fixture compiles the helper once with its site config
path pointing at a throw-away site (a root-owned directory under /var/lib, since the helper
refuses any store below a directory others can write, such as /tmp)."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fixtures.mount_helper import loops_of, no_loops_left
from tests.fixtures.users import ensure_user

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="setuid root and useradd need root")]

LIBEXEC = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "attach_probe.py"
REFUSED, USAGE, FAILED = 1, 2, 4


@pytest.fixture(scope="module")
def test_user():
    return ensure_user()


class Site:
    def __init__(self, base):
        self.base = base
        self.etc = base / "etc"
        self.config = self.etc / "hpcc.toml"
        self.above = base / "site"  # a directory above the store root (root's only)
        self.store = self.above / "store"
        self.helper = base / "bin" / "hpcc-mount"
        self.probe = base / "bin" / "attach_probe.py"  # a copy the test user can read
        self.image = self.store / "sub" / "good.sqfs"


def _squash(src, dest):
    subprocess.run(["mksquashfs", str(src), str(dest), "-quiet", "-noappend", "-comp", "zstd",
                    "-no-progress"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def site(test_user):
    if not shutil.which("mksquashfs"):
        pytest.skip("mksquashfs missing (squashfs-tools)")
    base = Path(tempfile.mkdtemp(prefix="hpcc-mount-test-", dir="/var/lib"))
    os.chmod(base, 0o755)
    s = Site(base)
    for d in (s.etc, s.above, s.store / "sub", base / "bin", base / "outside"):
        d.mkdir(parents=True)
        d.chmod(0o755)
    s.config.write_text(f'# test site\n[gateway]\npath = "/nowhere"\n\n[store]\n'
                        f'user_path = "x"\npath = "{s.store}"  # the site store\n')
    build = subprocess.run(["make", "-s", "-C", str(LIBEXEC), f"OUT={s.helper}",
                            f"CONFIG={s.config}", "CFLAGS=-O2 -Wall -Wextra -Werror"],
                           capture_output=True, text=True)
    assert build.returncode == 0 and not build.stderr.strip(), build.stderr
    os.chown(s.helper, 0, 0)
    os.chmod(s.helper, 0o4755)
    shutil.copy(PROBE, s.probe)      # the checkout may be below root's 0700 home
    os.chmod(s.probe, 0o644)
    src = base / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the image\n")
    (src / "suid").write_bytes(b"#!/bin/sh\nid -u\n")
    os.chmod(src / "suid", 0o4755)
    os.mknod(src / "devnull", 0o20666, os.makedev(1, 3))
    _squash(src, s.image)
    yield s
    _detach_loops(base)
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def mounts(site, test_user):
    """Skip a test that needs a mount where the kernel cannot give one (the helper id-maps
    the squashfs mount: a kernel whose squashfs lacks id-mapped mounts refuses that)."""
    status, err, fd = call(site, test_user)
    if fd is not None:
        os.close(fd)
    if status == FAILED and "cannot id-map" in err:
        pytest.skip(err.strip())
    assert status == 0, err


def _detach_loops(base):
    for dev in loops_of(base):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def call(site, user, path=None, *, args=None, stdin="image", stdout="socket", stderr=True,
         env=None, preexec=None, wrapper=(), helper=None):
    """Run the helper as `user` (pwd entry; None: as root, for a `wrapper` that drops to the
    user itself); return (exit status, stderr, received mount fd
    or None). stdin: "image" (PATH opened read-only), a path to open, or an int fd."""
    path = str(site.image if path is None else path)
    argv = [*wrapper, str(helper or site.helper), *(args if args is not None else [path])]
    ours, theirs = socket.socketpair()
    fds = []
    try:
        if stdin == "image":
            stdin = path
        if isinstance(stdin, (str, Path)):
            stdin = os.open(stdin, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(stdin)
        out = theirs.fileno() if stdout == "socket" else stdout
        who = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid,
                                       "extra_groups": []}
        p = subprocess.run(argv, stdin=stdin, stdout=out,
                           stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
                           env=env if env is not None else {}, preexec_fn=preexec,
                           timeout=60, **who)
        theirs.close()
        ours.settimeout(5)
        try:
            _, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        except OSError:
            anc = []
        got = [int.from_bytes(d[:4], sys.byteorder) for _, t, d in anc
               if t == socket.SCM_RIGHTS]
        return p.returncode, (p.stderr or b"").decode(), (got[0] if got else None)
    finally:
        ours.close()
        theirs.close()
        for fd in fds:
            os.close(fd)


def refused(site, user, path=None, code=REFUSED, **kw):
    """Assert one clear line, the status, no fd, and no loop device left; return the line."""
    status, err, fd = call(site, user, path, **kw)
    if fd is not None:
        os.close(fd)
    assert status == code, (status, err)
    assert fd is None
    assert err.startswith("hpcc-mount: ") and err.count("\n") == 1, err
    assert no_loops_left(site.base)
    return err


@contextmanager
def changed(path, *, mode=None, uid=None):
    st = os.lstat(path)
    try:
        if uid is not None:
            os.lchown(path, uid, -1)
        if mode is not None:
            os.chmod(path, mode)
        yield
    finally:
        os.lchown(path, st.st_uid, st.st_gid)
        if not os.path.islink(path):
            os.chmod(path, st.st_mode & 0o7777)


@contextmanager
def config_text(site, text):
    old = site.config.read_text()
    site.config.write_text(text)
    try:
        yield
    finally:
        site.config.write_text(old)


def probe(site, user, path=None):
    p = subprocess.run([sys.executable, str(site.probe), str(site.helper),
                        str(path or site.image)],
                       user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                       capture_output=True, text=True, timeout=60, env={})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# --- it works, and what the caller gets -------------------------------------------------

def test_builds_warning_free_under_wall_wextra(site):
    # the fixture built it with -Werror and asserted an empty stderr; the helper is small
    code = [ln for ln in (LIBEXEC / "hpcc-mount.c").read_text().splitlines()
            if ln.strip() and not ln.strip().startswith(("/*", "*", "//"))]
    assert len(code) < 300


def test_trusted_image_gives_a_locked_idmapped_read_only_mount(site, test_user, mounts):
    out = probe(site, test_user)
    assert out["status"] == 0
    assert out["hello"] == "hello from the image\n"
    # the image's root-owned files appear as the caller's (uid 0 in its user namespace)
    assert out["entries"]["hello"][0] == 0
    opts = out["options"][0].split(",")
    assert {"ro", "nosuid", "nodev", "idmapped"} <= set(opts)
    # the caller cannot take nodev/nosuid/ro off, neither detached nor in its own namespace
    for key in ("detached_clear_nosuid", "detached_clear_nodev", "clear_nodev",
                "clear_nosuid", "clear_rdonly", "remount_bind", "remount_rw"):
        assert out[key] != "allowed", key
    assert out["open_device_node"] == "Permission denied"
    assert no_loops_left(site.base)  # autoclear: gone with the mount


def test_mount_fd_is_the_image_and_the_loop_device_goes_with_it(site, test_user, mounts):
    status, err, fd = call(site, test_user)
    assert status == 0, err
    try:
        assert len(loops_of(site.base)) == 1
        st = os.fstat(fd)
        assert os.major(st.st_dev) == 7  # a loop device's squashfs
    finally:
        os.close(fd)
    assert no_loops_left(site.base)


def test_service_account_owning_the_store_root_is_trusted(site, test_user, mounts):
    svc = ensure_user("hpccsvc")
    with changed(site.store, uid=svc.pw_uid), changed(site.store / "sub", uid=svc.pw_uid), \
            changed(site.image, uid=svc.pw_uid):
        status, err, fd = call(site, test_user)
        assert status == 0, err
        os.close(fd)
        # but not the user who is not the store's owner
        with changed(site.image, uid=test_user.pw_uid):
            assert "not a regular file owned by root or uid" in refused(site, test_user)


# --- every trust violation ----------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_image_writable_by_group_or_others_is_refused(site, test_user, mode):
    with changed(site.image, mode=mode):
        assert "writable only by its owner" in refused(site, test_user)


def test_image_owned_by_the_user_is_refused(site, test_user):
    with changed(site.image, uid=test_user.pw_uid):
        refused(site, test_user)


@pytest.mark.parametrize("which,how", [
    ("sub", "owner"), ("sub", "group-writable"), ("sub", "other-writable"),
    ("store", "group-writable"), ("store", "other-writable"),  # (its owner is the service)
    ("base", "owner"), ("base", "group-writable"), ("base", "other-writable")])
def test_directory_on_the_path_not_trusted_is_refused(site, test_user, which, how):
    d = {"sub": site.store / "sub", "store": site.store, "base": site.above}[which]
    kw = {"owner": {"uid": test_user.pw_uid}, "group-writable": {"mode": 0o775},
          "other-writable": {"mode": 0o757}}[how]
    with changed(d, **kw):
        assert "a directory on its path" in refused(site, test_user)


def test_world_writable_sticky_ancestor_is_refused(site, test_user):
    with changed(site.above, mode=0o1777):
        refused(site, test_user)


def test_symlink_to_a_trusted_image_is_refused(site, test_user):
    link = site.store / "link.sqfs"
    link.symlink_to(site.image)
    try:
        assert "cannot open link.sqfs" in refused(site, test_user, link, stdin=site.image)
    finally:
        link.unlink()


def test_symlinked_directory_is_refused(site, test_user):
    link = site.store / "linkdir"
    link.symlink_to(site.store / "sub")
    try:
        err = refused(site, test_user, link / "good.sqfs", stdin=site.image)
        assert "symlinks are not followed" in err
    finally:
        link.unlink()


def test_dotdot_and_paths_outside_the_store_are_refused(site, test_user):
    outside = site.base / "outside" / "x.sqfs"
    shutil.copy(site.image, outside)
    try:
        assert "not in the site store" in refused(site, test_user, outside)
        err = refused(site, test_user, f"{site.store}/../outside/x.sqfs", stdin=outside)
        assert "'..'" in err
        refused(site, test_user, f"{site.store}/./sub/good.sqfs", stdin=site.image)
        refused(site, test_user, f"{site.store}x/sub/good.sqfs", stdin=site.image)
    finally:
        outside.unlink()


def test_directory_fifo_and_device_node_are_refused(site, test_user):
    fifo = site.store / "fifo.sqfs"
    os.mkfifo(fifo, 0o644)
    dev = site.store / "dev.sqfs"
    os.mknod(dev, 0o60644, os.makedev(7, 0))
    try:
        assert "not a regular file" in refused(site, test_user, site.store / "sub",
                                               stdin=site.image)
        assert "not a regular file" in refused(site, test_user, fifo, stdin=site.image)
        assert "not a regular file" in refused(site, test_user, dev, stdin=site.image)
    finally:
        fifo.unlink()
        dev.unlink()


def test_fd_of_another_file_than_path_is_refused(site, test_user):
    copy = site.base / "outside" / "copy.sqfs"
    shutil.copy(site.image, copy)
    try:
        assert "fd 0 is not" in refused(site, test_user, site.image, stdin=copy)
    finally:
        copy.unlink()


@pytest.mark.parametrize("how", ["owner", "group-writable", "directory-owner"])
def test_untrusted_site_config_is_refused(site, test_user, how):
    kw = {"owner": (site.config, {"uid": test_user.pw_uid}),
          "group-writable": (site.config, {"mode": 0o664}),
          "directory-owner": (site.etc, {"uid": test_user.pw_uid})}[how]
    with changed(kw[0], **kw[1]):
        refused(site, test_user, code=FAILED)


@pytest.mark.parametrize("text", [
    '[store]\npath = "/a"\npath = "/b"\n',          # twice
    '[store]\npath = "/var/lib/x\\u0041"\n',        # escapes
    '[store]\npath = /var/lib/x\n',                 # not a string
])
def test_config_store_path_malformed_is_refused(site, test_user, text):
    with config_text(site, text):
        assert "[store] path" in refused(site, test_user, code=FAILED)


def test_config_without_store_path_means_the_default_store(site, test_user):
    with config_text(site, '[store]\nuser_path = "x"\n[stores]\npath = "%s"\n' % site.store):
        assert "not in the site store /var/lib/hpcc/images" in refused(site, test_user)


def test_environment_cannot_point_it_at_another_config(site, test_user, tmp_path):
    # a config of the user's naming a store of the user's: the helper reads no environment
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "hpcc.toml").write_text(f'[store]\npath = "{evil}"\n')
    img = evil / "mine.sqfs"
    shutil.copy(site.image, img)
    os.chown(img, test_user.pw_uid, test_user.pw_gid)
    env = {"HPCC_CONFIG": str(evil / "hpcc.toml"), "HPCC_STORE": str(evil),
           "LD_PRELOAD": str(evil / "nonexistent.so")}
    assert "not in the site store" in refused(site, test_user, img, env=env)


# --- hostile arguments and file descriptors ---------------------------------------------

@pytest.mark.parametrize("args", [[], ["a", "b"], ["--help", "x"]])
def test_wrong_number_of_arguments_is_a_usage_error(site, test_user, args):
    assert "usage" in refused(site, test_user, args=args, code=USAGE)


@pytest.mark.parametrize("arg", ["", "--help", "relative/good.sqfs", "/" + "a/" * 3000 + "x",
                                 "/var/lib/hpcc/images/../../../etc/shadow"])
def test_hostile_paths_are_refused(site, test_user, arg):
    refused(site, test_user, args=[arg])


def test_fd0_not_readable_or_fd1_not_a_socket_is_a_usage_error(site, test_user):
    path_fd = os.open(site.image, os.O_PATH | os.O_CLOEXEC)
    null_w = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    r, w = os.pipe()
    try:
        assert "fd 0" in refused(site, test_user, stdin=path_fd, code=USAGE)
        assert "fd 0" in refused(site, test_user, stdin=null_w, code=USAGE)
        assert "fd 1" in refused(site, test_user, stdout=w, code=USAGE)
    finally:
        for fd in (path_fd, null_w, r, w):
            os.close(fd)


def test_closed_stderr_never_lets_a_message_land_in_another_file(site, test_user):
    # with fd 2 closed the first file the helper opened would become "stderr": it reopens
    # fd 2 on /dev/null first, so a refusal writes nowhere and the image stays unchanged
    before = site.image.read_bytes()
    with changed(site.image, mode=0o666):
        status, _, fd = call(site, test_user, stderr=False,
                             preexec=lambda: os.close(2))
    assert status == REFUSED and fd is None
    assert site.image.read_bytes() == before


def test_without_setuid_or_inside_a_user_namespace_it_cannot_mount(site, test_user):
    plain = site.base / "bin" / "hpcc-mount-plain"
    shutil.copy(site.helper, plain)
    os.chmod(plain, 0o755)
    try:
        assert "not running as root" in refused(site, test_user, helper=plain, code=FAILED)
    finally:
        plain.unlink()
    # setuid is ignored in a user namespace: the helper is "root" there but not on the host
    status, err, fd = call(site, test_user, wrapper=["unshare", "--user", "--map-root-user"])
    assert status == FAILED and fd is None, err
    assert no_loops_left(site.base)


# --- failures -------------------------------------------------------------------------------

def test_non_squashfs_files_fail_cleanly(site, test_user):
    junk = site.store / "junk.sqfs"
    junk.write_bytes(os.urandom(8192))
    fake = site.store / "fake.sqfs"  # the magic, then garbage: the kernel refuses it
    fake.write_bytes(b"hsqs" + os.urandom(8188))
    try:
        assert "not a squashfs image" in refused(site, test_user, junk, code=FAILED)
        assert "cannot mount the image" in refused(site, test_user, fake, code=FAILED)
        empty = site.store / "empty.sqfs"
        empty.write_bytes(b"")
        assert "not a squashfs image" in refused(site, test_user, empty, code=FAILED)
        empty.unlink()
    finally:
        junk.unlink()
        fake.unlink()


def test_fd_exhaustion_at_every_step_fails_cleanly(site, test_user, mounts):
    import resource
    seen = set()
    for limit in range(4, 24):  # (with 3 the dynamic loader itself cannot open libc)
        def lower(n=limit):
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        status, err, fd = call(site, test_user, preexec=lower)
        if fd is not None:
            os.close(fd)
        assert no_loops_left(site.base), limit
        if status == 0:
            break
        assert status == FAILED and err.startswith("hpcc-mount: ") and err.count("\n") == 1
        seen.add(err.split(":")[1])
    else:
        pytest.fail("never succeeded with up to 23 fds")
    assert len(seen) >= 3  # the limit was hit at several different steps


def test_loop_device_shortage(site, test_user):
    """A real shortage: in a mount namespace whose /dev (a tmpfs, like a static container
    /dev) has a node for every loop index, all of them the same loop device that this test
    keeps busy, every device LOOP_CTL_GET_FREE offers turns out taken (EBUSY)."""
    busy = subprocess.run(["losetup", "-f", "--show", "-r", str(site.image)],
                          capture_output=True, text=True, check=True).stdout.strip()
    minor = os.minor(os.stat(busy).st_rdev)
    script = ("set -e; mount --make-rprivate /; mount -t tmpfs -o mode=755 dev /dev; "
              "mknod -m 660 /dev/loop-control c 10 237; "
              f"for i in $(seq 0 511); do mknod -m 660 /dev/loop$i b 7 {minor}; done; "
              f"exec setpriv --reuid={test_user.pw_uid} --regid={test_user.pw_gid} "
              f"--clear-groups -- \"$0\" \"$1\"")
    try:
        status, err, fd = call(site, None, wrapper=["unshare", "--mount", "sh", "-c", script],
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert fd is None and status == FAILED, err
        assert "no free loop device" in err
    finally:
        subprocess.run(["losetup", "-d", busy], check=True)
    assert no_loops_left(site.base)


# --- the same rule as root launches ---------------------------------------------------------

def _python_rule(site, path):
    """hpcc.runtime.imagemount.trusted_for_kernel (the installed package's), as root."""
    code = ("import os, sys; from hpcc.runtime.imagemount import trusted_for_kernel as t; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); print(t(fd, sys.argv[2]))")
    p = subprocess.run([sys.executable, "-I", "-c", code, str(path), str(site.store)],
                       capture_output=True, text=True, check=True)
    return p.stdout.strip() == "True"


def test_helper_and_root_launch_trust_rules_agree(site, test_user, mounts):
    """Every case above, decided by both rules: the helper mounts exactly what a root launch
    would kernel-mount (for images of the site store)."""
    svc = ensure_user("hpccsvc")
    u = test_user.pw_uid
    cases = [
        ("trusted", []),
        ("image group-writable", [(site.image, {"mode": 0o664})]),
        ("image other-writable", [(site.image, {"mode": 0o646})]),
        ("image the user's", [(site.image, {"uid": u})]),
        ("subdir the user's", [(site.store / "sub", {"uid": u})]),
        ("subdir group-writable", [(site.store / "sub", {"mode": 0o775})]),
        ("store other-writable", [(site.store, {"mode": 0o757})]),
        ("above the store the user's", [(site.above, {"uid": u})]),
        ("above the store sticky 1777", [(site.above, {"mode": 0o1777})]),
        ("service account's store", [(site.store, {"uid": svc.pw_uid}),
                                     (site.store / "sub", {"uid": svc.pw_uid}),
                                     (site.image, {"uid": svc.pw_uid})]),
        ("service account's store, user's image", [(site.store, {"uid": svc.pw_uid}),
                                                   (site.image, {"uid": u})]),
        ("service account's directory above the store", [(site.above, {"uid": svc.pw_uid})]),
    ]
    decided = {}
    for name, changes in cases:
        with contextlib.ExitStack() as stack:
            for path, kw in changes:
                stack.enter_context(changed(path, **kw))
            status, err, fd = call(site, test_user)
            if fd is not None:
                os.close(fd)
            helper = status == 0
            assert helper or status == REFUSED, (name, err)
            decided[name] = (helper, _python_rule(site, site.image))
    assert all(h == p for h, p in decided.values()), decided
    assert decided["trusted"] == (True, True)
    assert decided["service account's store"] == (True, True)
