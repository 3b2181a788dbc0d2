"""Run as an unprivileged user by test_mount_helper.py: get a mount fd of IMAGE from HELPER
the way the launcher does, attach it in a new user+mount namespace, and print as JSON what
the caller can see and do with it (the test asserts on it)."""
import _socket
import json
import os
import sys

from hpcc.runtime import _sys

helper, image = sys.argv[1], sys.argv[2]
img = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
pid = os.posix_spawn(helper, [helper, image], {}, file_actions=[
    (os.POSIX_SPAWN_DUP2, img, 0), (os.POSIX_SPAWN_DUP2, theirs.fileno(), 1)])
theirs.close()
_, anc, _, _ = ours.recvmsg(1, _socket.CMSG_SPACE(4))
out = {"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}
fds = [int.from_bytes(d[:4], sys.byteorder) for _, t, d in anc if t == _socket.SCM_RIGHTS]
if not fds:
    print(json.dumps(out))
    sys.exit(0)
mnt = fds[0]
uid, gid = os.getuid(), os.getgid()
# before attaching, in the caller's own (initial) namespaces: nothing may be changed
for name, attr in (("detached_clear_nosuid", _sys.MOUNT_ATTR_NOSUID),
                   ("detached_clear_nodev", _sys.MOUNT_ATTR_NODEV)):
    try:
        _sys.mount_setattr(mnt, "", _sys.AT_EMPTY_PATH, 0, attr)
        out[name] = "allowed"
    except OSError as e:
        out[name] = e.strerror
_sys.unshare(_sys.CLONE_NEWUSER | _sys.CLONE_NEWNS)
for f, data in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"), ("gid_map", f"0 {gid} 1\n")):
    with open(f"/proc/self/{f}", "w") as fh:
        fh.write(data)
_sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
_sys.mount("probe", "/tmp", "tmpfs", 0, None)
os.mkdir("/tmp/img")
_sys.move_mount(mnt, "", _sys.AT_FDCWD, "/tmp/img", _sys.MOVE_MOUNT_F_EMPTY_PATH)
out["entries"] = {n: [os.lstat(f"/tmp/img/{n}").st_uid, oct(os.lstat(f"/tmp/img/{n}").st_mode)]
                  for n in sorted(os.listdir("/tmp/img"))}
with open("/tmp/img/hello", "rb") as f:
    out["hello"] = f.read().decode()
out["options"] = [ln.split()[5] for ln in open("/proc/self/mountinfo") if " /tmp/img " in ln]
try:
    os.close(os.open("/tmp/img/devnull", os.O_RDONLY))
    out["open_device_node"] = "allowed"
except OSError as e:
    out["open_device_node"] = e.strerror
for name, fn in (
        ("clear_nodev", lambda: _sys.mount_setattr(
            _sys.AT_FDCWD, "/tmp/img", 0, 0, _sys.MOUNT_ATTR_NODEV)),
        ("clear_nosuid", lambda: _sys.mount_setattr(
            _sys.AT_FDCWD, "/tmp/img", 0, 0, _sys.MOUNT_ATTR_NOSUID)),
        ("clear_rdonly", lambda: _sys.mount_setattr(
            _sys.AT_FDCWD, "/tmp/img", 0, 0, _sys.MOUNT_ATTR_RDONLY)),
        ("remount_bind", lambda: _sys.mount(
            None, "/tmp/img", None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY)),
        ("remount_rw", lambda: _sys.mount(None, "/tmp/img", None, _sys.MS_REMOUNT))):
    try:
        fn()
        out[name] = "allowed"
    except OSError as e:
        out[name] = e.strerror
print(json.dumps(out))
