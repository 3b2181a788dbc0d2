"""`hpcc doctor`: check that this host can run hpcc's containers, and say how to fix what
cannot.

Each check does the real thing where it can (a user namespace, a FUSE mount of a small
squashfs image with squashfuse_ll, an overlay inside the namespace, a kernel loop mount when
run as root, `srun --help` with the plugin, the MPI and GPU hooks' own planning on an image)
and otherwise reads the setting that decides it. Probes that change namespaces or mount run
in a forked child, which takes its mounts with it when it exits; as root, the unprivileged
probes run as `nobody`, because that is who they are about.

JSON (`--json`, schema "hpcc-doctor/1", documented in docs/doctor.md):
    {"schema": "hpcc-doctor/1", "ok": bool, "user": {"uid": N, "name": S},
     "checks": [{"id": S, "title": S, "status": "ok"|"warn"|"fail"|"off"|"skip",
                 "summary": S, "fix": S|null, "details": {...}}, ...]}
Exit status: 0 when no check failed, 1 when one did, 2 for a bad command line.
"""
import errno
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

from .errors import HpccError, UsageError
from .runtime import userns

SCHEMA = "hpcc-doctor/1"
STATUSES = ("ok", "warn", "fail", "off", "skip")
NOBODY = 65534
PROBE_TIMEOUT = 30
PR_SET_DUMPABLE = 4

USAGE = """\
usage: hpcc doctor [--json] [--image IMAGE]

Check that this host can run hpcc containers: unprivileged user namespaces (sysctls,
AppArmor), /dev/fuse, squashfuse_ll, kernel squashfs with zstd, overlayfs in a user
namespace, loop devices, openat2 and the new mount API, the image stores, the gateway
service, the setuid mount helper, the Slurm plugin, the host's MPI and NVIDIA driver. Each
problem comes with its fix.

options:
  --image IMAGE   also mount IMAGE as a launch would, and say whether the MPI hook accepts
                  its MPI (and why not) and what the GPU hook would inject
  --json          print the report as JSON (schema: docs/doctor.md)
  -h, --help      show this help

Exit status: 0 when every check passed (or is not set up here), 1 when one failed.
"""


class Check:
    def __init__(self, id, title, status, summary, fix=None, **details):
        assert status in STATUSES
        self.id, self.title, self.status, self.summary, self.fix = id, title, status, summary, fix
        self.details = details

    def as_dict(self):
        return {"id": self.id, "title": self.title, "status": self.status,
                "summary": self.summary, "fix": self.fix, "details": self.details}


# ------------------------------------------------------------------------------------------
# forked probes


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
        from .runtime import _sys
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        # a uid change clears "dumpable", which makes /proc/self/uid_map root's again
        _sys.prctl(PR_SET_DUMPABLE, 1)


def _probe_image(path):
    """A tiny zstd squashfs image with one file, written by hpcc's own writer."""
    from .squashfs.tree import Dir, File
    from .squashfs.writer import SquashfsWriter

    with SquashfsWriter(path, compressor="zstd", workers=1) as w:
        data = w.add_bytes(b"hpcc doctor\n" * 64)
        w.finish(Dir(children={"probe": File(data=data)}))
    os.chmod(path, 0o644)


def _unprivileged_probe(work, image):
    """As the caller (or nobody): /dev/fuse, a user namespace, its capabilities, overlayfs,
    openat2, the new mount API, squashfuse_ll on the probe image."""
    from .runtime import _sys, imagemount, namespaces

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
                pid = imagemount._fuse_mount(fd, f"{work}/img", image, False)
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
    from .runtime import _sys, imagemount

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


# ------------------------------------------------------------------------------------------
# host checks


def _slurm_plugin_configured(slurm):
    return bool(slurm and slurm.get("lines"))


def check_userns(probe, slurm):
    values = userns.settings()
    from .apparmor import profile_path
    aa = profile_path(sys.executable)
    details = {"sysctls": values, "probe": probe.get("userns"), "as_uid": probe.get("uid"),
               "interpreter": sys.executable,
               "interpreter_is_link": os.path.islink(sys.executable),
               "apparmor_profile": aa if os.path.exists(aa) else None}
    res = probe.get("userns") or {}
    mnt = probe.get("userns_mount") or {}
    if res.get("ok") and mnt.get("ok"):
        extra = ""
        if values.get("kernel.apparmor_restrict_unprivileged_userns") == 1:
            extra = " (AppArmor restricts them; hpcc's interpreter has a profile allowing them)"
        return Check("host.userns", "unprivileged user namespaces", "ok",
                     "unprivileged users can create user namespaces and mount in them" + extra,
                     **details)
    num = getattr(errno, res.get("errno") or mnt.get("errno") or "", None)
    cause, fix = userns.explain(num, values)
    where = ("creating one" if not res.get("ok") else
             "mounting in one (" + (mnt.get("error") or "?") + ")")
    summary = f"unprivileged user namespaces do not work ({where}): {cause}"
    fix = (f"{fix[0].upper()}{fix[1:]}; until then, {userns.SLURM_CHOICE[3:]}"
           if fix else None)
    # A site that runs everything through Slurm may switch them off on purpose.
    status = "warn" if _slurm_plugin_configured(slurm) else "fail"
    if status == "warn":
        summary += "; `hpcc run` cannot work here, srun --container-image can"
    return Check("host.userns", "unprivileged user namespaces", status, summary, fix,
                 **details)


def check_fuse(probe):
    title = "/dev/fuse"
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        return Check("host.fuse", title, "fail", "/dev/fuse does not exist: unprivileged "
                     "containers and user-owned images need FUSE",
                     "load the module: modprobe fuse (and add fuse to /etc/modules-load.d/)")
    mode = stat.S_IMODE(st.st_mode)
    details = {"mode": f"{mode:04o}", "uid": st.st_uid, "gid": st.st_gid,
               "char_device": stat.S_ISCHR(st.st_mode), "probe": probe.get("fuse_open")}
    res = probe.get("fuse_open") or {}
    if not stat.S_ISCHR(st.st_mode):
        return Check("host.fuse", title, "fail", "/dev/fuse is not a character device",
                     "recreate it: rm /dev/fuse; mknod -m 0666 /dev/fuse c 10 229", **details)
    if not res.get("ok"):
        return Check("host.fuse", title, "fail",
                     f"unprivileged users cannot open /dev/fuse (mode {mode:04o}, "
                     f"{res.get('error', 'unknown error')})",
                     "make it mode 0666, as udev does by default: chmod 0666 /dev/fuse, and "
                     "a udev rule KERNEL==\"fuse\", MODE=\"0666\" so it stays so", **details)
    return Check("host.fuse", title, "ok", f"mode {mode:04o}, usable by unprivileged users",
                 **details)


def squashfuse_version(exe):
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10,
                           check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"squashfuse\S*\s+(\d+(?:\.\d+)+)", p.stdout + p.stderr)
    return m.group(1) if m else None


def check_squashfuse(probe):
    from .runtime.imagemount import _find_exe

    exe = _find_exe("squashfuse_ll")
    if not exe:
        return Check("host.squashfuse", "squashfuse_ll", "fail",
                     "squashfuse_ll is not installed (it serves images to unprivileged "
                     "containers and user-owned images under Slurm)",
                     "install the squashfuse package (apt install squashfuse; "
                     "dnf install squashfuse)", path=None, version=None)
    version = squashfuse_version(exe)
    res = probe.get("squashfuse")
    details = {"path": exe, "version": version, "probe": res}
    if res is None:
        return Check("host.squashfuse", "squashfuse_ll", "skip",
                     f"{exe} (version {version or 'unknown'}); its mount was not tried: "
                     "no user namespace to try it in", **details)
    if not res.get("ok"):
        return Check("host.squashfuse", "squashfuse_ll", "fail",
                     f"{exe} (version {version or 'unknown'}) could not serve a zstd image: "
                     f"{res.get('error')}",
                     "install a squashfuse built with zstd (squashfuse >= 0.1.103 from the "
                     "distribution)", **details)
    return Check("host.squashfuse", "squashfuse_ll", "ok",
                 f"{exe} (version {version or 'unknown'}) serves zstd images in a user "
                 "namespace", **details)


def _kernel_config(option):
    """'y', 'm', 'n' or None (no config found) for CONFIG_<option> of the running kernel."""
    rel = os.uname().release
    for path in (f"/boot/config-{rel}", "/proc/config.gz"):
        try:
            if path.endswith(".gz"):
                import gzip
                with gzip.open(path, "rt") as f:
                    text = f.read()
            else:
                with open(path) as f:
                    text = f.read()
        except OSError:
            continue
        m = re.search(rf"^CONFIG_{option}=(\w)", text, re.MULTILINE)
        return m.group(1) if m else "n"
    return None


def check_kernel_squashfs(kprobe):
    title = "kernel squashfs with zstd"
    try:
        with open("/proc/filesystems") as f:
            listed = any(line.split()[-1] == "squashfs" for line in f if line.strip())
    except OSError:
        listed = False
    zstd = _kernel_config("SQUASHFS_ZSTD")
    res = (kprobe or {}).get("kernel_squashfs")
    details = {"in_proc_filesystems": listed, "config_squashfs_zstd": zstd, "probe": res}
    fix = ("use a kernel with CONFIG_SQUASHFS=y and CONFIG_SQUASHFS_ZSTD=y (or modprobe "
           "squashfs), or make the gateway write gzip images (gateway.compressor = \"gzip\")")
    if res is not None:
        if res.get("ok"):
            return Check("host.kernel_squashfs", title, "ok",
                         "the kernel mounts zstd squashfs images (loop mount tried)", **details)
        return Check("host.kernel_squashfs", title, "fail",
                     f"the kernel could not mount a zstd squashfs image: {res.get('error')}",
                     fix, **details)
    if kprobe is not None:
        return Check("host.kernel_squashfs", title, "skip",
                     "not tried: no loop device to mount the image from (see host.loop)",
                     **details)
    if zstd == "n" or (zstd is None and not listed):
        return Check("host.kernel_squashfs", title, "warn",
                     "this kernel may lack squashfs with zstd (root and Slurm launches mount "
                     "site images with it)", fix, **details)
    return Check("host.kernel_squashfs", title, "skip",
                 "squashfs is " + ("listed in /proc/filesystems" if listed else "a module")
                 + "; a real mount needs root (run hpcc doctor as root to try one)", **details)


def check_overlay(probe):
    res = probe.get("overlay")
    if res is None:
        return Check("host.overlay", "overlayfs in a user namespace", "skip",
                     "not tried: no user namespace to try it in")
    if res.get("ok"):
        return Check("host.overlay", "overlayfs in a user namespace", "ok",
                     "overlayfs mounts in a user namespace (userxattr)", probe=res)
    return Check("host.overlay", "overlayfs in a user namespace", "fail",
                 f"overlayfs cannot be mounted in a user namespace: {res.get('error')}",
                 "use Linux >= 5.11 (overlayfs in user namespaces, userxattr)", probe=res)


def check_loop(kprobe):
    title = "loop devices"
    ctl = os.path.exists("/dev/loop-control")
    if kprobe is not None:
        res = kprobe.get("loop") or {"error": kprobe.get("error", "the probe died")}
        if res.get("ok"):
            return Check("host.loop", title, "ok", "a loop device was attached and released",
                         loop_control=ctl, probe=res)
        return Check("host.loop", title, "fail", f"no usable loop device: {res.get('error')}",
                     "load the loop module (modprobe loop), and give root /dev/loop-control "
                     "and /dev/loopN (a container needs them passed in)",
                     loop_control=ctl, probe=res)
    if not ctl:
        return Check("host.loop", title, "warn",
                     "/dev/loop-control is missing: root and Slurm launches cannot mount site "
                     "images with the kernel (squashfuse_ll serves them instead, slower)",
                     "load the loop module (modprobe loop)", loop_control=ctl)
    return Check("host.loop", title, "skip", "/dev/loop-control exists; attaching a loop "
                 "device needs root", loop_control=ctl)


def check_mount_helper(config):
    """The setuid mount helper (launcher.mount_helper): kernel mounts of site images for
    unprivileged launches. Without it squashfuse_ll serves them (slower with many files).
    Installed setuid root, replaceable by nobody else, on a filesystem that honours setuid;
    then run for real on a path outside any store, which it must refuse naming the site store
    it reads (from its own compiled-in config): the launcher's, or its images get no kernel
    mount."""
    import socket

    from .runtime.spec import site_store
    title = "mount helper (setuid)"
    path = ((config.get("launcher") or {}).get("mount_helper") or "").strip()
    fallback = "unprivileged launches serve site images with squashfuse_ll (slower)"
    off = 'or set launcher.mount_helper = ""'
    if not path:
        return Check("host.mount_helper", title, "off",
                     f"launcher.mount_helper is off: {fallback}", path=None)
    try:
        st = os.stat(path)
        nosuid = bool(os.statvfs(path).f_flag & os.ST_NOSUID)
    except OSError as e:
        return Check("host.mount_helper", title, "warn",
                     f"{path} (launcher.mount_helper): {e.strerror}; {fallback}",
                     f"run `make install` as root (installs it setuid root), {off}", path=path)
    mode = stat.S_IMODE(st.st_mode)
    details = {"path": path, "mode": f"{mode:04o}", "uid": st.st_uid, "nosuid_mount": nosuid}
    if mode & 0o022 or st.st_uid != 0:
        return Check("host.mount_helper", title, "fail",
                     f"{path} is setuid-capable but owned by uid {st.st_uid} with mode "
                     f"{mode:04o}: someone other than root can replace it",
                     f"chown root:root {path} && chmod 4755 {path}", **details)
    if not mode & stat.S_ISUID or nosuid:
        why = "not setuid" if not mode & stat.S_ISUID else "on a nosuid filesystem"
        return Check("host.mount_helper", title, "warn", f"{path} is {why}: {fallback}",
                     f"chmod 4755 {path} (as installed by make install), on a filesystem "
                     f"mounted without nosuid; {off}", **details)
    store = site_store(config)
    ours, theirs = socket.socketpair()
    try:
        with open(os.devnull, "rb") as null:
            p = subprocess.run([path, "/"], stdin=null, stdout=theirs.fileno(),
                               stderr=subprocess.PIPE, env={}, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("host.mount_helper", title, "warn",
                     f"{path} does not run: {getattr(e, 'strerror', None) or e}; {fallback}",
                     f"reinstall it (make install), {off}", **details)
    finally:
        ours.close()
        theirs.close()
    said = p.stderr.decode(errors="replace").strip().removeprefix("hpcc-mount: ")
    m = re.fullmatch(r"/ is not in the site store (.+)", said)
    if p.returncode != 1 or not m:
        return Check("host.mount_helper", title, "warn", f"{path} does not answer as the mount "
                     f"helper does (exit {p.returncode}: {said or 'nothing said'}); {fallback}",
                     "fix what it says (its site config must be root's, in root's directories, "
                     f"with [store] path a plain string), or reinstall it; {off}", **details)
    details.update(helper_store=m.group(1), store=store)
    if m.group(1) != store:
        return Check("host.mount_helper", title, "warn", f"{path} reads the site store "
                     f"{m.group(1)} (from its own config), the launcher {store}: images there "
                     "get no kernel mount", "make [store] path of the root-owned site config "
                     "the helper was built with (/etc/hpcc/hpcc.toml by default) name the site "
                     f"store; {off}", **details)
    return Check("host.mount_helper", title, "ok", f"{path} is setuid root and reads the site "
                 f"store {store}: unprivileged launches get kernel mounts of its images",
                 **details)


def check_syscalls(probe):
    title = "openat2 and the new mount API"
    res = {k: probe.get(k) for k in ("openat2", "mount_api")}
    if res["openat2"] is None:
        return Check("host.syscalls", title, "skip", "not tried: no user namespace to try "
                     "them in", probe=res)
    bad = {k: v for k, v in res.items() if not v.get("ok")}
    if not bad:
        return Check("host.syscalls", title, "ok", "openat2(RESOLVE_IN_ROOT), open_tree, "
                     "move_mount and mount_setattr work", probe=res)
    what = "; ".join(f"{k}: {v.get('error')}" for k, v in bad.items())
    fix = ("use Linux >= 5.12 (openat2 5.6, mount_setattr 5.12), and a seccomp profile that "
           "allows them")
    if list(bad) == ["openat2"]:
        # the in-root module falls back to a component-by-component O_NOFOLLOW walk
        return Check("host.syscalls", title, "warn", f"openat2 is refused ({what}): paths "
                     "inside containers are resolved by hpcc's slower fallback walk", fix,
                     probe=res)
    return Check("host.syscalls", title, "fail", f"missing system calls ({what}): hpcc "
                 "cannot bind mounts into a container", fix, probe=res)


# ------------------------------------------------------------------------------------------
# stores and service


def _store_check(id, title, path, must_exist):
    if not os.path.exists(path):
        if must_exist:
            return Check(id, title, "warn", f"{path} does not exist (no site images yet)",
                         "pull one: gateway pull IMAGE (as the store's owner)", path=path)
        return Check(id, title, "ok", f"{path} does not exist yet; `hpcc pull` creates it",
                     path=path)
    if not os.path.isdir(path):
        return Check(id, title, "fail", f"{path} is not a directory",
                     f"fix store path in hpcc.toml, or remove {path}", path=path)
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(id, title, "fail", f"{path} is not readable by you",
                     f"chmod a+rx {path} (images must be readable by their users)", path=path)
    refs = os.path.join(path, "refs")
    if os.path.isdir(refs) and not os.access(refs, os.R_OK | os.X_OK):
        return Check(id, title, "fail", f"{refs} is not readable by you",
                     f"chmod -R a+rX {refs}", path=path)
    return Check(id, title, "ok", f"{path} is readable", path=path)


def check_stores(config):
    from .store import Store
    out = [_store_check("store.site", "site image store", Store.site(config).root, True)]
    try:
        user = Store.user(config).root
    except HpccError as e:
        out.append(Check("store.user", "your image store", "warn", str(e)))
    else:
        out.append(_store_check("store.user", "your image store", user, False))
    return out


def check_service(config):
    """The gateway service, asked for its status over the same connection `hpcc pull` uses
    (its UNIX socket on this host, else TCP + munge to service.address)."""
    svc = config.get("service") or {}
    title = "gateway service"
    where = {"socket": svc.get("socket"), "address": svc.get("address") or None}
    if not svc.get("enabled"):
        return Check("gateway.service", title, "off", "the gateway service is not enabled "
                     "(service.enabled = false): pulls convert in the caller's process",
                     **where)
    from .gateway.service_client import call
    try:
        res = call(config, {"op": "status"}, timeout=10)
    except HpccError as e:
        return Check("gateway.service", title, "fail", str(e.message),
                     "start it (systemctl start hpcc-gateway, or `gateway serve` as the "
                     "store's owner), or set service.enabled = false", **where)
    except OSError as e:
        return Check("gateway.service", title, "fail",
                     f"the gateway service did not answer: {e.strerror or e}",
                     "check the service's log (journalctl -u hpcc-gateway)", **where)
    status = res.get("status") if isinstance(res.get("status"), dict) else {}
    return Check("gateway.service", title, "ok", "the gateway service answers"
                 + (f" (store {status['store']})" if status.get("store") else ""),
                 **where, answer=status)


# ------------------------------------------------------------------------------------------
# Slurm


def _slurm_conf():
    return os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"


def _conf_value(text, key):
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        k, sep, v = line.partition("=")
        if sep and k.strip().lower() == key.lower():
            return v.strip()
    return None


def _plugstack_lines(path, depth=0):
    """(spank_hpcc lines, files read) of a plugstack.conf, following `include` globs."""
    import glob
    lines, files = [], [path]
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return lines, []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "include" and len(words) > 1 and depth < 4:
            pattern = words[1]
            if not pattern.startswith("/"):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for p in sorted(glob.glob(pattern)):
                more, seen = _plugstack_lines(p, depth + 1)
                lines += more
                files += seen
        elif len(words) > 1 and os.path.basename(words[1]).startswith("spank_hpcc"):
            lines.append({"file": path, "line": line, "plugin": words[1],
                          "args": words[2:], "required": words[0] == "required"})
    return lines, files


def slurm_facts():
    conf = _slurm_conf()
    srun = shutil.which("srun")
    facts = {"slurm_conf": conf, "srun": srun, "lines": [], "plugstack": None,
             "plugstack_files": []}
    try:
        with open(conf) as f:
            text = f.read()
    except OSError:
        facts["slurm_conf"] = None
        return facts
    plug = _conf_value(text, "PlugStackConfig") or os.path.join(os.path.dirname(conf),
                                                               "plugstack.conf")
    facts["plugstack"] = plug
    facts["lines"], facts["plugstack_files"] = _plugstack_lines(plug)
    facts["oci_conf"] = os.path.join(os.path.dirname(conf), "oci.conf")
    return facts


def check_slurm(facts):
    out = []
    if not facts["srun"] and not facts["slurm_conf"]:
        return [Check("slurm.plugin", "Slurm plugin", "off", "no Slurm on this host (no srun, "
                      f"no {_slurm_conf()})")]
    if not facts["slurm_conf"]:
        what = "is not readable" if os.path.exists(_slurm_conf()) else "does not exist"
        return [Check("slurm.plugin", "Slurm plugin", "skip",
                      f"srun is installed but {_slurm_conf()} {what} (configless Slurm, or "
                      "set SLURM_CONF): the plugin was not checked")]
    lines = facts["lines"]
    if not lines:
        out.append(Check("slurm.plugstack", "Slurm plugstack line", "off",
                         f"{facts['plugstack']} does not load spank_hpcc.so: "
                         "srun --container-image is not set up on this host",
                         "add `required /usr/lib/hpcc/spank_hpcc.so python=/opt/hpcc/venv/bin/"
                         "python3` to it on every node (docs/slurm.md)",
                         plugstack=facts["plugstack"], files=facts["plugstack_files"]))
    else:
        problems = []
        for ln in lines:
            if not os.path.isfile(ln["plugin"]):
                problems.append(f"{ln['plugin']} (in {ln['file']}) does not exist")
            args = dict(a.split("=", 1) for a in ln["args"] if "=" in a)
            py = args.get("python", "/opt/hpcc/venv/bin/python3")
            if not os.access(py, os.X_OK):
                problems.append(f"python={py} is not an executable")
            cfg = args.get("config")
            if cfg and not os.path.isfile(cfg):
                problems.append(f"config={cfg} does not exist")
        if len(lines) > 1:
            problems.append(f"spank_hpcc.so is loaded {len(lines)} times")
        st = "fail" if problems else "ok"
        out.append(Check("slurm.plugstack", "Slurm plugstack line", st,
                         "; ".join(problems) if problems else
                         f"{lines[0]['file']}: {lines[0]['line']}",
                         "fix the line in plugstack.conf (docs/slurm.md)" if problems else None,
                         plugstack=facts["plugstack"], lines=lines))
        if facts["srun"]:
            env = dict(os.environ, SLURM_CONF=_slurm_conf())
            try:
                p = subprocess.run([facts["srun"], "--help"], capture_output=True, text=True,
                                   env=env, timeout=30, check=False)
                text = p.stdout + p.stderr
            except (OSError, subprocess.SubprocessError) as e:
                text = f"srun --help failed: {e}"
            if "--container-image" in text and "[hpcc]" in text:
                out.append(Check("slurm.plugin", "Slurm plugin", "ok",
                                 "srun --help shows hpcc's --container-* options"))
            else:
                tail = " ".join(line.strip() for line in text.splitlines()
                                if "spank" in line.lower() or "error" in line.lower())[:300]
                out.append(Check("slurm.plugin", "Slurm plugin", "fail",
                                 "srun --help does not show hpcc's options: Slurm did not "
                                 "load spank_hpcc.so" + (f" ({tail})" if tail else ""),
                                 "check the plugstack line and that the .so was built for "
                                 "this Slurm (make -C spank)", srun_messages=tail))
    oci = facts.get("oci_conf")
    if oci and os.path.exists(oci):
        out.append(Check("slurm.oci_conf", "Slurm oci.conf", "warn" if lines else "off",
                         f"{oci} exists: Slurm handles --container=X itself (its OCI "
                         "bundles), so users must write --container-image=X for hpcc",
                         f"remove {oci} if --container should mean hpcc images "
                         "(docs/slurm.md)", path=oci))
    elif oci:
        out.append(Check("slurm.oci_conf", "Slurm oci.conf", "ok", "no oci.conf: "
                         "--container=IMAGE reaches hpcc", path=oci))
    return out


# ------------------------------------------------------------------------------------------
# MPI and NVIDIA


class _NoLibraries:
    """A container with no libraries of its own: the MPI hook's closure then holds every
    host library it could inject."""

    @staticmethod
    def find(soname, **kw):
        return None


def check_mpi(config):
    from .hooks.libraries import HostLibraries
    from .hooks.mpi import _closure, _glibc_version, host_mpi_libraries
    from .hooks.plan import Plan
    configured = bool((config.get("mpi") or {}).get("libraries"))
    hostlibs = HostLibraries()
    try:
        host = host_mpi_libraries(config, hostlibs)
        roots = list(host.values())
        members, glibc = _closure(roots, hostlibs, _NoLibraries(), Plan())
    except HpccError as e:
        return Check("mpi.host", "host MPI (MPICH ABI)", "fail" if configured else "off",
                     str(e), "set mpi.libraries in hpcc.toml to the host's libmpi.so.12"
                     if configured else "install the site's MPICH-ABI MPI (MPICH, Intel MPI, "
                     "Cray MPICH, MVAPICH) for --mpi", libraries={})
    libs = {fam: {"soname": h.soname, "path": h.path, "file": h.real}
            for fam, h in host.items()}
    deps = [{"soname": m.soname, "file": m.real} for m in members]
    need = _glibc_version({v for vs in glibc.values() for v in vs})
    need_s = ".".join(map(str, need[:2])) if need else None
    mcfg = config.get("mpi") or {}
    return Check("mpi.host", "host MPI (MPICH ABI)", "ok",
                 f"--mpi binds {host['c'].real} ({host['c'].soname})"
                 + "".join(f", {h.real}" for f, h in host.items() if f != "c")
                 + f" and up to {len(deps)} of its dependencies (those the image lacks in a "
                 "compatible version)" + (f"; images need glibc >= {need_s}" if need_s else ""),
                 libraries=libs, dependencies=deps, glibc_needed=need_s,
                 extra_files=mcfg.get("extra_files") or [], devices=mcfg.get("devices") or [])


def check_gpu(config):
    from .hooks.nvidia import find_driver, host_gpus
    gpus = host_gpus()
    driver = find_driver(config)
    devs = sorted(f"/dev/{n}" for n in os.listdir("/dev") if n.startswith("nvidia"))
    details = {"driver": driver.version if driver else None,
               "cuda": ".".join(map(str, driver.cuda)) if driver and driver.cuda else None,
               "gpus": [{"index": g.index, "minor": g.minor, "uuid": g.uuid, "bus": g.bus,
                         "model": g.model} for g in gpus],
               "devices": devs,
               "libraries": [p for p, _, _ in driver.libraries] if driver else [],
               "binaries": driver.binaries if driver else []}
    if driver is None and not gpus and not devs:
        return Check("gpu.driver", "NVIDIA driver", "off", "no NVIDIA driver or GPU on this "
                     "host", **details)
    if driver is None:
        return Check("gpu.driver", "NVIDIA driver", "fail",
                     "NVIDIA devices exist but libcuda.so.1 is not in the ld cache",
                     "install the driver's user-space libraries, or name their directory in "
                     "gpu.library_paths", **details)
    if "/dev/nvidiactl" not in devs:
        return Check("gpu.driver", "NVIDIA driver", "fail",
                     f"driver {driver.version} libraries present but /dev/nvidiactl is missing",
                     "load the nvidia kernel module (nvidia-modprobe)", **details)
    cuda = details["cuda"] or "unknown"
    return Check("gpu.driver", "NVIDIA driver", "ok",
                 f"driver {driver.version} (CUDA {cuda}), {len(gpus)} GPU(s); --gpus injects "
                 f"{len(driver.libraries)} libraries, {len(driver.binaries)} tools and "
                 f"{len(devs)} devices", **details)


def _image_probe(image_arg, config):
    """In a child: the image mounted as `hpcc exec` would, then the MPI and GPU hooks'
    plans on it (nothing applied)."""
    from .cli import resolve_image
    from .hooks.mpi import plan_mpi
    from .hooks.nvidia import plan_nvidia
    from .hooks.oci import Container
    from .hooks.root import Root
    from .runtime import build_spec, enter_namespaces, setup_root

    privileged = os.geteuid() == 0
    image = resolve_image(image_arg, config)
    cfg = dict(config)
    cfg["launcher"] = dict(config.get("launcher") or {}, hooks_dir="", binds=[])
    spec = build_spec(image, mode="exec", command=["true"], bind_home=False, bind_cwd=False,
                      config=cfg, image_name=image_arg,
                      annotations={"org.hpcc.gpu": "all"})
    spec["hooks"] = {}
    out = {"image": image.sqfs_path}
    enter_namespaces(privileged)
    handle = setup_root(spec, privileged, pivot=False)
    try:
        out["mounted"] = "squashfuse_ll" if handle.fuse_pid else "kernel"
        container = Container({"id": handle.id, "annotations": spec.get("annotations")},
                              spec, handle.bundle, spec["root"]["path"])
        root = Root(spec["root"]["path"])
        for name, plan in (("mpi", plan_mpi), ("gpu", plan_nvidia)):
            try:
                p = plan(container, root, config)
                out[name] = {"ok": True, "plan": json.loads(p.as_json())}
            except HpccError as e:
                out[name] = {"ok": False, "error": str(e)}
        root.close()
    finally:
        handle.close()
    return out


def check_image(image_arg, config, mpi, gpu):
    res = _fork_probe(_image_probe, image_arg, config)
    if "error" in res:
        return [Check("image.mount", f"image {image_arg}", "fail",
                      f"cannot mount {image_arg}: {res['error']}",
                      "fix the problems above; check the image with `hpcc images`")]
    out = [Check("image.mount", f"image {image_arg}", "ok",
                 f"{res['image']} mounts ({res['mounted']})", path=res["image"],
                 mounted=res["mounted"])]
    m = res["mpi"]
    if mpi.status != "ok":
        out.append(Check("image.mpi", "MPI hook on the image", "off",
                         "no host MPI to inject (see mpi.host)", **m))
    elif m["ok"]:
        binds = [a for a in m["plan"].get("actions", []) if a.get("op") == "bind"]
        out.append(Check("image.mpi", "MPI hook on the image", "ok",
                         f"--mpi accepts the image's MPI; it would bind {len(binds)} host "
                         "paths", **m))
    else:
        out.append(Check("image.mpi", "MPI hook on the image", "warn",
                         f"--mpi would refuse this image: {m['error']}",
                         "run it without --mpi (its own MPI, inside one node), or rebuild "
                         "it on an MPICH-ABI MPI", **m))
    g = res["gpu"]
    if gpu.status != "ok":
        out.append(Check("image.gpu", "GPU hook on the image", "off",
                         "no NVIDIA driver to inject (see gpu.driver)", **g))
    elif g["ok"]:
        binds = [a for a in g["plan"].get("actions", []) if a.get("op") == "bind"]
        out.append(Check("image.gpu", "GPU hook on the image", "ok",
                         f"--gpus all would bind {len(binds)} host paths", **g))
    else:
        out.append(Check("image.gpu", "GPU hook on the image", "fail",
                         f"--gpus would refuse this image: {g['error']}",
                         "use an image whose NVIDIA_REQUIRE_CUDA this driver meets", **g))
    return out


# ------------------------------------------------------------------------------------------
# the report


def run_checks(config, image=None):
    work = tempfile.mkdtemp(prefix="hpcc-doctor-")
    try:
        os.chmod(work, 0o755)
        probe_img = os.path.join(work, "probe.sqfs")
        try:
            _probe_image(probe_img)
        except HpccError:
            probe_img = None
        mnt = os.path.join(work, "mnt")
        os.mkdir(mnt, 0o755)
        probe = _fork_probe(_unprivileged_probe, mnt, probe_img)
        kprobe = None
        if os.geteuid() == 0 and probe_img:
            kprobe = _fork_probe(_kernel_probe, mnt, probe_img)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        slurm = slurm_facts()
    except Exception:  # noqa: BLE001 - reported by check_slurm's guard below
        slurm = {"srun": None, "slurm_conf": None, "lines": []}
    checks = []
    for cid, fn, args in (("host.userns", check_userns, (probe, slurm)),
                          ("host.fuse", check_fuse, (probe,)),
                          ("host.squashfuse", check_squashfuse, (probe,)),
                          ("host.kernel_squashfs", check_kernel_squashfs, (kprobe,)),
                          ("host.overlay", check_overlay, (probe,)),
                          ("host.loop", check_loop, (kprobe,)),
                          ("host.syscalls", check_syscalls, (probe,)),
                          ("host.mount_helper", check_mount_helper, (config,)),
                          ("store.site", check_stores, (config,)),
                          ("gateway.service", check_service, (config,)),
                          ("slurm.plugin", check_slurm, (slurm,)),
                          ("mpi.host", check_mpi, (config,)),
                          ("gpu.driver", check_gpu, (config,))):
        checks += _guarded(cid, fn, *args)
    if image:
        by_id = {c.id: c for c in checks}
        checks += _guarded("image.mount", check_image, image, config, by_id["mpi.host"],
                           by_id["gpu.driver"])
    return checks


def _guarded(cid, fn, *args):
    """fn's checks; a bug in one check is reported as that check failing, not a traceback
    that hides the others."""
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001
        return [Check(cid, cid, "fail", f"internal error in this check: {type(e).__name__}: "
                      f"{e}", "report it to hpcc's developers with the output of "
                      "`hpcc doctor --json`")]
    return out if isinstance(out, list) else [out]


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "off": "off ", "skip": "skip"}


def render(checks, out):
    for c in checks:
        out.write(f"[{_MARK[c.status]}] {c.title}: {c.summary}\n")
        if c.fix and c.status in ("fail", "warn"):
            out.write(f"       fix: {c.fix}\n")
    bad = [c for c in checks if c.status == "fail"]
    out.write("all checks passed\n" if not bad else
              f"{len(bad)} problem(s): " + ", ".join(c.id for c in bad) + "\n")


def main(argv):
    as_json, image = False, None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if a == "--json":
            as_json = True
        elif a == "--image" or a.startswith("--image="):
            if "=" in a:
                image = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                image = argv[i]
            else:
                raise UsageError("option --image needs a value (see hpcc doctor --help)")
        else:
            raise UsageError(f"unknown argument {a} for hpcc doctor (see hpcc doctor --help)")
        i += 1
    from .config import load_config
    config = load_config(validate_schema=False)
    checks = run_checks(config, image)
    ok = not any(c.status == "fail" for c in checks)
    if as_json:
        try:
            name = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            name = None
        json.dump({"schema": SCHEMA, "ok": ok, "user": {"uid": os.getuid(), "name": name},
                   "checks": [c.as_dict() for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(checks, sys.stdout)
    return 0 if ok else 1
