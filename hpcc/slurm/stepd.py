"""Per-step container setup for Slurm, run as root by spank_hpcc.so in slurmstepd.

    python3 -I -m hpcc.stepd image=IMG uid=N gid=N job=N step=N node=N cwd=DIR [key=value...]

fd 3 is a socket to slurmstepd. The plugin starts the helper early (init_post_opt), so its
start-up overlaps Slurm's own step set-up, and sends the job's working directory later
("cwd=DIR\\0", from user_init). Replies are NUL-terminated records ("cwd=", "env=NAME=VALUE",
"unset=NAME", "error=LINE", "end=1"; written and read in hpcc.slurm.wire); an error is one
line that the plugin prints on the user's srun output before failing the step (every task
exits 125 without running).

Once per node and step:
1. resolve the image as the job user (hpcc.slurm.stepimage; their groups, their effective
   ids): a user may only run images they can read; the image file is opened with their
   credentials and the runtime is given that open file (/proc/self/fd/N), never a path
   they could swap;
2. build the spec with hpcc's runtime (the launcher's code: same root, binds, /etc/passwd
   entries, /tmp, /dev, hooks such as the MPI one);
3. fork a child that unshares its mount namespace, assembles the root (setup_root,
   privileged) and sends an fd of that namespace, the image's environment and the working
   directory to slurmstepd over fd 3 (SCM_RIGHTS). Every task joins that namespace before
   exec. The namespace dies with the last of slurmstepd's fd and the tasks in it.
   When the image had to be mounted with squashfuse (not a root-owned site image), the
   child stays as the FUSE daemon's parent until slurmstepd closes the socket.

Imports stay small: no click, jsonschema, requests (launch cost is paid once per node and step).
"""
import _socket  # the C module: `socket` costs ~5 ms of enum set-up at import
import os
import sys

from ..errors import EXIT_LAUNCH, HpccError, ImageNotFound, LaunchError, ReferenceError_, UsageError
from ..runtime.identity import AsUser
from .stepimage import is_relative_path, resolve_as_user, resolve_in_cwd, wait_for_first_use
from .wire import (
    parse_args,
    recv_cwd,
    reply_env,
    reply_unset,
    send_error,
    send_namespaces,
)

CACHE_DIR = "/run/hpcc-stepd"


def cache_dir_ok():
    """CACHE_DIR exists, is root's and only root's (made when missing)."""
    import stat

    try:
        os.mkdir(CACHE_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(CACHE_DIR)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077


# (stat key of the config file, config): the per-node server loads the config once and
# each step's child (a fork of it) checks the file's stat instead of reading the cache
_config_memo = None


def load_config_cached():
    """The site config without TOML parsing on every step: the launch cache, kept in the
    root-only CACHE_DIR (none when that directory is not usable); in a child of the
    per-node server, the server's copy when the file has not changed since (one stat)."""
    global _config_memo
    from ..config import config_path
    from ..launchcache import LaunchCache

    path, _ = config_path()
    try:
        key = LaunchCache.key(path)
    except OSError:
        key = None
    if key is not None and _config_memo is not None and _config_memo[0] == key:
        return _config_memo[1]
    from ..launchcache import load_config_cached as load

    cache = LaunchCache(os.path.join(CACHE_DIR, "launch-cache") if cache_dir_ok() else "")
    config = load(cache)
    cache.save()
    if key is not None:
        _config_memo = (key, config)
    return config


def prepare(args, note=None):
    """What needs no working directory: config, user, image (opened as the user)."""
    import pwd

    uid, gid = int(args["uid"]), int(args["gid"])
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        raise LaunchError(f"uid {uid} has no passwd entry on this node") from None
    if user.pw_gid != gid:
        user = pwd.struct_passwd((user.pw_name, user.pw_passwd, uid, gid, user.pw_gecos,
                                  user.pw_dir, user.pw_shell))
    config = load_config_cached()
    from .options import check_flags
    check_flags(args)
    image = args["image"]
    if is_relative_path(image):
        return user, config, None, None  # the job's working directory is needed first
    try:
        rec, fd = resolve_as_user(image, user, config)
    except ImageNotFound:
        if image.startswith("/"):
            raise
        if note is not None and wait_for_first_use(image, user, config, note):
            return prepare(args, None)
        if "/" in image:
            return user, config, None, None  # maybe a file below the working directory
        raise
    return user, config, rec, fd


def build(args, user, config, rec, fd, opts=None, named=None):
    """The spec of this step's container. Returns (spec, extra_env). opts: the step's
    container settings (hpcc.runtime.stepcontainer.StepOptions); named: its named
    container (hpcc.runtime.named.NamedContainer) or None."""
    from ..runtime import build_spec
    from ..runtime.spec import parse_mount
    from . import options
    from .batch import BATCH_STEP, INTERACTIVE_STEP, slurm_client_setup

    uid = user.pw_uid
    cwd = args["cwd"]
    opt_mounts = options.origin(args, "mounts", "--container-mounts")
    mounts = options.parse_mounts(args["mounts"], cwd, opt_mounts) if args.get("mounts") \
        else options.Mounts()
    if mounts.binds:
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
        options.check_sources(mounts, AsUser(uid, user.pw_gid, groups), opt_mounts)
    unsupported = [k for k in options.RUNTIME_KEYS
                   if args.get(k) not in (None, "0") and not _runtime_supports(k)]
    if unsupported:
        k = unsupported[0]
        raise UsageError(f"{options.origin(args, k, '--container-' + k.replace('_', '-'))}: "
                         "not supported yet by hpcc under Slurm; run the step without it")
    extra_env = {}
    system = []   # binds of Slurm's own files: opened by root, not subject to the user's rights
    step = int(args["step"])
    if step in (BATCH_STEP, INTERACTIVE_STEP):
        script = args.get("argv0", "")
        if step == BATCH_STEP and script.startswith("/"):
            d = os.path.dirname(script)
            system.append(f"{d}:{d}:ro")
        more, extra_env = slurm_client_setup(args)
        system += more
    annotations = {"org.hpcc.slurm.job": args["job"], "org.hpcc.slurm.step": args["step"]}
    if args.get("mpi") == "1":
        annotations["org.hpcc.mpi"] = "1"
    if args.get("gpus"):
        annotations["org.hpcc.gpu"] = args["gpus"]
    mount_home = args.get("mount_home")
    # The job's working directory is bound (launcher.mount_cwd) unless it is a system path;
    # the runtime opens user-given bind sources with the user's credentials.
    spec = build_spec(rec, mode="exec", command=["/bin/true"], mounts=mounts.binds,
                      workdir=options.workdir(args, rec.config),
                      writable=opts.writable if opts else args.get("writable") == "1",
                      user=str(uid), named=named,
                      remap_root=opts.remap_root if opts else None,
                      unshare=opts.unshare if opts else (),
                      bind_home=None if mount_home is None else mount_home == "1",
                      annotations=annotations, config=config, privileged=True,
                      host_env={"HOME": user.pw_dir}, cwd=cwd, image_name=args["image"])
    for item in system:
        src, dst, ro = parse_mount(item, cwd="/")
        spec["mounts"].append({"destination": dst, "type": "bind", "source": src,
                               "options": ["rbind", "nosuid", "nodev"] + (["ro"] if ro else []),
                               "x-hpcc-origin": "slurm"})
    options.apply_mounts(spec, mounts, opt_mounts)
    spec["hpcc"]["image"] = f"/proc/self/fd/{fd}"
    spec["hpcc"]["job_ids"] = (uid, user.pw_gid)  # what Slurm gives the tasks
    return spec, extra_env


def _runtime_supports(key):
    """Whether the step can honour this setting (every pyxis setting now: named containers,
    entrypoint and save are the helper's; for remap-root and unshare each task also joins
    the user or network/IPC/UTS namespaces the helper sends, "nsfds=")."""
    return True


def container_child(spec, sock, payload, entrypoint=None, keep_userns=False):
    """In the forked child: new mount namespace, root assembly, send the namespace fd.
    Returns (the RootHandle: its FUSE daemon must outlive the message when there is one,
    an fd of remap-root's user namespace of the tasks when keep_userns, else None: an idle
    keeper holds it for the next steps). entrypoint: (image config, log) to run the image's
    ENTRYPOINT once before the tasks; its output lines (when log) go to the user as "log="
    records."""
    from ..runtime import enter_namespaces, setup_root
    from ..runtime.stepcontainer import namespace_fds, run_entrypoint

    # before the assembly (it pivots into the container): remap-root's user namespace
    extra = _task_userns(spec)
    kept = os.dup(extra["user"]) if keep_userns and "user" in extra else None
    enter_namespaces(True)
    nsfd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    # no page cache warming for the command: this process is gone before the tasks exec
    spec["hpcc"]["warm_bytes"] = 0
    handle = setup_root(spec, privileged=True)
    extra.update(namespace_fds(spec["hpcc"].get("unshare") or ()))
    if entrypoint is not None:
        lines = run_entrypoint(spec, entrypoint[0], log=entrypoint[1])
        if lines:
            logs = "".join(f"log={ln}\0" for ln in lines if "\0" not in ln)
            payload = payload[:-len(b"end=1\0")] + logs.encode(errors="replace") \
                + b"end=1\0"
    send_namespaces(sock, payload, nsfd, extra)
    return handle, kept


def _task_userns(spec):
    """{"user": fd} of remap-root's user namespace for the tasks, or {}."""
    h = spec["hpcc"]
    if not h.get("remap_root"):
        return {}
    from ..runtime.stepcontainer import task_userns_fd

    # the ids Slurm gives the tasks (the job's uid and gid, which may be another group than
    # the passwd one, e.g. under sg) are the ones mapped to 0
    hu = h["host_user"]
    return {"user": task_userns_fd(*h.get("job_ids", (hu["uid"], hu["gid"])))}


def join_existing(spec, sock, payload, named, reuse, userns=None):
    """A step that needs no assembly: it attaches to the running named container, or runs
    in the namespace an idle keeper (pid `reuse`) holds, assembled for the same settings.
    Sends the reply with that namespace's fd (and the keeper's network/IPC/UTS ones, and
    with remap-root the user namespace the keeper holds as its fd `userns`, else a new one)
    from this process, before any fork, and returns True; False when the idle keeper is
    gone (the step assembles its container)."""
    from ..runtime.stepcontainer import attach_fd, namespace_fds, reuse_fd, reuse_userns_fd

    nsfd = attach_fd(named) if reuse is None else reuse_fd(reuse)
    if nsfd is None:
        return False
    extra = {}
    try:
        kept = reuse_userns_fd(reuse, userns) \
            if reuse is not None and spec["hpcc"].get("remap_root") else None
        extra.update({"user": kept} if kept is not None else _task_userns(spec))
        extra.update(namespace_fds(spec["hpcc"].get("unshare") or (),
                                   pid=reuse or named.running_pid))
    except BaseException:
        for fd in (nsfd, *extra.values()):
            os.close(fd)
        raise
    send_namespaces(sock, payload, nsfd, extra)
    return True


def _named_reuse(opts, named, spec, save_to):
    """(idle_key, reuse, userns) for a job-scope named container this step runs (not
    attaches to): idle_key, the settings' key under which the child that assembles it keeps
    its namespace after the step; reuse, the pid of an idle keeper of the same key whose
    namespace the step runs in instead of assembling it again
    (hpcc.runtime.stepcontainer.keep_idle), and userns, that keeper's fd number of the
    remap-root tasks' user namespace (or None). A keeper of other settings is ended first
    (the layer is mounted once). idle_key and reuse are None when the container is not
    kept: no name, "user" scope, --container-save, or an entrypoint (which runs in a fresh
    assembly each step, as the step's own)."""
    if named is None or named.running_pid:
        return None, None, None
    keepable = opts.scope() == "job" and save_to is None and not opts.entrypoint
    idle = None if named.created else named.idle_keeper()
    key = None
    if keepable:
        from ..runtime.stepcontainer import reuse_key
        key = reuse_key(spec)
        if idle is not None and idle[1] == key:
            return key, idle[0], idle[2]
    if idle is not None:
        named.stop_idle()
    return key, None, None


def _name_image_variable(args, e):
    """An image that came from the environment: the message says which variable (the user
    may not know it is set: a PYXIS_CONTAINER_IMAGE left from another job, say)."""
    origin = args.get("from_image", "")
    if origin.startswith(("HPCC_CONTAINER_", "PYXIS_CONTAINER_")):
        e.message = f"{origin}={args['image']}: {e.message}"


def _open_container(args, config, user, rec, img_fd):
    """(options, named container or None, image record, its fd): the step's settings and
    its named container, opened (locked unless it runs); an existing one keeps the image
    it was made from (as pyxis), which replaces rec and img_fd."""
    from ..runtime.stepcontainer import StepOptions

    opts = StepOptions.from_args(args, config)
    named = opts.open_named(image=rec, image_name=args["image"], uid=user.pw_uid,
                            job=int(args["job"]),
                            node=int(args["node"]) if args.get("node", "").isdigit() else None)
    recorded = (named.image or {}).get("sqfs") if named is not None else None
    if recorded and recorded != str(rec.sqfs_path) and not recorded.startswith("/proc/"):
        os.close(img_fd)
        rec, img_fd = resolve_as_user(recorded, user, config)
    return opts, named, rec, img_fd


def run(args, sock, pending=b"", served=False):
    def note(message):
        sock.sendall(f"note={message}\0".encode(errors="replace"))

    try:
        user, config, rec, img_fd = prepare(args, note)
    except (ImageNotFound, ReferenceError_) as e:
        _name_image_variable(args, e)
        raise
    early = rec is not None and not args.get("save")
    if early:
        # what needs no working directory is done while slurmstepd sets the step up
        opts, named, rec, img_fd = _open_container(args, config, user, rec, img_fd)
    cwd = recv_cwd(sock, pending)
    if cwd is None:
        return 0
    args["cwd"] = cwd
    if rec is None:
        try:
            rec, img_fd = resolve_in_cwd(args, user, config)
        except (ImageNotFound, ReferenceError_) as e:
            _name_image_variable(args, e)
            raise
    if not early:
        from .options import save_path
        if args.get("save"):
            args["save"] = save_path(args, cwd)  # relative: the job's working directory's
        opts, named, rec, img_fd = _open_container(args, config, user, rec, img_fd)
    if named is not None and named.running_pid and opts.save:
        raise UsageError("--container-save: not with a step that attaches to the running "
                         f"container '{named.name}' (save it from the step that runs it)")
    spec, extra = build(args, user, config, rec, img_fd, opts, named)
    save_to = opts.open_save(spec["hpcc"]["host_user"])
    idle_key, reuse, reuse_userns = _named_reuse(opts, named, spec, save_to)
    if idle_key is not None:
        import signal  # noqa: F401  (the idle keeper needs them after pivot_root)
        import time  # noqa: F401
    keep = {n for n in args.get("keep_env", "").split(",") if n}
    env = reply_env(spec, rec, keep, extra)
    records = [f"cwd={spec['process']['cwd']}"] + [f"env={k}={v}" for k, v in env.items()]
    records += [f"unset={k}" for k in reply_unset(env, keep)]
    if not extra:
        # a step started from a batch container: the client wrappers' variables do not apply
        records += [f"unset={k}" for k in ("HPCC_HOST", "HPCC_HOST_LD", "HPCC_HOST_LIBS")]
    records.append("end=1")
    if any("\0" in r for r in records):
        raise LaunchError("the image's environment contains a NUL byte")
    payload = "".join(r + "\0" for r in records).encode(errors="surrogateescape")

    joined = False
    if named is not None and (named.running_pid or reuse is not None):
        # the reply goes out now, the keeper below is forked after it
        joined = join_existing(spec, sock, payload, named, reuse, reuse_userns)
        if not joined:
            reuse = None  # the idle keeper is gone: assemble
        elif named.running_pid:
            # attached: the running step's keeper holds the container; nothing to keep
            os.close(img_fd)
            named.close()
            return 0
        elif served:
            # a child of the per-node server, which no one waits for: it holds the
            # container's lock until the step ends itself, without forking a keeper
            from ..runtime.stepcontainer import keep_until_step_end
            os.close(img_fd)
            keep_until_step_end(sock, None, named, None, spec, attached=reuse)
            return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        # Nothing started from here (FUSE daemon, hooks) may hold slurmstepd's stderr.
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            os.close(r)
            entry = ((rec.meta.get("config") or {}), opts.entrypoint_log) \
                if opts.entrypoint else None
            handle, userns_fd = (None, None) if joined else container_child(
                spec, sock, payload, entry, keep_userns=idle_key is not None)
            if opts.keeps(handle, named, save_to):
                # Keep the FUSE daemon's parent, the named container's lock, the save, alive
                # until slurmstepd closes its end at the end of the step (and then, for a
                # job's named container, its namespace for the next steps).
                from ..runtime.stepcontainer import keep_until_step_end
                os.write(w, b"k")
                os.close(w)
                keep_until_step_end(sock, handle, named, save_to, spec,
                                    attached=reuse if joined else None,
                                    idle_key=idle_key if not joined else None,
                                    userns_fd=userns_fd)
            else:
                os.write(w, b"o")
        except HpccError as e:
            send_error(sock, f"hpcc: {e}")
            code = e.exit_code
        except BaseException as e:  # noqa: BLE001 - report, never a traceback
            send_error(sock, f"hpcc: cannot set up the container: {type(e).__name__}: {e}")
            code = EXIT_LAUNCH
        os._exit(code)
    os.close(w)
    os.close(img_fd)
    sock.close()
    if named is not None:
        named.close()  # the child holds the lock (the same open file) until the step ends
    if save_to is not None:
        os.close(save_to[0])
    status = os.read(r, 1)
    os.close(r)
    if status == b"k":
        return 0  # the keeper lives on; its exit status no longer matters here
    _, st = os.waitpid(pid, 0)
    if status == b"o":
        return 0
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) and os.WEXITSTATUS(st) else EXIT_LAUNCH


def handle(args, sock, pending=b"", served=False):
    """One request: set up the container, reply on sock. Returns the exit status.
    served: in a child of the per-node server (nobody waits for this process)."""
    try:
        return run(args, sock, pending, served)
    except HpccError as e:
        send_error(sock, f"hpcc: {e}")
        return e.exit_code or 1
    except Exception as e:  # noqa: BLE001 - report, never a traceback
        send_error(sock, f"hpcc: cannot set up the container: {type(e).__name__}: {e}")
        return EXIT_LAUNCH


def main(argv=None):
    """One-shot helper: serve the request in argv on fd 3, then leave a server behind when
    asked (serve=PATH)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"] and len(argv) == 2:
        from .server import serve
        return serve(argv[1])
    try:
        sock = _socket.socket(fileno=3)
    except OSError:
        print("hpcc.stepd: fd 3 must be the socket from spank_hpcc.so", file=sys.stderr)
        return 2
    try:
        args = parse_args(argv)
    except HpccError as e:
        send_error(sock, f"hpcc: {e}")
        return e.exit_code or 1
    code = handle(args, sock)
    sock.close()
    if args.get("serve"):
        from .server import start_server
        start_server(args["serve"])
    return code
