"""The Linux system calls the runtime needs, and their constants.

Python 3.11 has no os.unshare/mount/pivot_root; the calls come from hpcc.runtime._linux, a
small C extension built at install time (ctypes would cost 3-4 ms of imports on every
launch). Every call raises OSError with errno set, like the os module does.
"""
import os

from ._linux import close_range as _close_range
from ._linux import (  # noqa: F401
    drop_all_capabilities,
    drop_bounding,
    fsconfig,
    fsmount,
    fsopen,
    mount,
    mount_setattr,
    move_mount,
    open_tree,
    openat2,
    pivot_root,
    prctl,
    setns,
    umount2,
    unshare,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_UNBINDABLE = 1 << 17
MNT_DETACH = 2

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3


def capabilities_effective():
    """The effective capability mask of this process (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def close_range(first, last=0xFFFFFFFF):
    """Close fds first..last in one system call (Linux >= 5.9); falls back to /proc/self/fd."""
    if _close_range(first, last):
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if first <= fd <= last:
            try:
                os.close(fd)
            except OSError:
                pass
