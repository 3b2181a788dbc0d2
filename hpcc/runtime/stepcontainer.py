"""The runtime's side of the Slurm helper's container settings (srun's pyxis options).

The helper (hpcc.slurm.stepd, root in slurmstepd) gets the step's settings as key=value
strings from spank_hpcc.so: `name=NAME`, `name_mode=auto|exec|no_exec|create`,
`remap_root=0|1`, `unshare=net,ipc,uts`, `mount_home=0|1`, `entrypoint=0|1`,
`entrypoint_log=0|1`, `readonly=0|1`, `writable=0|1`, `save=ABS_PATH`. This module turns them
into the runtime's terms, in small steps the helper calls in order:

    opts = StepOptions.from_args(args, config)     # validated; one line per bad value
    kw = opts.spec_kwargs()                         # build_spec(..., **kw)
    named = opts.open_named(image=rec, image_name=..., uid=..., job=...)   # or None
    spec = build_spec(rec, ..., named=named, **kw)
    save_to = opts.open_save(user)                  # (dir_fd, name) opened as the user, or None
    # fork; in the child: enter_namespaces(True), then
    nsfd = attach_fd(named)                         # a running named container's namespace,
                                                    # or None: setup_root(spec, True)
    lines = run_entrypoint(spec, opts)              # the image's ENTRYPOINT, once per node
    ... send the namespace to slurmstepd ...
    keep_until_step_end(sock, handle, named, save_to, spec)   # when opts.keeps(handle)

What the tasks join besides the mount namespace (`TASK_SIDE`; spank_hpcc.so gets their fds
after the mount namespace's, named by the record "nsfds=KIND,..."): remap_root, a user
namespace mapping 0 to the job user (task_userns_fd; each task enters it in task_init, as
the user, and keeps root's capabilities in it only), and unshare, the network/IPC/UTS
namespaces of the helper's child (namespace_fds; joined in task_init_privileged).
"""
import os

from ..errors import LaunchError, UsageError
from .children import output_of_child

TASK_SIDE = ("remap_root", "unshare")


def _flag(args, key):
    v = args.get(key)
    if v in (None, ""):
        return None
    if v not in ("0", "1"):
        raise UsageError(f"hpcc.stepd: {key}={v}: expected 0 or 1")
    return v == "1"


class StepOptions:
    """The step's container settings, validated."""

    def __init__(self, config=None):
        self.config = config or {}
        self.name = None           # 'NAME:FLAG' for open_named
        self.remap_root = None     # None: the site default (launcher.remap_root)
        self.unshare = []
        self.mount_home = None     # None: the site default (launcher.mount_home)
        self.entrypoint = False
        self.entrypoint_log = False
        self.writable = None       # None: the site default (launcher.writable)
        self.save = None
        self.site_scope = None     # the plugstack line's container_scope= (pyxis), if any

    @classmethod
    def from_args(cls, args, config=None):
        from .named import FLAGS, parse_name
        from .spec import parse_unshare

        o = cls(config)
        if args.get("name"):
            mode = args.get("name_mode") or "auto"
            if mode not in FLAGS:
                raise UsageError(f"--container-name: the flag '{mode}' must be one of "
                                 + ", ".join(FLAGS))
            o.name = f"{args['name']}:{mode}"
            parse_name(o.name, "--container-name")
        o.remap_root = _flag(args, "remap_root")
        if args.get("unshare"):
            o.unshare = parse_unshare(args["unshare"], "--container-unshare")
        o.mount_home = _flag(args, "mount_home")
        o.entrypoint = bool(_flag(args, "entrypoint"))
        o.entrypoint_log = bool(_flag(args, "entrypoint_log"))
        writable, readonly = _flag(args, "writable"), _flag(args, "readonly")
        if writable and readonly:
            raise UsageError("--container-writable and --container-readonly contradict each "
                             "other: give one")
        o.writable = True if writable else (False if readonly else None)
        if o.name and readonly:
            raise UsageError("--container-readonly and --container-name contradict each "
                             "other (a named container keeps what is written in it)")
        if args.get("scope"):
            if args["scope"] not in ("job", "user"):
                raise UsageError(f"hpcc.stepd: scope={args['scope']}: expected job or user")
            o.site_scope = args["scope"]
        save = args.get("save")
        if save:
            if not save.startswith("/"):
                raise UsageError(f"--container-save={save}: expected an absolute path")
            o.save = save
        return o

    def spec_kwargs(self):
        """Keyword arguments for build_spec."""
        return {"writable": self.writable, "remap_root": self.remap_root,
                "unshare": list(self.unshare),
                "bind_home": self.mount_home}

    def open_named(self, *, image, image_name=None, uid, job, node=None):
        """The step's named container (hpcc.runtime.named.NamedContainer) or None. Scope:
        launcher.containers_scope ("job": per job and node, removed at the end of the job
        by remove_job; "user": per user on this host)."""
        if not self.name:
            return None
        from .named import open_named

        scope = self.scope()
        return open_named(self.name, image=image, image_name=image_name, privileged=True,
                          uid=uid, job=job, scope=scope, config=self.config,
                          option="--container-name", node=node)

    def scope(self):
        """Where named containers live: "job" (removed at the end of the job) or "user".
        The plugstack line's container_scope= wins over launcher.containers_scope."""
        return self.site_scope or self.config.get("launcher", {}).get("containers_scope",
                                                                      "job")

    def open_save(self, user):
        """(dir_fd, name) of --container-save's PATH, its directory opened with the job
        user's rights (user: {"uid", "gid", "additionalGids"}), or None."""
        if not self.save:
            return None
        from ..squashfs import writer  # noqa: F401  (nothing can be imported after pivot_root)
        from .identity import AsUser
        from .save import open_destination

        with AsUser.of_spec(user):
            return open_destination(self.save)

    def keeps(self, handle, named, save_to):
        """Must the helper's child live until the step ends? (the FUSE daemon's parent, a
        named container's lock and pid, a save at the end)."""
        return bool(handle is not None and handle.fuse_pid) or named is not None \
            or save_to is not None


def attach_fd(named):
    """fd of the mount namespace of the running named container (its keeper's), or None."""
    if named is None or not named.running_pid:
        return None
    try:
        return os.open(f"/proc/{named.running_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError(f"cannot attach to container '{named.name}': {e.strerror}") \
            from None


def entrypoint_args(spec, meta_config):
    """The image's ENTRYPOINT with `true` as its command (an entrypoint ends with
    `exec "$@"`), or None when the image has none."""
    ep = list(meta_config.get("Entrypoint") or [])
    return ep + ["true"] if ep else None


def run_entrypoint(spec, meta_config, *, log=False, privileged=True):
    """Run the image's ENTRYPOINT once in the assembled container (after setup_root, in
    its namespace), as the container's user, before the tasks: what it writes in the
    container stays for them. Returns its output lines when log (else they are dropped).
    Raises LaunchError with its status when it fails."""
    from .process import exec_process

    args = entrypoint_args(spec, meta_config)
    if args is None:
        return []
    def child(w):
        try:
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.close(w)
            run = dict(spec, process=dict(spec["process"], args=args))
            exec_process(run, privileged=privileged)
        except BaseException as e:  # noqa: BLE001 - its message is the output
            os.write(2, f"hpcc: {e}\n".encode())
            return getattr(e, "exit_code", 125)
        return 125

    code, out = output_of_child(child)
    lines = out.decode(errors="replace").splitlines()
    if code != 0:
        last = lines[-1] if lines else ""
        raise LaunchError(f"the image's entrypoint failed (status {code})"
                          + (f": {last}" if last else ""),
                          hint="if the image has an unusual entrypoint, run the step with "
                               "--no-container-entrypoint")
    return lines if log else []


def keep_until_step_end(sock, handle, named=None, save_to=None, spec=None, *,
                        idle_key=None, attached=None, userns_fd=None):
    """In the helper's child, after the namespace was sent: hold the named container's
    lock (and record this pid, or `attached`, the idle keeper whose namespace the step
    reuses, for attaches) and the FUSE daemon until slurmstepd closes the socket at the
    step's end; then write --container-save's image as the job user. With idle_key (a
    job-scope named container this child assembled), the child then stays as the idle
    keeper of the assembled namespace (and of userns_fd, remap-root's user namespace of the
    tasks, when given) for the job's next steps (keep_idle). Returns None, or the save's
    one-line error."""
    from .process import _save

    if named is not None:
        named.record_pid(attached or os.getpid())
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    sock.close()
    problem = None
    if save_to is not None:
        problem = _save(spec, save_to, True)
    if idle_key is not None and named is not None and handle is not None:
        keep_idle(handle, named, idle_key, userns_fd=userns_fd)
        return problem
    if userns_fd is not None:
        os.close(userns_fd)
    if handle is not None:
        handle.close()
    if named is not None:
        named.close()
    return problem


def reuse_key(spec):
    """Digest of what shapes a step's assembled container (root, mounts, hooks, namespaces,
    the container's user and working directory): a later step of the job whose spec has the
    same key may run in the namespace an idle keeper holds. Not in it: the command, and
    what only names the step (its id, the image's fd number) or its creation (fresh_upper:
    the first step sets the new layer's owner)."""
    import hashlib
    import json

    s = {k: v for k, v in spec.items() if k != "process"}
    s["process"] = {k: v for k, v in spec["process"].items() if k != "args"}
    s["hpcc"] = {k: v for k, v in spec["hpcc"].items()
                 if k not in ("image", "warm_bytes", "fresh_upper")}
    ann = dict(s.get("annotations") or {})
    ann.pop("org.hpcc.slurm.step", None)
    s["annotations"] = ann
    text = json.dumps(s, sort_keys=True, default=str)
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:32]


def keep_idle(handle, named, key, poll=2.0, userns_fd=None):
    """Between the job's steps: release the named container's lock (it no longer runs),
    record this process as its idle keeper and hold the assembled mount namespace (and
    the FUSE daemon, and userns_fd: the user namespace remap-root's tasks joined, which the
    next steps of the same settings join too, see reuse_userns_fd) until SIGTERM (the job
    epilog's remove_job, or a later step that needs another assembly) or until the
    container's directory is removed."""
    import signal
    import time

    def _stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        named.record_idle(os.getpid(), key, userns_fd)
        os.close(named.lock_fd)
        named.lock_fd = None
        while os.fstat(named.dir_fd).st_nlink > 0:
            time.sleep(poll)
    except (SystemExit, OSError):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if userns_fd is not None:
            os.close(userns_fd)
        handle.close()
        named.close()


def reuse_fd(pid):
    """fd of the mount namespace an idle keeper holds, or None when it is gone."""
    try:
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def reuse_userns_fd(pid, num):
    """fd of the user namespace the idle keeper `pid` holds as its fd `num` (the one its
    assembling step made for remap-root's tasks: the same settings, so the same mapping),
    or None when it is gone or that fd is not a user namespace (a fresh one is made)."""
    if num is None:
        return None
    try:
        if not os.readlink(f"/proc/{pid}/fd/{int(num)}").startswith("user:["):
            return None
        fd = os.open(f"/proc/{pid}/fd/{int(num)}", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    if os.readlink(f"/proc/self/fd/{fd}").startswith("user:["):
        return fd
    os.close(fd)
    return None


def task_userns_fd(uid, gid):
    """fd of a user namespace mapping 0 to uid/gid, owned by uid, which a task running as
    that user may join (setns) after Slurm dropped its privileges: root inside, the user
    outside (--container-remap-root)."""
    from .idmap import userns_with_maps

    try:
        return userns_with_maps(owner=(uid, gid))
    except OSError:
        raise LaunchError("cannot create the user namespace for --container-remap-root",
                          hint="the admin must allow unprivileged user namespaces") from None


def namespace_fds(kinds, pid=None):
    """{kind: fd} of the network/IPC/UTS namespaces of this process (after setup_root
    unshared them) or of `pid` (a running named container's keeper, when attaching) for
    the tasks to join. With pid, every kind of its own (not the host's) is included."""
    where = "self" if pid is None else str(pid)
    out = {}
    for k in (("net", "ipc", "uts") if pid is not None else kinds):
        fd = os.open(f"/proc/{where}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC)
        if pid is not None and os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{k}").st_ino:
            os.close(fd)
            continue
        out[k] = fd
    return out
