"""Probes run in a forked child that takes its namespaces and mounts with it: the
unprivileged ones (a user namespace, squashfuse_ll, overlay, syscalls), as `nobody` when
run as root, and the kernel's (a loop mount of squashfs) when run as root."""
import errno
import json
import os
import select
import signal

from ..errors import HpccError

NOBODY = 65534
PROBE_TIMEOUT = 30
PR_SET_DUMPABLE = 4


def _fork_probe(fn, *args):
    """Run fn(*args) -> dict in a forked child; its dict, or {"error": ...} when it died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            out = {"error": f"{type(e).__name__}: {e}"}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], PROBE_TIMEOUT)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                data = json.dumps({"error": f"no answer in {PROBE_TIMEOUT} s"}).encode()
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    try:
        return json.loads(data or b'{"error": "the probe died"}')
    except ValueError:
        return {"error": "the probe's answer was garbled"}


def _err(e):
    return {"errno": errno.errorcode.get(e.errno, str(e.errno)), "error": e.strerror or str(e)}


def _drop_to_nobody():
    if os.geteuid() == 0:
        from ..runtime import _sys
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        # a uid change clears "dumpable", which makes /proc/self/uid_map root's again
        _sys.prctl(PR_SET_DUMPABLE, 1)


def _probe_image(path):
    """A tiny zstd squashfs image with one file, written by hpcc's own writer."""
    from ..squashfs.tree import Dir, File
    from ..squashfs.writer import SquashfsWriter

    with SquashfsWriter(path, compressor="zstd", workers=1) as w:
        data = w.add_bytes(b"hpcc doctor\n" * 64)
        w.finish(Dir(children={"probe": File(data=data)}))
    os.chmod(path, 0o644)


def _unprivileged_probe(work, image):
    """As the caller (or nobody): /dev/fuse, a user namespace, its capabilities, overlayfs,
    openat2, the new mount API, squashfuse_ll on the probe image."""
    from ..runtime import _sys, imagemount, namespaces

    _drop_to_nobody()
    out = {"uid": os.getuid()}
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        out["fuse_open"] = {"ok": True}
    except OSError as e:
        out["fuse_open"] = _err(e)
    uid, gid = os.getuid(), os.getgid()
    try:
        _sys.unshare(_sys.CLONE_NEWUSER | _sys.CLONE_NEWNS)
        out["userns"] = {"ok": True}
    except OSError as e:
        out["userns"] = _err(e)
        return out
    try:
        namespaces.write_id_maps(0, uid, 0, gid)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        _sys.mount("doctor", work, "tmpfs", 0, "mode=0755")
        out["userns_mount"] = {"ok": True}
    except OSError as e:
        out["userns_mount"] = _err(e)
        return out
    for d in ("lower", "upper", "work", "merged", "img", "tree"):
        os.mkdir(os.path.join(work, d))
    try:
        _sys.mount("overlay", f"{work}/merged", "overlay", _sys.MS_NOSUID | _sys.MS_NODEV,
                   f"lowerdir={work}/lower,upperdir={work}/upper,workdir={work}/work,userxattr")
        out["overlay"] = {"ok": True}
    except OSError as e:
        out["overlay"] = _err(e)
    root_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(_sys.openat2(root_fd, "/lower", os.O_PATH | os.O_CLOEXEC,
                              _sys.RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS))
        out["openat2"] = {"ok": True}
    except OSError as e:
        out["openat2"] = _err(e)
    try:
        fd = _sys.open_tree(_sys.AT_FDCWD, f"{work}/lower",
                            _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC)
        try:
            _sys.move_mount(fd, "", _sys.AT_FDCWD, f"{work}/tree",
                            _sys.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(fd)
        _sys.mount_setattr(_sys.AT_FDCWD, f"{work}/tree", 0, _sys.MOUNT_ATTR_RDONLY)
        out["mount_api"] = {"ok": True}
    except OSError as e:
        out["mount_api"] = _err(e)
    if image:
        try:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pid, _ = imagemount._fuse_mount(fd, f"{work}/img", image, False)
            finally:
                os.close(fd)
            try:
                with open(f"{work}/img/probe", "rb") as f:
                    ok = f.read() == b"hpcc doctor\n" * 64
                out["squashfuse"] = {"ok": ok} if ok else {"error": "read back wrong bytes"}
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except HpccError as e:
            out["squashfuse"] = {"error": str(e)}
        except OSError as e:
            out["squashfuse"] = _err(e)
    return out


def _kernel_probe(work, image):
    """As root: a loop device ("loop") and a kernel squashfs mount of the zstd probe image
    ("kernel_squashfs", None when no loop device got that far)."""
    from ..runtime import _sys, imagemount

    out = {"loop": None, "kernel_squashfs": None}
    _sys.unshare(_sys.CLONE_NEWNS)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        imagemount._loop_mount(fd, work, image)
        out["loop"] = {"ok": True}
        with open(f"{work}/probe", "rb") as f:
            ok = f.read() == b"hpcc doctor\n" * 64
        out["kernel_squashfs"] = {"ok": ok} if ok else {"error": "read back wrong bytes"}
    except HpccError as e:
        if "loop device" in e.message:     # attaching failed: the mount was not tried
            out["loop"] = {"error": str(e)}
        else:
            out["loop"] = {"ok": True}
            out["kernel_squashfs"] = {"error": str(e)}
    except OSError as e:                   # /dev/loop-control or LOOP_CTL_GET_FREE
        out["loop"] = _err(e)
    finally:
        os.close(fd)
    return out
