"""build_spec: turn an image, the site config and the user's options into an OCI-shaped spec.

The spec is a dict shaped like an OCI runtime config.json (ociVersion, process, root,
mounts, hooks, annotations, linux) plus one hpcc-private key, "hpcc", with what the OCI
format has no field for (the squashfs file, the user's passwd/group lines, fds to keep...).
Nothing here mounts or forks; it only reads the host's passwd/group databases, checks that
host paths exist, and reads the hook configs.
"""
import os
import posixpath
import pwd

from ..errors import LaunchError, MountError, UsageError

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables that always pass into the container (besides launcher.env_passthrough):
# the job's and MPI's own (Slurm, PMI-1/2, PMIx) so that MPI inside talks to the host launcher.
PASS_PREFIXES = ("SLURM_", "PMI_", "PMIX_")
# The minimal /dev (bound from the host's devtmpfs; everything else only by config).
MIN_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Current directories that are never bound into the container (system paths).
_NO_CWD_BIND = ("/", "/tmp", "/var", "/run", "/home")
_NO_CWD_BIND_UNDER = ("/proc", "/sys", "/dev", "/usr", "/etc", "/bin", "/sbin", "/lib",
                      "/lib64", "/boot")


def parse_mount(text, *, cwd=None):
    """'SRC[:DST][:ro|rw]' -> (src, dst, readonly). SRC relative to cwd; DST absolute."""
    parts = text.split(":")
    readonly = False
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if len(parts) == 1:
        src = dst = parts[0]
    elif len(parts) == 2:
        src, dst = parts
    else:
        raise UsageError(f"bad mount '{text}': expected SRC:DST[:ro]")
    if not src or not dst:
        raise UsageError(f"bad mount '{text}': expected SRC:DST[:ro]")
    if not dst.startswith("/"):
        raise UsageError(f"bad mount '{text}': the destination '{dst}' must be an absolute "
                         "path inside the container")
    if not src.startswith("/"):
        try:
            src = os.path.join(cwd or os.getcwd(), src)
        except FileNotFoundError:
            raise MountError(f"mount source {src} is relative and the current directory no "
                             "longer exists", hint="give its absolute path") from None
    return os.path.normpath(src), clean_dest(dst), readonly


def clean_dest(dst):
    """Lexically normalise a container path; '..' cannot climb above the container's /."""
    out = posixpath.normpath("/" + dst)
    return "/" + out.lstrip("/")


def parse_env_assignments(items, host_env, source="--env"):
    """['K=V', 'K'] -> [(K, V)]; a bare K takes the host's value (skipped when unset)."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not key or any(c in key for c in " \t\0"):
            raise UsageError(f"bad {source} entry '{item}': expected NAME=VALUE")
        if not eq:
            if key not in host_env:
                continue
            value = host_env[key]
        out.append((key, value))
    return out


def read_env_file(path, host_env):
    """docker --env-file format: NAME=VALUE or NAME per line; '#' comments; no quoting."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read env file {path}: {e.strerror}") from None
    items = [ln.strip() for ln in lines]
    items = [ln for ln in items if ln and not ln.startswith("#")]
    return parse_env_assignments(items, host_env, source=f"env file {path}")


def _user_info(privileged, user):
    """(uid, gid, additional gids, name, home, shell) of the user the process runs as."""
    if not privileged:
        if user is not None:
            raise UsageError("--user is for root callers only; unprivileged containers run "
                             "as the calling user")
        uid, gid = os.getuid(), os.getgid()
        groups = []
    else:
        if user is None:
            uid, gid = 0, 0
        else:
            try:
                ent = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            except (KeyError, ValueError):
                raise UsageError(f"unknown user '{user}' for --user") from None
            uid, gid = ent.pw_uid, ent.pw_gid
        groups = []
    try:
        ent = pwd.getpwuid(uid)
        name, home, shell = ent.pw_name, ent.pw_dir, ent.pw_shell
    except KeyError:
        name, home, shell = f"user{uid}", "/", "/bin/sh"
    if privileged and uid != 0:
        groups = sorted(set(os.getgrouplist(name, gid)) - {gid})
    return uid, gid, groups, name, home, shell


def _may_enter(path, host_user):
    """Whether the user the container runs for may read and search the directory `path`."""
    from .identity import AsUser
    with AsUser(host_user["uid"], host_user["gid"], host_user["additionalGids"]):
        return os.access(path, os.R_OK | os.X_OK, effective_ids=True)


def _group_lines(gid, groups, name):
    import grp
    lines = []
    for g in [gid, *groups]:
        try:
            gname = grp.getgrgid(g).gr_name
        except KeyError:
            gname = f"group{g}"
        lines.append(f"{gname}:x:{g}:{name if g != gid else ''}")
    return lines


def command_args(mode, meta_config, command, entrypoint):
    """Docker semantics: ENTRYPOINT + (CMD replaced by the command); --entrypoint resets CMD."""
    if mode == "exec":
        if not command:
            raise UsageError("hpcc exec needs a command: hpcc exec IMAGE CMD [ARGS...]")
        return list(command)
    if entrypoint is not None:
        ep = [entrypoint] if entrypoint else []
        cmd = list(command or [])
    else:
        ep = list(meta_config.get("Entrypoint") or [])
        cmd = list(command) if command else list(meta_config.get("Cmd") or [])
    args = ep + cmd
    if not args:
        raise UsageError("the image has no ENTRYPOINT or CMD: give a command, "
                         "e.g. hpcc run IMAGE -- /bin/sh")
    return args


def build_env(meta_config, *, home, name, bind_home, passthrough, env_files, env,
              host_env):
    """Environment, lowest precedence first (docs/launcher.md, "Environment"):
    1. defaults (PATH, HOME, USER, LOGNAME), 2. the image's Env, 3. host variables that pass
    (launcher.env_passthrough, SLURM_*, PMI_*, PMIX_*) and HOME when the home is bound,
    4. --env-file files in order, 5. --env options in order."""
    out = {"PATH": DEFAULT_PATH, "HOME": home if bind_home else "/", "USER": name,
           "LOGNAME": name}
    for item in meta_config.get("Env") or []:
        k, _, v = item.partition("=")
        if k:
            out[k] = v
    for k, v in host_env.items():
        if k in passthrough or k.startswith(PASS_PREFIXES):
            out[k] = v
    if bind_home:
        out["HOME"] = home
    for path in env_files:
        for k, v in read_env_file(path, host_env):
            out[k] = v
    for k, v in parse_env_assignments(env, host_env):
        out[k] = v
    out["HPCC_CONTAINER"] = "1"
    return out


def pmi_fds(env):
    """File descriptors named by PMI/PMIx variables (PMI_FD and friends): kept across exec."""
    fds = []
    for k, v in env.items():
        if k.startswith(("PMI_", "PMIX_")) and k.endswith("FD") and v.isdigit():
            fds.append(int(v))
    return sorted(set(fds))


UNSHARE = {"net": "network", "ipc": "ipc", "uts": "uts"}


def parse_unshare(text, option="--unshare"):
    """'net,ipc,uts' (any of them, comma-separated) -> sorted list of the names."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if n not in UNSHARE]
    if bad or not names:
        raise UsageError(f"bad {option} '{text}': expected a comma-separated list of "
                         "net, ipc, uts")
    return sorted(set(names))


def build_spec(image, *, mode="run", command=None, entrypoint=None, env=(), env_files=(),
               mounts=(), workdir=None, writable=False, bind_home=None, bind_cwd=None,
               user=None, annotations=None, config=None, privileged=None, host_env=None,
               cwd=None, image_name=None, cache=None, remap_root=None, unshare=(),
               named=None, warn=None):
    """Return the OCI-shaped spec dict for one container (see the module docstring).

    image: an object with .sqfs_path, .digest and .meta (hpcc.store.ImageRecord);
    mode: "run" (ENTRYPOINT/CMD semantics), "exec" (command as is) or "shell";
    mounts: 'SRC:DST[:ro]' strings; env: 'K=V' or 'K' strings; env_files: paths;
    config: the loaded site config (hpcc.config.load_config); privileged: default euid == 0;
    writable: None takes launcher.writable; remap_root: the command is uid 0 in a user
    namespace that maps the user's own uid (None: launcher.remap_root); unshare: names from
    ("net", "ipc", "uts"), namespaces of the container's own; named: a
    hpcc.runtime.named.NamedContainer whose upper/work directories hold the writable layer;
    warn: called with one line for what the user should know (the current directory not bound).
    """
    if config is None:
        from ..config import load_config
        config = load_config(validate_schema=False)
    launcher = config.get("launcher", {})
    if privileged is None:
        privileged = os.geteuid() == 0
    host_env = dict(os.environ if host_env is None else host_env)
    if not cwd:
        try:
            cwd = os.getcwd()
        except FileNotFoundError:
            cwd = None          # removed while the shell sat in it: nothing to bind
    bind_home = launcher.get("mount_home", True) if bind_home is None else bind_home
    bind_cwd = launcher.get("mount_cwd", True) if bind_cwd is None else bind_cwd
    writable = bool(launcher.get("writable", False)) if writable is None else bool(writable)
    remap_root = bool(launcher.get("remap_root", False)) if remap_root is None else remap_root
    if named is not None:
        writable = True  # a named container exists to keep what is written in it
    unshare = sorted(set(unshare or ()))
    bad = [n for n in unshare if n not in UNSHARE]
    if bad:
        raise UsageError(f"cannot unshare {', '.join(bad)}: only net, ipc and uts")
    meta = getattr(image, "meta", None) or {}
    meta_config = meta.get("config") or {}

    uid, gid, groups, name, home, shell = _user_info(privileged, user)
    if bind_home and (not home or home == "/" or not os.path.isdir(home)):
        bind_home = False

    if mode == "shell":
        args = [shell] if shell and shell.startswith("/") else ["/bin/sh"]
        if command:
            args += list(command)
    else:
        args = command_args(mode, meta_config, command, entrypoint)

    host_user = {"uid": uid, "gid": gid, "additionalGids": groups}
    if remap_root:
        # root inside, the user outside: a user namespace maps 0 to the user's own ids
        uid = gid = 0
        groups = []
    envd = build_env(meta_config, home=home, name="root" if remap_root else name,
                     bind_home=bind_home,
                     passthrough=set(launcher.get("env_passthrough", [])),
                     env_files=env_files, env=env, host_env=host_env)

    # Mounts: system first (fixed order), then site binds, home, cwd, user binds, each group
    # sorted so a parent is mounted before anything beneath it.
    sys_mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "nodev", "noexec"]},
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "nodev", "noexec", "ro"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "noexec", "mode=755", "size=65536k"]},
    ]
    for dev in MIN_DEVICES:
        if os.path.exists("/dev/" + dev):
            sys_mounts.append({"destination": "/dev/" + dev, "type": "bind",
                               "source": "/dev/" + dev, "options": ["bind", "nosuid", "noexec"]})
    for src, dst in (("/dev/pts", "/dev/pts"), ("/dev/shm", "/dev/shm"),
                     ("/dev/mqueue", "/dev/mqueue")):
        if "ipc" in unshare and dst == "/dev/mqueue":
            sys_mounts.append({"destination": dst, "type": "mqueue", "source": "mqueue",
                               "options": ["nosuid", "nodev", "noexec"]})
        elif "ipc" in unshare and dst == "/dev/shm":
            sys_mounts.append({"destination": dst, "type": "tmpfs", "source": "shm",
                               "options": ["nosuid", "nodev", "noexec", "mode=1777"]})
        elif os.path.isdir(src):
            opts = ["rbind", "nosuid", "noexec"] + (["nodev"] if dst != "/dev/pts" else [])
            sys_mounts.append({"destination": dst, "type": "bind", "source": src,
                               "options": opts})
    for dev in launcher.get("devices", []):
        if os.path.exists(dev):
            sys_mounts.append({"destination": clean_dest(dev), "type": "bind", "source": dev,
                               "options": ["rbind", "nosuid", "noexec"]})
    sys_mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777"]})

    site = []
    for item in launcher.get("binds", []):
        src, dst, ro = parse_mount(item, cwd="/")
        if os.path.exists(src):  # a site path missing on this node is skipped
            site.append(_bind(src, dst, ro, "site"))
    auto = []
    if bind_home:
        auto.append(_bind(home, home, False, "home"))
    cwd_bound = False
    if bind_cwd and cwd is None:
        if warn:
            warn("not binding the current directory: it no longer exists")
    elif bind_cwd and cwd not in _NO_CWD_BIND and not any(
            cwd == p or cwd.startswith(p + "/") for p in _NO_CWD_BIND_UNDER):
        if bind_home and (cwd == home or cwd.startswith(home.rstrip("/") + "/")):
            cwd_bound = True
        elif not _may_enter(cwd, host_user):
            # Bound only by default, never asked for: a directory the user cannot read (a
            # shell left in root's directory by su or sudo) is not bound and the command
            # starts where it would without it, instead of the launch failing.
            if warn:
                warn(f"not binding the current directory {cwd}: you cannot read it")
        else:
            auto.append(_bind(cwd, cwd, False, "cwd"))
            cwd_bound = True
    user_mounts = []
    for item in mounts:
        src, dst, ro = parse_mount(item, cwd=cwd)
        if not os.path.exists(src):
            raise MountError(f"mount source {src} does not exist", hint="check the --mount option")
        user_mounts.append(_bind(src, dst, ro, "user"))
    depth = lambda m: m["destination"].rstrip("/").count("/")  # noqa: E731
    all_mounts = (sys_mounts + sorted(site, key=depth) + sorted(auto, key=depth)
                  + sorted(user_mounts, key=depth))

    if workdir:
        if not workdir.startswith("/"):
            raise UsageError(f"--workdir {workdir}: must be an absolute path in the container")
        cwd_in = clean_dest(workdir)
    elif cwd_bound:
        cwd_in = cwd
    else:
        cwd_in = clean_dest(meta_config.get("WorkingDir") or "/")

    ann = {
        "org.hpcc.image": str(image.sqfs_path),
        "org.hpcc.image.digest": str(getattr(image, "digest", "") or ""),
    }
    if image_name:
        ann["org.hpcc.image.name"] = image_name
    ann.update(annotations or {})

    hu = host_user
    passwd_line = (f"{name}:x:{hu['uid']}:{hu['gid']}:{name}:{home if bind_home else '/'}:"
                   f"{shell or '/bin/sh'}")
    spec = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups,
                     "username": "root" if remap_root else name},
            "args": args,
            "env": [f"{k}={v}" for k, v in envd.items()],
            "cwd": cwd_in,
            "noNewPrivileges": True,
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable",
                                             "permitted", "ambient")},
        },
        "root": {"path": "", "readonly": not writable},
        "mounts": all_mounts,
        "hooks": {},
        "annotations": ann,
        "linux": {
            "namespaces": ([{"type": "mount"}]
                           + ([{"type": "user"}] if remap_root or not privileged else [])
                           + [{"type": UNSHARE[n]} for n in unshare]),
        },
        "hpcc": {
            "image": str(image.sqfs_path),
            "privileged": privileged,
            "writable": bool(writable),
            "passwd": passwd_line,
            "group": _group_lines(hu["gid"], hu["additionalGids"], name),
            # the user outside (the same as process.user unless remap_root)
            "host_user": host_user,
            "remap_root": bool(remap_root),
            "unshare": unshare,
            # privileged and writable (or remap_root) as a user: the image's 0 is shown as the
            # user (an idmapped mount), so that they may write anywhere in the container
            "idmap": ([hu["uid"], hu["gid"]] if privileged and hu["uid"] != 0
                      and (writable or remap_root) else None),
            "upper": named.upper if named is not None else None,
            "work": named.work if named is not None else None,
            "fresh_upper": named is None or named.created,
            "keep_fds": pmi_fds(envd),
            "fallback_args": ["/bin/sh"] if mode == "shell" else [],
            "has_bind_mounts": bool(user_mounts),
            "warm_bytes": _warm_mb(launcher) << 20,
            # unprivileged launches: the setuid helper that kernel-mounts site images
            "mount_helper": launcher.get("mount_helper", ""),
            "site_store": site_store(config),
        },
    }
    if not privileged or remap_root:
        # Unprivileged: the setup namespace maps 0 to the caller (mounts, hooks); the command
        # runs in a nested one that maps the caller's ids to themselves (or to 0: remap_root).
        # Privileged with remap_root: the command's namespace maps 0 to the user.
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": hu["uid"], "size": 1}]
        spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": hu["gid"], "size": 1}]

    hooks_dir = launcher.get("hooks_dir")
    if hooks_dir and os.path.isdir(hooks_dir):
        from .ocihooks import load_hooks, select_hooks
        spec["hooks"] = select_hooks(load_hooks(hooks_dir, privileged=os.geteuid() == 0,
                                                cache=cache), spec)
    return spec


def site_store(config):
    """The site store as the mount helper reads it: the config's text, no expansion."""
    return ((config.get("store") or {}).get("path") or "").rstrip("/")


def _warm_mb(launcher):
    """launcher.warm_mb; a launch cache written before the key's rename holds its old name,
    prefetch_mb (hpcc.config renames it when it reads a file)."""
    mb = launcher.get("warm_mb")
    return int(launcher.get("prefetch_mb", 32) if mb is None else mb)


def _bind(src, dst, readonly, origin):
    opts = ["rbind", "nosuid", "nodev"]
    if readonly:
        opts.append("ro")
    # x-hpcc-origin: where the bind comes from; user, home and cwd sources are opened with
    # the user's credentials and refused when the user cannot read them.
    return {"destination": dst, "type": "bind", "source": src, "options": opts,
            "x-hpcc-origin": origin}


def spec_env(spec):
    """The process environment of a spec as a dict."""
    out = {}
    for item in spec["process"]["env"]:
        k, _, v = item.partition("=")
        out[k] = v
    return out


__all__ = ["build_spec", "parse_mount", "spec_env", "LaunchError"]
