"""Namespaces and root filesystem assembly (both modes share every step but the image mount).

Layout, in a tmpfs mounted on the per-user staging directory (a fixed, empty directory that
only ever carries mounts inside private mount namespaces, so nothing per launch is created on
the host): img/ (the squashfs: kernel loop mount or squashfuse_ll), upper/ + work/ (tmpfs
overlay layers), root/ (overlay of img under upper: mount points and injected files land in
tmpfs, never in the image), bundle/config.json (for hooks).
"""
import errno
import os
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import stat
import struct

from ..errors import HookError, LaunchError, MountError
from . import _sys
from .spec import clean_dest

O_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
RESOLVE = _sys.RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS
_HAVE_OPENAT2 = True

SQUASHFS_MAGIC = b"hsqs"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4


# ---------------------------------------------------------------------------------------
# namespaces

_HOST_MNT_NS = None  # fd of the caller's mount namespace (privileged enter_namespaces)

def enter_namespaces(privileged):
    """Move the calling (single-threaded) process into a new mount namespace, and, when
    unprivileged, a new user namespace mapping the caller's uid and gid to themselves. All
    mounts become private so nothing done afterwards propagates back to the host."""
    global _HOST_MNT_NS
    if privileged:
        # kept for the FUSE daemon, which must not live in (and pin) the new namespace
        try:
            _HOST_MNT_NS = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            _HOST_MNT_NS = None
        try:
            _sys.unshare(_sys.CLONE_NEWNS)
        except OSError as e:
            raise LaunchError(f"cannot create a mount namespace: {e.strerror}") from None
    else:
        uid, gid = os.getuid(), os.getgid()
        try:
            _sys.unshare(_sys.CLONE_NEWUSER | _sys.CLONE_NEWNS)
        except OSError as e:
            raise LaunchError(
                f"cannot create a user namespace: {e.strerror}",
                hint="the admin must allow unprivileged user namespaces "
                     "(sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1)"
            ) from None
        # Setup namespace: the caller is root in it, so that image files owned by root
        # (uid 0 in the squashfs) map to the caller and the overlay can copy them up.
        # exec_process nests a second user namespace that maps the caller to themselves.
        write_id_maps(0, uid, 0, gid)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)


def write_id_maps(inner_uid, outer_uid, inner_gid, outer_gid):
    """Map one uid and one gid of the current user namespace (just unshared)."""
    for name, data in (("setgroups", "deny"), ("uid_map", f"{inner_uid} {outer_uid} 1\n"),
                       ("gid_map", f"{inner_gid} {outer_gid} 1\n")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)


def stage_dir(privileged):
    """The fixed directory the staging tmpfs is mounted on (only in our namespace): one per
    user, reused by every launch, never holding files of a launch. Root: /run/hpcc; a user:
    $XDG_RUNTIME_DIR/hpcc, else /tmp/hpcc-UID, else (when someone else took that name)
    ~/.cache/hpcc/stage."""
    owner = os.getuid()  # as seen in this user namespace (the caller, or 0 in ours)
    if privileged:
        candidates = ["/run/hpcc"]
    else:
        candidates = []
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            try:
                st = os.stat(xdg)
                if st.st_uid == owner and stat.S_ISDIR(st.st_mode):
                    candidates.append(os.path.join(xdg, "hpcc"))
            except OSError:
                pass
        candidates.append(f"/tmp/hpcc-{_host_uid()}")
        home = os.environ.get("HOME") or ""
        if home.startswith("/") and home != "/":
            candidates.append(os.path.join(home, ".cache", "hpcc", "stage"))
    problem = None
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            problem = f"cannot create the staging directory {path}: {e.strerror}"
            continue
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == owner and not st.st_mode & 0o022:
            return path
        problem = (f"staging directory {path} is not a directory owned by you and writable "
                   "only by you")
    raise LaunchError(problem, hint=f"remove {candidates[-1]} or set XDG_RUNTIME_DIR")


def _host_uid():
    """The caller's uid outside any user namespace hpcc made (from /proc/self/uid_map)."""
    try:
        with open("/proc/self/uid_map") as f:
            first = f.readline().split()
        if first and first[0] == "0" and first[2] == "1":
            return int(first[1])
    except (OSError, IndexError, ValueError):
        pass
    return os.getuid()


# ---------------------------------------------------------------------------------------
# safe path resolution inside the root

def _walk_nofollow(root_fd, rel):
    """Fallback without openat2: open component by component, refusing any symlink."""
    cur = os.dup(root_fd)
    try:
        for comp in rel.split("/"):
            if comp in ("", "."):
                continue
            try:
                nfd = os.open(comp, O_PATH_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
            except OSError:
                raise
            if stat.S_ISLNK(os.fstat(nfd).st_mode):
                os.close(nfd)
                raise OSError(errno.ELOOP, f"symlink in {rel} (this kernel has no openat2)")
            os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        os.close(cur)
        raise


def open_in_root(root_fd, path, flags=O_PATH_FLAGS):
    """Open `path` as seen from inside the root: symlinks resolve against the root, '..'
    stops at it, magic links are refused. Returns an fd; raises OSError."""
    global _HAVE_OPENAT2
    rel = clean_dest(path).lstrip("/") or "."
    if _HAVE_OPENAT2:
        # RESOLVE_IN_ROOT fails with EAGAIN when a rename or a mount anywhere on the system
        # raced with the lookup: retry (the kernel's own advice), then walk.
        for _ in range(64):
            try:
                return _sys.openat2(root_fd, rel, flags | os.O_CLOEXEC, RESOLVE)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    continue
                if e.errno != errno.ENOSYS:
                    raise
                _HAVE_OPENAT2 = False
                break
    fd = _walk_nofollow(root_fd, rel)
    if flags & os.O_PATH:
        return fd
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    finally:
        os.close(fd)


def resolve_target(root_fd, path, create=None, writable_devs=(), _depth=0):
    """fd (O_PATH) of the mount target `path` inside the root. Missing components are
    created (directories, or an empty file last when create == "file") only on the
    filesystems in writable_devs (the overlay and tmpfs mounts of this container), never
    on a bind of a host directory."""
    try:
        return open_in_root(root_fd, path)
    except OSError as e:
        if e.errno != errno.ENOENT or not create:
            raise MountError(f"cannot resolve {path} in the container: {e.strerror}") from None
    parts = [p for p in clean_dest(path).split("/") if p]
    cur = os.dup(root_fd)
    try:
        for i, comp in enumerate(parts):
            sub = "/" + "/".join(parts[:i + 1])
            try:
                nfd = open_in_root(root_fd, sub)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise MountError(f"cannot resolve {sub} in the container: {e.strerror}") \
                        from None
                if os.fstat(cur).st_dev not in writable_devs:
                    raise MountError(
                        f"mount point {path} does not exist and would have to be created "
                        f"on a host directory bound into the container",
                        hint="create it on the host or choose another destination") from None
                try:
                    if create == "file" and i == len(parts) - 1:
                        os.close(os.open(comp, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=cur))
                    else:
                        os.mkdir(comp, 0o755, dir_fd=cur)
                except FileExistsError:
                    # a dangling symlink: create what it points to, inside the root
                    try:
                        link = os.readlink(comp, dir_fd=cur)
                    except OSError:
                        link = None
                    if link is None or _depth > 16:
                        raise MountError(f"cannot create mount point {path}: {sub} is a "
                                         "dangling symlink in the image") from None
                    base = "/" + "/".join(parts[:i])
                    rest = "/".join(parts[i + 1:])
                    target = os.path.join(base, link, rest) if rest else os.path.join(base, link)
                    os.close(cur)
                    cur = -1
                    return resolve_target(root_fd, clean_dest(target), create, writable_devs,
                                          _depth + 1)
                except OSError as e2:
                    raise MountError(f"cannot create mount point {path}: {e2.strerror}") \
                        from None
                nfd = open_in_root(root_fd, sub)
            os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        if cur >= 0:
            os.close(cur)
        raise


def write_file_in_root(root_fd, path, data, writable_devs, mode=0o644, owner=None):
    """Replace `path` inside the root by a new regular file with `data` (in the overlay:
    the image is not changed). A symlink at `path` is replaced, not followed."""
    parent = resolve_target(root_fd, os.path.dirname(clean_dest(path)), "dir", writable_devs)
    name = os.path.basename(path)
    try:
        if os.fstat(parent).st_dev not in writable_devs:
            raise MountError(f"cannot write {path}: its directory is a host bind")
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise MountError(f"cannot write {path}: the image has a directory there")
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=parent)
        try:
            os.write(fd, data)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as e:
        raise MountError(f"cannot write {path} in the container: {e.strerror}") from None
    finally:
        os.close(parent)


def read_file_in_root(root_fd, path, limit=4 << 20):
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, limit)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# the image

def _trusted_for_kernel(fd, path):
    """Kernel-mount only files the site produced: owned by root, not writable by others,
    in a directory likewise (CVE-2023-30549: never kernel-mount a user's file)."""
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        return False
    try:
        dst = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return dst.st_uid == 0 and not dst.st_mode & 0o022


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


def _fuse_mount(img_fd, target, path, privileged):
    """Mount the image with squashfuse_ll: hpcc opens /dev/fuse and does the mount(2)
    itself (so no setuid fusermount3 is needed), then hands the fd to squashfuse_ll as
    /dev/fd/3. Unprivileged, the daemon dies with its parent (PR_SET_PDEATHSIG). As root it
    moves to the host's mount namespace instead (so it does not pin the container's) and
    lives exactly as long as the mount: when the container's namespace goes, the kernel
    aborts the FUSE connection and the daemon exits. The Slurm helper relies on this: the
    namespace outlives the process that called setup_root."""
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
                for ns in (_HOST_MNT_NS, "/proc/1/ns/mnt"):
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


def mount_image(sqfs, target, privileged):
    """Mount the squashfs file read-only on target; return the FUSE daemon's pid or None."""
    try:
        img_fd = os.open(sqfs, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open image {sqfs}: {e.strerror}") from None
    try:
        if os.pread(img_fd, 4, 0) != SQUASHFS_MAGIC:
            raise MountError(f"{sqfs} is not a squashfs image")
        if privileged and _trusted_for_kernel(img_fd, sqfs):
            _loop_mount(img_fd, target, sqfs)
            return None
        return _fuse_mount(img_fd, target, sqfs, privileged)
    finally:
        os.close(img_fd)


# ---------------------------------------------------------------------------------------
# mounts

_ATTRS = {"ro": _sys.MOUNT_ATTR_RDONLY, "nosuid": _sys.MOUNT_ATTR_NOSUID,
          "nodev": _sys.MOUNT_ATTR_NODEV, "noexec": _sys.MOUNT_ATTR_NOEXEC}
_FLAGS = {"ro": _sys.MS_RDONLY, "nosuid": _sys.MS_NOSUID, "nodev": _sys.MS_NODEV,
          "noexec": _sys.MS_NOEXEC}


def _attrs(options):
    out = 0
    for o in options:
        out |= _ATTRS.get(o, 0)
    return out


def _bind(src_fd, tgt_fd, options):
    flags = _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC | _sys.AT_EMPTY_PATH
    if "rbind" in options:
        flags |= _sys.AT_RECURSIVE
    tree = _sys.open_tree(src_fd, "", flags)
    try:
        attrs = _attrs(options)
        if attrs:
            _sys.mount_setattr(tree, "", _sys.AT_EMPTY_PATH | _sys.AT_RECURSIVE, attrs)
        _sys.move_mount(tree, "", tgt_fd, "",
                        _sys.MOVE_MOUNT_F_EMPTY_PATH | _sys.MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(tree)


def _open_source(m, user_ctx):
    """O_PATH fd of a bind source on the host; a user's source must be readable by them."""
    src = m["source"]
    check = m.get("x-hpcc-origin") in ("user", "home", "cwd")
    with user_ctx if check else _NoCtx():
        try:
            fd = os.open(src, O_PATH_FLAGS)
        except OSError as e:
            raise MountError(f"cannot bind {src}: {e.strerror}") from None
        if check:
            want = os.R_OK | (os.X_OK if stat.S_ISDIR(os.fstat(fd).st_mode) else 0)
            if not os.access(f"/proc/self/fd/{fd}", want, effective_ids=True):
                os.close(fd)
                raise MountError(f"refusing to bind {src}: you cannot read it")
    return fd


class _NoCtx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _AsUser:
    """Privileged mode: do host file access checks with the target user's credentials."""

    def __init__(self, user):
        self.uid, self.gid = user["uid"], user["gid"]
        self.groups = user.get("additionalGids") or []
        self.active = os.geteuid() == 0 and self.uid != 0

    def __enter__(self):
        if self.active:
            self.saved = os.getgroups()
            os.setgroups(self.groups)
            os.setegid(self.gid)
            os.seteuid(self.uid)
        return self

    def __exit__(self, *a):
        if self.active:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(self.saved)
        return False


def _apply_mount(root_fd, m, privileged, writable_devs, user_ctx):
    dest, typ, opts = m["destination"], m["type"], m.get("options", [])
    if typ == "bind":
        src_fd = _open_source(m, user_ctx)
        try:
            is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
            tgt = resolve_target(root_fd, dest, "dir" if is_dir else "file", writable_devs)
            try:
                if stat.S_ISDIR(os.fstat(tgt).st_mode) != is_dir:
                    raise MountError(f"cannot bind {m['source']} on {dest}: one is a directory "
                                     "and the other is not")
                _bind(src_fd, tgt, opts)
            finally:
                os.close(tgt)
        except OSError as e:
            raise MountError(f"cannot bind {m['source']} on {dest}: {e.strerror}") from None
        finally:
            os.close(src_fd)
        return
    tgt = resolve_target(root_fd, dest, "dir", writable_devs)
    try:
        if not stat.S_ISDIR(os.fstat(tgt).st_mode):
            raise MountError(f"cannot mount {typ} on {dest}: not a directory in the image")
        where = f"/proc/self/fd/{tgt}"
        if typ == "proc" and not privileged:
            # a user namespace may not mount a procfs of the host's pid namespace: bind it
            _bind_path("/proc", tgt, ["rbind", "nosuid", "nodev", "noexec"])
        else:
            flags = 0
            data = []
            for o in opts:
                if o in _FLAGS:
                    flags |= _FLAGS[o]
                elif "=" in o:
                    data.append(o)
            _sys.mount(m.get("source", typ), where, typ, flags, ",".join(data) or None)
        if typ == "tmpfs":
            nfd = open_in_root(root_fd, dest)
            writable_devs.add(os.fstat(nfd).st_dev)
            os.close(nfd)
        if typ == "proc" and privileged:
            # root in the container keeps uid 0 without capabilities: these stay read-only
            for sub in ("sys", "sysrq-trigger", "irq", "bus"):
                p = f"{dest}/{sub}"
                try:
                    sfd = open_in_root(root_fd, p)
                except OSError:
                    continue
                try:
                    _bind(sfd, sfd, ["rbind", "ro", "nosuid", "nodev", "noexec"])
                finally:
                    os.close(sfd)
    except OSError as e:
        raise MountError(f"cannot mount {typ} on {dest}: {e.strerror}") from None
    finally:
        os.close(tgt)


def _bind_path(src, tgt_fd, opts):
    sfd = os.open(src, O_PATH_FLAGS)
    try:
        _bind(sfd, tgt_fd, opts)
    finally:
        os.close(sfd)


def _dev_links(root_fd, writable_devs):
    try:
        dfd = open_in_root(root_fd, "/dev")
    except OSError:
        return
    try:
        if os.fstat(dfd).st_dev not in writable_devs:
            return
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                             ("ptmx", "pts/ptmx"), ("core", "/proc/kcore")):
            if name == "core":
                continue
            try:
                os.symlink(target, name, dir_fd=dfd)
            except FileExistsError:
                pass
    finally:
        os.close(dfd)


def _merge_lines(old, new_lines, key_fields):
    """Keep the image's lines except those that clash with ours on the given fields."""
    keys = [set() for _ in key_fields]
    for line in new_lines:
        f = line.split(":")
        for i, k in enumerate(key_fields):
            keys[i].add(f[k])
    out = []
    for line in old.decode("utf-8", "replace").splitlines():
        f = line.split(":")
        if len(f) > max(key_fields) and any(f[k] in keys[i] for i, k in enumerate(key_fields)):
            continue
        if line.strip():
            out.append(line)
    return ("\n".join(out + new_lines) + "\n").encode()


def _read_host(path):
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------
# setup_root

class RootHandle:
    """What setup_root leaves behind: the FUSE daemon (if any), the bundle path, the id,
    and an fd of the host's root kept only when poststart/poststop hooks need it."""

    def __init__(self, container_id, stage, fuse_pid):
        self.id = container_id
        self.stage = stage
        self.bundle = os.path.join(stage, "bundle")
        self.fuse_pid = fuse_pid
        self.host_root_fd = None
        self.prefetch = None  # prefetch.Prefetch of the command's files, when one runs

    def close(self):
        """Stop the FUSE daemon (call when the container's processes are gone)."""
        if self.fuse_pid:
            try:
                os.kill(self.fuse_pid, signal.SIGKILL)
                os.waitpid(self.fuse_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.fuse_pid = None
        if self.host_root_fd is not None:
            os.close(self.host_root_fd)
            self.host_root_fd = None


def setup_root(spec, privileged=False, *, container_id=None, pivot=True, log=None):
    """Assemble the container's root in the calling process's (private) mount namespace,
    run the createRuntime/prestart/createContainer hooks, make the root read-only (unless
    spec['root']['readonly'] is false) and pivot_root into it. Returns a RootHandle."""
    t = log or (lambda msg: None)
    cid = container_id or f"hpcc-{os.getpid()}-{os.urandom(4).hex()}"
    stage = stage_dir(privileged)
    hooks = spec.get("hooks") or {}
    if hooks:
        import json
        import subprocess  # noqa: F401  (no imports are possible after pivot_root)
    try:
        _sys.mount("hpcc", stage, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, "mode=0755")
    except OSError as e:
        raise MountError(f"cannot mount the staging tmpfs on {stage}: {e.strerror}") from None
    for d in ("img", "upper", "work", "root", "bundle"):
        os.mkdir(os.path.join(stage, d), 0o755)
    handle = RootHandle(cid, stage, None)
    h = spec["hpcc"]
    try:
        _unshare_extra(h.get("unshare") or ())
        handle.fuse_pid = mount_image(h["image"], os.path.join(stage, "img"), privileged)
        t("image mounted" + (" (squashfuse_ll)" if handle.fuse_pid else " (kernel)"))
        if h.get("idmap") and not handle.fuse_pid:
            from .idmap import idmap_mount
            try:
                idmap_mount(f"{stage}/img", *h["idmap"])
                h["files_owner"] = list(h["idmap"])  # of the files hpcc writes in the root
                t("image idmapped: its root's files are the user's")
            except OSError as e:
                t(f"no idmapped mount ({e.strerror or e}): the image's files stay root's")
        upper = h.get("upper") or f"{stage}/upper"
        work = h.get("work") or f"{stage}/work"
        if h.get("fresh_upper", True):
            # the overlay's / takes the upper directory's owner and mode: the image's
            lst = os.stat(f"{stage}/img")
            os.chown(upper, lst.st_uid, lst.st_gid)
            os.chmod(upper, stat.S_IMODE(lst.st_mode))
        budget = spec["hpcc"].get("prefetch_bytes", 0)
        if budget > 0 and spec["process"]["args"]:
            from . import prefetch
            from .spec import spec_env
            handle.prefetch = prefetch.start(
                os.open(f"{stage}/img", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                spec["process"]["args"][0],
                spec_env(spec).get("PATH", "/usr/local/bin:/usr/bin:/bin"), budget)
        opts = (f"lowerdir={stage}/img,upperdir={upper},workdir={work}"
                + ("" if privileged else ",userxattr"))
        try:
            _sys.mount("overlay", f"{stage}/root", "overlay", _sys.MS_NOSUID | _sys.MS_NODEV,
                       opts)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise MountError(f"squashfuse_ll could not serve {spec['hpcc']['image']}",
                                 hint="check that the file is an intact squashfs image") \
                    from None
            raise MountError(f"cannot mount the overlay root: {e.strerror}") from None
        root_fd = os.open(f"{stage}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            writable = {os.fstat(root_fd).st_dev}
            _assemble(root_fd, spec, privileged, writable)
            t("root assembled")
            spec["root"]["path"] = f"{stage}/root"
            if hooks:  # config.json is for the hooks; json costs ~3 ms of imports
                with open(f"{handle.bundle}/config.json", "w") as f:
                    json.dump(spec, f)
            from .hooks import run_hooks, state
            st = state(spec, "created", os.getpid(), handle.bundle, cid)
            for stage_name in ("createRuntime", "prestart", "createContainer"):
                run_hooks(spec, stage_name, st, warn=t)
            if hooks:
                t("hooks done")
            if spec["root"].get("readonly", True):
                _sys.mount_setattr(root_fd, "", _sys.AT_EMPTY_PATH, _sys.MOUNT_ATTR_RDONLY)
            if hooks.get("poststart") or hooks.get("poststop"):
                handle.host_root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if pivot:
                os.fchdir(root_fd)
                _sys.pivot_root(".", ".")
                _sys.umount2(".", _sys.MNT_DETACH)
                os.chdir("/")
        finally:
            os.close(root_fd)
        return handle
    except OSError as e:
        handle.close()
        raise MountError(f"cannot assemble the container root: {e}") from None
    except (MountError, HookError, LaunchError):
        handle.close()
        raise


_CLONE_FLAGS = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000}


def _unshare_extra(names):
    """New network, IPC and UTS namespaces of the container's own (--unshare); the new
    network namespace's loopback interface is brought up."""
    flags = 0
    for n in names:
        flags |= _CLONE_FLAGS[n]
    if not flags:
        return
    try:
        _sys.unshare(flags)
    except OSError as e:
        raise LaunchError(f"cannot unshare {','.join(names)}: {e.strerror}") from None
    if "net" in names:
        _loopback_up()


def _loopback_up():
    import _socket
    import fcntl
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    except OSError as e:
        raise LaunchError(f"cannot bring up the loopback interface: {e.strerror}") from None
    finally:
        s.close()


APT_SANDBOX = b'APT::Sandbox::User "root";\n'


def _assemble(root_fd, spec, privileged, writable):
    h = spec["hpcc"]
    # files in the overlay (tmpfs upper): the image itself is never changed
    own = h.get("files_owner")  # the image's root as the user (idmapped): theirs too
    old = read_file_in_root(root_fd, "/etc/passwd")
    write_file_in_root(root_fd, "/etc/passwd", _merge_lines(old, [h["passwd"]], (0, 2)),
                       writable, owner=own)
    old = read_file_in_root(root_fd, "/etc/group")
    write_file_in_root(root_fd, "/etc/group", _merge_lines(old, h["group"], (0, 2)), writable,
                       owner=own)
    for host in ("/etc/resolv.conf", "/etc/hosts"):
        data = _read_host(host)
        if data is not None:
            write_file_in_root(root_fd, host, data, writable, owner=own)
    if h.get("remap_root") and spec["root"].get("readonly") is False:
        # apt drops to its _apt user to download, which a one-id namespace cannot map
        try:
            fd = open_in_root(root_fd, "/etc/apt/apt.conf.d")
            os.close(fd)
            write_file_in_root(root_fd, "/etc/apt/apt.conf.d/00hpcc-remap-root", APT_SANDBOX,
                               writable, owner=h.get("files_owner"))
        except OSError:
            pass
    # binds are checked with the rights of the user outside (not of the remapped root)
    user_ctx = (_AsUser(h.get("host_user") or spec["process"]["user"]) if privileged
                else _NoCtx())
    for m in spec["mounts"]:
        _apply_mount(root_fd, m, privileged, writable, user_ctx)
    _dev_links(root_fd, writable)
    # the working directory: created (in tmpfs/overlay only) when the image lacks it
    os.close(resolve_target(root_fd, spec["process"]["cwd"], "dir", writable))
