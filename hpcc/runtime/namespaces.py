"""The launch's namespaces: a private mount namespace (and, unprivileged, a user namespace
mapping the caller to themselves), and the fixed per-user staging directory the launch's
tmpfs is mounted on inside that namespace."""
import os
import stat

from ..errors import LaunchError
from . import _sys

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
            from .userns import launch_message
            raise LaunchError(launch_message(e.errno, e.strerror)) from None
        # Setup namespace: the caller is root in it, so that image files owned by root
        # (uid 0 in the squashfs) map to the caller and the overlay can copy them up.
        # exec_process nests a second user namespace that maps the caller to themselves.
        try:
            write_id_maps(0, uid, 0, gid)
            _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        except PermissionError as e:
            # AppArmor's restriction lets unshare succeed and takes the namespace's
            # capabilities away: the first mount is where it shows.
            from .userns import launch_message
            raise LaunchError(launch_message(e.errno, e.strerror)) from None
        return
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


def host_mount_ns():
    """fd of the mount namespace the privileged caller had before enter_namespaces (for the
    FUSE daemon, which must not pin the container's), or None."""
    return _HOST_MNT_NS
