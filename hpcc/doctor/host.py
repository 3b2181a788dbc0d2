"""The host's checks: user namespaces, FUSE and squashfuse_ll, kernel squashfs, overlay,
loop devices, the mount helper, the syscalls the launcher needs."""
import errno
import os
import re
import stat
import subprocess
import sys

from ..runtime import userns
from .check import Check


def _slurm_plugin_configured(slurm):
    return bool(slurm and slurm.get("lines"))


def check_userns(probe, slurm):
    values = userns.settings()
    from ..apparmor import profile_path
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
    from ..runtime.imagemount import _find_exe

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

    from ..runtime.spec import site_store
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
