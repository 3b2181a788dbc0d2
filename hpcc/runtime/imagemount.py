"""Mounting the image: the kernel's squashfs for files the site produced (root-owned in
root-owned directories, or the site store service account's in the site store): through a
loop device for root launches, from the setuid mount helper for unprivileged ones;
squashfuse_ll for everything else."""
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import errno
import os
import stat
import struct

from ..errors import MountError
from . import _sys, namespaces

SQUASHFS_MAGIC = b"hsqs"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4


def trusted_for_kernel(fd, site_store=""):
    """Whether the image open as `fd` may be mounted by the kernel's squashfs (as root).

    The rule (libexec/hpcc-mount.c, the setuid mount helper, applies the same one to the
    images of the site store: keep the two in step) -- the kernel parses only files that
    nobody but root, or the site store's service account inside the site store, can change:
    1. the file is a regular file owned by root, not writable by group or others;
    2. every directory from / down to the file is owned by root and not writable by group
       or others (so nobody else can rename, replace or move anything on the way);
    3. within the site store `site_store` (config store.path), the owner of the store's
       root directory is the store's service account (root gave it the store): from that
       directory down, the directories and the file may be owned by root or that account
       (still not writable by group or others); every directory above it stays root's;
    4. that chain is walked by file descriptor (openat, O_NOFOLLOW, one component at a
       time, each checked before the next is opened), starting from the file's current
       name, and the entry found at the end must be this very file (device and inode).
    The name comes from /proc/self/fd (the kernel's current path of the open file), which
    is only a hint: nothing is trusted from it unless the walk confirms it, and a file
    opened through /proc/self/fd/N, a symlink or another mount namespace either walks
    to the same inode through trusted directories or is not trusted.
    The helper, run by anyone, takes only images of the site store; this rule serves root
    launches, whose caller may name any file.
    CVE-2023-30549: the kernel's squashfs must never parse a file a user can rewrite.
    Anything not trusted is served by squashfuse_ll running as the user instead."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
        return False
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    if not where.startswith("/") or where.endswith(" (deleted)"):
        return False
    parts = where.split("/")[1:]
    if not parts or any(c in ("", ".", "..") for c in parts):
        return False
    store = [c for c in site_store.split("/") if c]
    store_depth = len(store) if store and parts[:len(store)] == store else -1
    service = 0  # the owner admitted besides root, once the walk is inside the site store
    cur = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, comp in enumerate(parts[:-1], 1):
            if not _trusted_dir(os.fstat(cur), service):
                return False
            try:
                nxt = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=cur)
            except OSError:
                return False
            os.close(cur)
            cur = nxt
            if depth == store_depth:
                service = os.fstat(cur).st_uid
        if not _trusted_dir(os.fstat(cur), service) or st.st_uid not in (0, service):
            return False
        try:
            last = os.stat(parts[-1], dir_fd=cur, follow_symlinks=False)
        except OSError:
            return False
        return (last.st_dev, last.st_ino) == (st.st_dev, st.st_ino)
    finally:
        os.close(cur)


def _trusted_dir(st, service):
    return (stat.S_ISDIR(st.st_mode) and st.st_uid in (0, service)
            and not st.st_mode & 0o022)


def _loop_mount(img_fd, target, path):
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    import fcntl
    try:
        for _ in range(20):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            lfd = os.open(f"/dev/loop{n}", os.O_RDONLY | os.O_CLOEXEC)
            name = os.fsencode(path)[:63]
            info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0,
                               LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)
            cfg = struct.pack("=II", img_fd, 0) + info + bytes(64)
            try:
                fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
            except OSError as e:
                os.close(lfd)
                if e.errno == errno.EBUSY:
                    continue
                raise MountError(f"cannot attach {path} to a loop device: {e.strerror}") \
                    from None
            try:
                _sys.mount(f"/dev/loop{n}", target, "squashfs",
                           _sys.MS_RDONLY | _sys.MS_NODEV | _sys.MS_NOSUID)
            except OSError as e:
                raise MountError(f"cannot mount {path} (squashfs): {e.strerror}",
                                 hint="is it a squashfs image with a compressor this "
                                      "kernel supports?") from None
            finally:
                os.close(lfd)  # autoclear: the loop device goes with the mount
            return
        raise MountError("no free loop device", hint="the admin may raise max_loop")
    finally:
        os.close(ctl)


def _find_exe(name):
    for d in os.environ.get("PATH", "").split(":") + ["/usr/bin", "/usr/local/bin"]:
        p = os.path.join(d or ".", name)
        if os.access(p, os.X_OK):
            return p
    return None


def _open_fuse_device():
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError("/dev/fuse does not exist: containers of unprivileged users need FUSE",
                         hint="the admin must load the fuse module (modprobe fuse)") from None
    except PermissionError:
        raise MountError("cannot open /dev/fuse (permission denied): containers of "
                         "unprivileged users need FUSE",
                         hint="the admin should make it mode 0666 (chmod 0666 /dev/fuse; "
                              "the usual udev default)") from None


def _fuse_mount_for_user(target, path, uid, gid):
    """Mount a FUSE filesystem on target whose files, as its server reports them, belong to
    uid/gid where the server says 0 (uid/gid shown as 0, every other id unchanged): root's
    writable containers for a user, when the image is served by squashfuse_ll. Returns the
    /dev/fuse fd.

    FUSE cannot be idmapped (squashfuse_ll 0.1 does not ask for it), but the kernel reads
    a FUSE server's ids in the user namespace that owns the connection. So a child joins a
    user namespace exchanging 0 and uid/gid (idmap.swap_root_map), opens /dev/fuse, creates
    the filesystem there with fsopen/fsmount (user_id=0: only the user may use it, and no
    allow_other: nobody else, root included, gets through it except via the overlay above,
    which rootfs mounts with the user's ids), and passes both fds back; this process attaches
    the mount. Raises OSError where the kernel refuses (the caller falls back to a plain
    mount, the image's files then stay root's)."""
    from .children import fds_from_child
    from .idmap import swap_root_map, userns_with_maps

    def make():
        _sys.setns(ns, _sys.CLONE_NEWUSER)
        _sys.unshare(_sys.CLONE_NEWNS)  # a mount namespace the new user ns owns
        ffd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        fs = _sys.fsopen("fuse", _sys.FSOPEN_CLOEXEC)
        for key, value in (("source", path), ("fd", str(ffd)), ("rootmode", "40000"),
                           ("user_id", "0"), ("group_id", "0")):
            _sys.fsconfig(fs, _sys.FSCONFIG_SET_STRING, key, value)
        _sys.fsconfig(fs, _sys.FSCONFIG_SET_FLAG, "default_permissions")
        _sys.fsconfig(fs, _sys.FSCONFIG_CMD_CREATE)
        return [ffd, _sys.fsmount(fs, _sys.FSMOUNT_CLOEXEC, _sys.MOUNT_ATTR_RDONLY
                                  | _sys.MOUNT_ATTR_NOSUID | _sys.MOUNT_ATTR_NODEV)]

    ns = userns_with_maps(swap_root_map(uid), swap_root_map(gid))
    try:
        fds = fds_from_child(make, 2)
    finally:
        os.close(ns)
    ffd, mnt = fds
    try:
        _sys.move_mount(mnt, "", _sys.AT_FDCWD, target, _sys.MOVE_MOUNT_F_EMPTY_PATH)
    except OSError:
        os.close(ffd)
        raise
    finally:
        os.close(mnt)
    return ffd


def _fuse_mount(img_fd, target, path, privileged, user=None, idmap=None):
    """Mount the image with squashfuse_ll: hpcc opens /dev/fuse and does the mount(2)
    itself (so no setuid fusermount3 is needed), then hands the fd to squashfuse_ll as
    /dev/fd/3 and the image as /dev/fd/4 (libfuse 3 takes an inherited fd as a mountpoint
    of that form). Unprivileged, the daemon dies with its parent (PR_SET_PDEATHSIG). As root
    it moves to the host's mount namespace instead (so it does not pin the container's) and
    lives exactly as long as the mount: when the container's namespace goes, the kernel
    aborts the FUSE connection and the daemon exits. The Slurm helper relies on this: the
    namespace outlives the process that called setup_root.

    As root with a `user` (uid, gid, groups), the daemon is not root: before its exec it
    takes the user's uid, gid and groups (real, effective and saved), loses every
    capability (bounding set included) and sets no_new_privs. The image it parses is one
    the user could rewrite, so a flaw in squashfuse gives nothing the user lacks.

    idmap (uid, gid), as root: the image's 0 is shown as that user (_fuse_mount_for_user).
    Returns (daemon pid, whether idmap took effect)."""
    exe = _find_exe("squashfuse_ll")
    if not exe:
        raise MountError("squashfuse_ll is not installed",
                         hint="the admin must install the squashfuse package")
    ffd = None
    if idmap is not None and privileged:
        try:
            ffd = _fuse_mount_for_user(target, path, *idmap)
        except OSError:
            ffd = None
    idmapped = ffd is not None
    if ffd is None:
        ffd = _open_fuse_device()
        uid, gid = os.getuid(), os.getgid()  # in the setup namespace: 0, the caller on the host
        opts = (f"fd={ffd},rootmode=40000,user_id={uid},group_id={gid},default_permissions"
                + (",allow_other" if privileged else ""))
        try:
            _sys.mount(path, target, "fuse.squashfuse_ll",
                       _sys.MS_RDONLY | _sys.MS_NOSUID | _sys.MS_NODEV, opts)
        except OSError as e:
            os.close(ffd)
            raise MountError(f"cannot mount FUSE for {path}: {e.strerror}") from None
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child: become squashfuse_ll
        try:
            detached = False
            if privileged:
                for ns in (namespaces.host_mount_ns(), "/proc/1/ns/mnt"):
                    try:
                        nsfd = ns if isinstance(ns, int) else os.open(ns, os.O_RDONLY)
                        _sys.setns(nsfd, _sys.CLONE_NEWNS)
                        detached = True
                        break
                    except (OSError, TypeError):
                        continue
            if not detached:
                _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
            if user is not None:
                _become(*user)
            os.setsid()  # no terminal signals (Ctrl-C is for the command, not the daemon)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            # fds 3 and 4 for the daemon: move ours out of the way first.
            a, b = os.dup(ffd), os.dup(img_fd)
            os.dup2(a, 3)
            os.dup2(b, 4)
            _sys.close_range(5)
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            if devnull > 2:
                os.close(devnull)
            os.execv(exe, ["squashfuse_ll", "-f", "/dev/fd/4", "/dev/fd/3"])
        finally:
            os._exit(127)
    os.close(ffd)
    return pid, idmapped


class HelperMount:
    """Unprivileged launches: a kernel mount of a site image from the setuid mount helper
    (libexec/hpcc-mount, config launcher.mount_helper), asked for before entering the user
    namespace (setuid does not work inside it). start() spawns the helper and returns at
    once, so that it works while the launcher builds the spec; result() waits for it:
    (mount fd, None), or (None, why not), and then squashfuse_ll serves the image. The
    helper decides trust itself, by file descriptor (docs/launcher.md, "The mount helper");
    this side only skips images obviously not in the site store, to save the helper's
    start, and hands the helper an fd of the image as proof that the caller may read it."""

    def __init__(self, why=None):
        self.why, self.pid, self.sock, self.err = why, None, None, None

    @classmethod
    def start(cls, helper, sqfs, store):
        sqfs = str(sqfs)
        if not helper:
            return cls("launcher.mount_helper is off")
        if not isinstance(helper, str) or not helper.startswith("/"):
            return cls(f"launcher.mount_helper must be an absolute path, not {helper!r}")
        if not store or not sqfs.startswith(store + "/"):
            return cls(f"not an image of the site store {store or '(none)'}")
        import _socket
        try:
            img = os.open(sqfs, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return cls(f"cannot open the image: {e.strerror}")
        self = cls()
        self.sock, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.err, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.posix_spawn(helper, [helper, sqfs], {}, file_actions=[
                (os.POSIX_SPAWN_DUP2, img, 0), (os.POSIX_SPAWN_DUP2, theirs.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2)])
        except OSError as e:
            self.why = f"mount helper {helper}: {e.strerror}"
            self.close()
        finally:
            os.close(img)
            os.close(err_w)
            theirs.close()
        return self

    @classmethod
    def for_spec(cls, spec):
        h = spec["hpcc"]
        return cls.start(h.get("mount_helper") or "", h["image"], h.get("site_store") or "")

    def result(self):
        if self.pid is None:
            return None, self.why
        from .children import recv_fds
        try:
            _, fds = recv_fds(self.sock, 1, 1)
        except OSError:
            fds = []
        status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.pid = None
        why = os.read(self.err, 1024).decode(errors="replace").strip()
        self.close()
        if status == 0 and len(fds) == 1:
            return fds[0], None
        for fd in fds:
            os.close(fd)
        if status == 0:  # sent, but not received: no fd free here (MSG_CTRUNC)
            self.why = "the mount helper's mount did not arrive (too many open files?)"
        else:
            self.why = f"the mount helper refused: {why.removeprefix('hpcc-mount: ') or status}"
        return None, self.why

    def close(self):
        if self.sock is not None:
            self.sock.close()
            os.close(self.err)
            self.sock = self.err = None


def attach_mount(mount_fd, target):
    """Attach the helper's detached mount on target (in our user+mount namespace)."""
    try:
        _sys.move_mount(mount_fd, "", _sys.AT_FDCWD, target, _sys.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(mount_fd)


def _become(uid, gid, groups):
    """Turn this (forked, root) process into the user for good: no way back to root."""
    _sys.drop_bounding()
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from uid 0 to another: permitted/effective caps go
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    if os.getresuid() != (uid, uid, uid) or _sys.capabilities_effective():
        os._exit(126)


def mount_image(sqfs, target, privileged, user=None, site_store="", idmap=None):
    """Mount the squashfs file read-only on target; return (the FUSE daemon's pid or None,
    whether the FUSE mount shows the image's 0 as idmap's uid/gid).
    user: (uid, gid, groups) the FUSE daemon runs as when root launches for someone else
    (images root may not give to the kernel are served by the user's own daemon).
    site_store: the site store's root (its service account's images are trusted too)."""
    try:
        img_fd = os.open(sqfs, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open image {sqfs}: {e.strerror}") from None
    try:
        if os.pread(img_fd, 4, 0) != SQUASHFS_MAGIC:
            raise MountError(f"{sqfs} is not a squashfs image")
        if privileged and trusted_for_kernel(img_fd, site_store):
            _loop_mount(img_fd, target, sqfs)
            return None, False
        if not privileged or user is None or user[0] == 0:
            user = None
        return _fuse_mount(img_fd, target, sqfs, privileged, user, idmap)
    finally:
        os.close(img_fd)
