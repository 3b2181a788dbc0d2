"""Root filesystem assembly (both modes share every step but the image mount).

Layout, in a tmpfs mounted on the per-user staging directory (a fixed, empty directory that
only ever carries mounts inside private mount namespaces, so nothing per launch is created on
the host): img/ (the squashfs: kernel loop mount or squashfuse_ll), upper/ + work/ (tmpfs
overlay layers), root/ (overlay of img under upper: mount points and injected files land in
tmpfs, never in the image), bundle/config.json (for hooks).

The parts: namespaces.py (mount/user namespaces, the staging directory), imagemount.py (the
image), inroot.py (paths inside the root: lookup and the writable-layer rule), identity.py
(acting as the job user), and here the mounts of the spec and setup_root.
"""
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import errno
import os
import stat
import struct

from ..errors import HookError, LaunchError, MountError
from . import _sys
from .children import fds_from_child, output_of_child
from .identity import AsUser, NoChange
from .imagemount import attach_mount, mount_image
from .inroot import (
    O_PATH_FLAGS,
    open_in_root,
    read_file_in_root,
    resolve_target,
    write_file_in_root,
)
from .namespaces import enter_namespaces, stage_dir, write_id_maps  # noqa: F401 (API)

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


# OCI mount options for a bind's propagation (private is every mount's default here)
_PROPAGATION = {"slave": _sys.MS_SLAVE, "rslave": _sys.MS_SLAVE,
                "unbindable": _sys.MS_UNBINDABLE, "runbindable": _sys.MS_UNBINDABLE}


def _bind(src_fd, tgt_fd, options, source=None):
    """Bind src_fd on tgt_fd. With slave/rslave, the bind is cloned from the host's mount
    namespace (source: its path there) and made a slave of it: mounts the host makes below
    it later show in the container, and nothing goes the other way."""
    flags = _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC | _sys.AT_EMPTY_PATH
    if "rbind" in options:
        flags |= _sys.AT_RECURSIVE
    prop = next((_PROPAGATION[o] for o in options if o in _PROPAGATION), 0)
    if prop == _sys.MS_SLAVE:
        tree = _host_clone(source, src_fd, flags & _sys.AT_RECURSIVE)
    else:
        tree = _sys.open_tree(src_fd, "", flags)
    try:
        attrs = _attrs(options)
        if attrs or prop:
            # propagation always on the whole tree: a submount left a peer of the host's
            # would carry mounts made in the container back out
            _sys.mount_setattr(tree, "", _sys.AT_EMPTY_PATH | _sys.AT_RECURSIVE, attrs, 0, 0,
                               prop)
        _sys.move_mount(tree, "", tgt_fd, "",
                        _sys.MOVE_MOUNT_F_EMPTY_PATH | _sys.MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(tree)


def _host_clone(path, src_fd, recursive):
    """A detached clone of the mount tree at `path` as the host's mount namespace has it
    (a child joins that namespace and passes the clone back), which must be the object
    src_fd (opened with the user's rights) is: a path swapped meanwhile is refused."""
    from .namespaces import host_mount_ns

    host = host_mount_ns()
    if host is None or not path:
        raise MountError(f"cannot bind {path} as a slave: only root-built containers "
                         "(the Slurm helper) can")

    def clone():
        _sys.setns(host, _sys.CLONE_NEWNS)
        return [_sys.open_tree(_sys.AT_FDCWD, path, _sys.OPEN_TREE_CLONE
                               | _sys.OPEN_TREE_CLOEXEC | recursive)]

    fds = fds_from_child(clone, 1)
    a, b = os.fstat(fds[0]), os.fstat(src_fd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(fds[0])
        raise MountError(f"cannot bind {path}: it changed while being bound")
    return fds[0]


def _open_source(m, user_ctx):
    """(O_PATH fd of a bind source on the host, whether it must be read-only). A user's
    source (origin user, home, cwd) is opened with the user's rights and must be readable
    by them; as root it is bound read-only unless the user may write it, so the bind gives
    nobody (root's hooks included) more than the user has on the host."""
    src = m["source"]
    check = m.get("x-hpcc-origin") in ("user", "home", "cwd")
    with user_ctx if check else NoChange():
        try:
            fd = os.open(src, O_PATH_FLAGS)
        except OSError as e:
            raise MountError(f"cannot bind {src}: {e.strerror}") from None
        readonly = False
        if check:
            want = os.R_OK | (os.X_OK if stat.S_ISDIR(os.fstat(fd).st_mode) else 0)
            if not os.access(f"/proc/self/fd/{fd}", want, effective_ids=True):
                os.close(fd)
                raise MountError(f"refusing to bind {src}: you cannot read it")
            readonly = getattr(user_ctx, "active", False) and not os.access(
                f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)
    return fd, readonly


def _apply_mount(root_fd, m, privileged, writable_devs, user_ctx):
    dest, typ, opts = m["destination"], m["type"], m.get("options", [])
    if typ == "bind":
        src_fd, readonly = _open_source(m, user_ctx)
        if readonly and "ro" not in opts:
            opts = [*opts, "ro"]
        try:
            is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
            tgt = resolve_target(root_fd, dest, "dir" if is_dir else "file", writable_devs)
            try:
                if stat.S_ISDIR(os.fstat(tgt).st_mode) != is_dir:
                    raise MountError(f"cannot bind {m['source']} on {dest}: one is a directory "
                                     "and the other is not")
                _bind(src_fd, tgt, opts, m["source"])
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
        self.warming = None  # warm.Warming of the command's files, when one runs

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


def _warm(spec, root, budget):
    from . import warm
    from .spec import spec_env
    return warm.start(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                      spec["process"]["args"][0],
                      spec_env(spec).get("PATH", "/usr/local/bin:/usr/bin:/bin"), budget)


def _overlay(stage, upper, work, fresh_upper, privileged, mounter, image):
    """Mount the overlay root on stage/root: the image (stage/img) under the upper layer.
    mounter (uid, gid): mount it from a child with those ids and this process's
    capabilities (SECBIT_NO_SETUID_FIXUP keeps them across setresuid)."""
    def mount():
        if fresh_upper:
            # the overlay's / takes the upper directory's owner and mode: the image's
            lst = os.stat(f"{stage}/img")
            os.chown(upper, lst.st_uid, lst.st_gid)
            os.chmod(upper, stat.S_IMODE(lst.st_mode))
        opts = (f"lowerdir={stage}/img,upperdir={upper},workdir={work}"
                + ("" if privileged else ",userxattr"))
        _sys.mount("overlay", f"{stage}/root", "overlay", _sys.MS_NOSUID | _sys.MS_NODEV, opts)

    try:
        if mounter is None:
            mount()
        else:
            _as_mounter(*mounter, mount)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"squashfuse_ll could not serve {image}",
                             hint="check that the file is an intact squashfs image") from None
        raise MountError(f"cannot mount the overlay root: {e.strerror}") from None


def _as_mounter(uid, gid, fn):
    """Run fn() in a child with uid/gid (real, effective, saved; no groups) and this
    process's capabilities; raise its OSError here (its errno is the child's exit code).
    The user cannot ptrace the child (it has capabilities they lack); they can kill it,
    which fails their own launch."""
    def child(_w):
        try:
            _sys.prctl(_sys.PR_SET_SECUREBITS,
                       _sys.SECBIT_NO_SETUID_FIXUP | _sys.SECBIT_NO_SETUID_FIXUP_LOCKED)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
            return 0
        except OSError as e:
            return e.errno or errno.EIO

    code, _ = output_of_child(child, 0)
    if code:
        code = code if 0 < code < 125 else errno.EIO  # killed, or not an errno
        raise OSError(code, os.strerror(code))


def setup_root(spec, privileged=False, *, container_id=None, pivot=True, log=None,
               premount=None):
    """Assemble the container's root in the calling process's (private) mount namespace,
    run the createRuntime/prestart/createContainer hooks, make the root read-only (unless
    spec['root']['readonly'] is false) and pivot_root into it. Returns a RootHandle.
    premount: (mount fd or None, why not) from imagemount.helper_mount (unprivileged)."""
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
        mount_fd, why = premount or (None, None)
        if mount_fd is not None:
            try:
                attach_mount(mount_fd, os.path.join(stage, "img"))
                t("image mounted (kernel, from the mount helper)")
            except OSError as e:
                mount_fd, why = None, f"cannot attach the mount helper's mount: {e.strerror}"
        fuse_idmapped = False
        if mount_fd is None:
            who = spec["process"]["user"]
            handle.fuse_pid, fuse_idmapped = mount_image(
                h["image"], os.path.join(stage, "img"), privileged,
                (who["uid"], who["gid"], who.get("additionalGids") or []),
                h.get("site_store", ""), idmap=h.get("idmap"))
            t("image mounted" + (f" (squashfuse_ll: {why})" if handle.fuse_pid and why else
                                 " (squashfuse_ll)" if handle.fuse_pid else " (kernel)"))
        if fuse_idmapped:
            h["files_owner"] = list(h["idmap"])
            t("image served for the user: its root's files are the user's")
        elif h.get("idmap") and handle.fuse_pid:
            t("no user-owned FUSE mount (the kernel refused): the image's files stay root's")
        elif h.get("idmap") and mount_fd is None:
            from .idmap import idmap_mount
            try:
                idmap_mount(f"{stage}/img", *h["idmap"])
                h["files_owner"] = list(h["idmap"])  # of the files hpcc writes in the root
                t("image idmapped: its root's files are the user's")
            except OSError as e:
                t(f"no idmapped mount ({e.strerror or e}): the image's files stay root's")
        upper = h.get("upper") or f"{stage}/upper"
        work = h.get("work") or f"{stage}/work"
        budget = spec["hpcc"].get("warm_bytes", 0) if spec["process"]["args"] else 0
        if budget > 0 and not fuse_idmapped:  # that mount is the user's alone: warm below
            handle.warming = _warm(spec, f"{stage}/img", budget)
        # A user-owned FUSE mount lets nobody else through, root included: the overlay's
        # mounter (whose rights it uses on its layers) is then the user, with root's
        # capabilities for the upper layer
        _overlay(stage, upper, work, h.get("fresh_upper", True), privileged,
                 tuple(h["idmap"]) if fuse_idmapped else None, spec["hpcc"]["image"])
        if budget > 0 and fuse_idmapped:
            handle.warming = _warm(spec, f"{stage}/root", budget)
        root_fd = os.open(f"{stage}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            writable = {os.fstat(root_fd).st_dev}
            _assemble(root_fd, spec, privileged, writable)
            t("root assembled")
            spec["root"]["path"] = f"{stage}/root"
            if hooks:  # config.json is for the hooks; json costs ~3 ms of imports
                spec["hpcc"]["writable_devs"] = sorted(writable)
                with open(f"{handle.bundle}/config.json", "w") as f:
                    json.dump(spec, f)
            from .ocihooks import run_hooks, state
            st = state(spec, "created", os.getpid(), handle.bundle, cid)
            for stage_name in ("createRuntime", "prestart", "createContainer"):
                run_hooks(spec, stage_name, st, warn=t)
            if hooks:
                t("hooks done")
            if spec["root"].get("readonly", True):
                _sys.mount_setattr(root_fd, "", _sys.AT_EMPTY_PATH, _sys.MOUNT_ATTR_RDONLY)
            if hooks.get("poststart") or hooks.get("poststop"):
                # A clone of the host's whole tree: pivot_root below detaches the old root,
                # and as root (mounts not locked) its submounts with it, so an fd of "/" alone
                # would show the hooks a host without its /tmp, /home, /opt...
                handle.host_root_fd = _sys.open_tree(
                    _sys.AT_FDCWD, "/",
                    _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC | _sys.AT_RECURSIVE)
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
                               writable, owner=own)
        except OSError:
            pass
    # binds are checked with the rights of the user outside (not of the remapped root)
    user_ctx = (AsUser.of_spec(h.get("host_user") or spec["process"]["user"]) if privileged
                else NoChange())
    for m in spec["mounts"]:
        _apply_mount(root_fd, m, privileged, writable, user_ctx)
    _dev_links(root_fd, writable)
    # the working directory: created (in tmpfs/overlay only) when the image lacks it
    os.close(resolve_target(root_fd, spec["process"]["cwd"], "dir", writable))
