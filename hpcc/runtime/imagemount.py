"""Mounting the image: the kernel's squashfs through a loop device for files the site
produced (root-owned, in root-owned directories), squashfuse_ll for everything else."""
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


def trusted_for_kernel(fd):
    """Whether the image open as `fd` may be mounted by the kernel's squashfs (as root).

    The rule (the setuid mount helper's C code applies the same one; keep them in step):
    the kernel parses only files that nobody but root can change, i.e.
    1. the file is a regular file owned by root (uid 0), not writable by group or others;
    2. every directory from / down to the file is owned by root and not writable by group
       or others (so nobody else can rename, replace or move anything on the way);
    3. that chain is walked by file descriptor (openat, O_NOFOLLOW, one component at a
       time, each checked before the next is opened), starting from the file's current
       name, and the entry found at the end must be this very file (device and inode).
    The name comes from /proc/self/fd (the kernel's current path of the open file), which
    is only a hint: nothing is trusted from it unless the walk confirms it, and a file
    opened through /proc/self/fd/N, a symlink or another mount namespace either walks
    to the same inode through root-owned directories or is not trusted.
    CVE-2023-30549: the kernel's squashfs must never parse a file a user can rewrite.
    Anything not trusted is served by squashfuse_ll running as the user instead."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
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
    cur = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for comp in parts[:-1]:
            if not _root_only(os.fstat(cur)):
                return False
            try:
                nxt = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=cur)
            except OSError:
                return False
            os.close(cur)
            cur = nxt
        if not _root_only(os.fstat(cur)):
            return False
        try:
            last = os.stat(parts[-1], dir_fd=cur, follow_symlinks=False)
        except OSError:
            return False
        return (last.st_dev, last.st_ino) == (st.st_dev, st.st_ino)
    finally:
        os.close(cur)


def _root_only(st):
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


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


def _fuse_mount(img_fd, target, path, privileged, user=None):
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
    the user could rewrite, so a flaw in squashfuse gives nothing the user lacks."""
    exe = _find_exe("squashfuse_ll")
    if not exe:
        raise MountError("squashfuse_ll is not installed",
                         hint="the admin must install the squashfuse package")
    try:
        ffd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError("/dev/fuse does not exist: containers of unprivileged users need FUSE",
                         hint="the admin must load the fuse module (modprobe fuse)") from None
    except PermissionError:
        raise MountError("cannot open /dev/fuse (permission denied): containers of "
                         "unprivileged users need FUSE",
                         hint="the admin should make it mode 0666 (chmod 0666 /dev/fuse; "
                              "the usual udev default)") from None
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
    return pid


def _become(uid, gid, groups):
    """Turn this (forked, root) process into the user for good: no way back to root."""
    _sys.drop_bounding()
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from uid 0 to another: permitted/effective caps go
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    if os.getresuid() != (uid, uid, uid) or _sys.capabilities_effective():
        os._exit(126)


def mount_image(sqfs, target, privileged, user=None):
    """Mount the squashfs file read-only on target; return the FUSE daemon's pid or None.
    user: (uid, gid, groups) the FUSE daemon runs as when root launches for someone else
    (images root may not give to the kernel are served by the user's own daemon)."""
    try:
        img_fd = os.open(sqfs, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open image {sqfs}: {e.strerror}") from None
    try:
        if os.pread(img_fd, 4, 0) != SQUASHFS_MAGIC:
            raise MountError(f"{sqfs} is not a squashfs image")
        if privileged and trusted_for_kernel(img_fd):
            _loop_mount(img_fd, target, sqfs)
            return None
        if not privileged or user is None or user[0] == 0:
            user = None
        return _fuse_mount(img_fd, target, sqfs, privileged, user)
    finally:
        os.close(img_fd)
