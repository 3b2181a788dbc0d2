"""Idmapped image mounts: the image's root-owned files shown as the container user's.

A root-built container (slurmstepd, `hpcc run --user`) mounts the image with the kernel's
squashfs driver: its files belong to uid 0. For a writable container the job user must own
them, as they would in a rootless container or in an unpacked enroot root, or `touch
/newfile` fails. The kernel's idmapped mounts do this without touching a file: a clone of
the image mount carries the id map of a user namespace that maps the image's 0 to the user
(and every other id to itself), and the overlay above copies files up with the user as owner.

Needs Linux 5.12+ and a filesystem that allows idmapped mounts (squashfs does on current
kernels; FUSE only with servers that ask for it, which squashfuse_ll 0.1 does not): where
the kernel refuses, `idmap_mount` raises OSError and the caller keeps the plain mount.
"""
import errno
import os

from . import _sys
from .namespaces import write_id_maps

PR_SET_DUMPABLE = 4

MOUNT_ATTR_IDMAP = 0x00100000
MAX_ID = 4294967294  # (uid_t)-1 is not an id


def shift_root_map(host_id):
    """uid_map/gid_map lines mapping 0 to host_id and every other id to itself (host_id
    itself, whose host side 0 has taken, stays unmapped)."""
    if host_id == 0:
        return f"0 0 {MAX_ID + 1}\n"
    lines = [f"0 {host_id} 1"]
    if host_id > 1:
        lines.append(f"1 1 {host_id - 1}")
    if host_id < MAX_ID:
        lines.append(f"{host_id + 1} {host_id + 1} {MAX_ID - host_id}")
    return "\n".join(lines) + "\n"


def swap_root_map(host_id):
    """uid_map/gid_map lines exchanging 0 and host_id (every other id to itself): every
    host id stays mapped. A FUSE connection refuses requests (EOVERFLOW: a page fault on an
    exec'd binary then kills the process) from a process whose fsuid or fsgid its user
    namespace cannot map, and a job's group or a root hook may be anything."""
    if host_id == 0:
        return f"0 0 {MAX_ID + 1}\n"
    lines = [f"0 {host_id} 1", f"{host_id} 0 1"]
    if host_id > 1:
        lines.append(f"1 1 {host_id - 1}")
    if host_id < MAX_ID:
        lines.append(f"{host_id + 1} {host_id + 1} {MAX_ID - host_id}")
    return "\n".join(lines) + "\n"


def userns_with_maps(uid_map=None, gid_map=None, owner=None):
    """An fd of a new user namespace (root only): a child unshares it and waits while this
    process keeps an fd, then exits. Without `owner`, this process writes uid_map/gid_map
    (any ranges). With owner (uid, gid), the child takes those ids first, so that the
    namespace belongs to that user (a task running as them may join it with setns), and
    maps 0 to them itself."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            if owner is not None:
                os.setgroups([])
                os.setresgid(owner[1], owner[1], owner[1])
                os.setresuid(owner[0], owner[0], owner[0])
                _sys.prctl(PR_SET_DUMPABLE, 1)  # its /proc/self files are the owner's
            _sys.unshare(_sys.CLONE_NEWUSER)
            if owner is not None:
                write_id_maps(0, owner[0], 0, owner[1])
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reports
            pass
        os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "cannot create a user namespace")
        if owner is None:
            for name, data in (("uid_map", uid_map), ("gid_map", gid_map)):
                fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, data.encode())
                finally:
                    os.close(fd)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)


def idmap_mount(path, uid, gid):
    """Replace the mount on `path` by an idmapped clone in which the filesystem's 0 is
    uid/gid. Raises OSError when the kernel or the filesystem cannot."""
    ns = userns_with_maps(shift_root_map(uid), shift_root_map(gid))
    try:
        tree = _sys.open_tree(_sys.AT_FDCWD, path,
                              _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC)
        try:
            _sys.mount_setattr(tree, "", _sys.AT_EMPTY_PATH, MOUNT_ATTR_IDMAP, 0, ns)
            _sys.umount2(path, _sys.MNT_DETACH)
            _sys.move_mount(tree, "", _sys.AT_FDCWD, path, _sys.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(tree)
    finally:
        os.close(ns)
