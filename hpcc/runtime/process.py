"""The container process (exec_process) and the supervisor that waits for it (run_container).

Process tree of one launch (no pid namespace: MPI ranks and Slurm see real pids):

    hpcc (supervisor; in the new mount [+user] namespace, after pivot_root)
      +- squashfuse_ll   (unprivileged / untrusted image; PR_SET_PDEATHSIG=SIGKILL)
      +- the command     (PR_SET_PDEATHSIG=SIGKILL, no_new_privs, no capabilities)

kill -9 of hpcc kills both children through the death signal; the namespace, and with it
every mount, goes when its last process is gone. kill -9 of the command: hpcc reaps it,
stops the daemon and exits 137.
"""
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import errno
import os
import sys

from ..errors import EXIT_LAUNCH, EXIT_NOEXEC, EXIT_NOTFOUND, HpccError, LaunchError
from . import _sys
from .spec import spec_env

FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT, signal.SIGALRM)
SI_KERNEL = 0x80
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4


class ExecError(LaunchError):
    def __init__(self, message, code, **kw):
        super().__init__(message, **kw)
        self.exit_code = code


def _set_identity(spec, privileged):
    """Become the container's user. remap_root: uid and gid 0 in a user namespace of the
    command's own that maps them to the user's ids outside (its capabilities count only in
    that namespace, whose mount namespace it does not own: it cannot mount)."""
    from .namespaces import write_id_maps
    user = spec["process"]["user"]
    h = spec.get("hpcc", {})
    remap = h.get("remap_root")
    if not privileged:
        # Leave the setup namespace (where the caller is 0) for a nested one mapping the
        # caller's uid and gid to themselves, as `id` shows them on the host (or to 0).
        _sys.unshare(_sys.CLONE_NEWUSER)
        if remap:
            write_id_maps(0, 0, 0, 0)
        else:
            write_id_maps(user["uid"], 0, user["gid"], 0)
        return
    outside = h.get("host_user") or user
    os.setgroups(outside.get("additionalGids") or [])
    os.setresgid(outside["gid"], outside["gid"], outside["gid"])
    os.setresuid(outside["uid"], outside["uid"], outside["uid"])
    if remap:
        _sys.prctl(PR_SET_DUMPABLE, 1)  # /proc/self/uid_map is ours to write again
        _sys.unshare(_sys.CLONE_NEWUSER)
        write_id_maps(0, outside["uid"], 0, outside["gid"])


def _close_fds(keep):
    keep = sorted({0, 1, 2, *keep})
    lo = 0
    for k in keep:
        if k > lo:
            _sys.close_range(lo, k - 1)
        lo = k + 1
    _sys.close_range(lo)
    for k in keep[3:]:
        try:
            os.set_inheritable(k, True)
        except OSError:
            pass


def _execute(args, env):
    """execve with PATH search in the container's env; 127 not found, 126 not executable."""
    prog = args[0]
    if "/" in prog:
        candidates = [prog]
    else:
        candidates = [os.path.join(d or ".", prog)
                      for d in env.get("PATH", "/usr/bin:/bin").split(":")]
    denied = None
    for c in candidates:
        try:
            os.execve(c, args, env)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if e.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
                denied = (c, e)
                continue
            raise ExecError(f"cannot execute {c}: {e.strerror}", EXIT_NOEXEC) from None
    if denied:
        raise ExecError(f"cannot execute {denied[0]}: {denied[1].strerror}", EXIT_NOEXEC)
    where = "" if "/" in prog else " in $PATH"
    raise ExecError(f"{prog}: command not found{where} in the container", EXIT_NOTFOUND)


def exec_process(spec, *, privileged=None):
    """In the container (after setup_root): startContainer hooks, identity, no_new_privs,
    no capabilities, only stdio + PMI fds, chdir inside the root, execve. Never returns;
    raises LaunchError/ExecError (exit_code 125/126/127) when it cannot exec."""
    p = spec["process"]
    if privileged is None:
        privileged = spec.get("hpcc", {}).get("privileged", os.geteuid() == 0)
    env = spec_env(spec)
    if spec.get("hooks", {}).get("startContainer"):
        from .ocihooks import run_hooks, state
        run_hooks(spec, "startContainer", state(spec, "created", os.getpid(), "", ""))
    try:
        _sys.drop_bounding()  # while CAP_SETPCAP is still ours (before the uid changes)
        _set_identity(spec, privileged)
    except OSError as e:
        raise LaunchError(f"cannot switch to the container's user: {e}") from None
    cwd = p.get("cwd") or "/"
    try:  # as the user: a directory they may not enter is an error, as on the host
        os.chdir(cwd)
    except OSError as e:
        raise LaunchError(f"cannot enter the working directory {cwd}: {e.strerror}") from None
    try:
        here = os.getcwd()
    except OSError:
        here = ""
    if not here.startswith("/"):  # CVE-2024-21626: never start outside the root
        raise LaunchError("the working directory is outside the container root")
    try:
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        if not spec.get("hpcc", {}).get("remap_root"):
            _sys.drop_all_capabilities()
    except OSError as e:
        raise LaunchError(f"cannot drop privileges: {e}") from None
    for s in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARD, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _close_fds(spec.get("hpcc", {}).get("keep_fds", []))
    args = list(p["args"])
    try:
        _execute(args, env)
    except ExecError as e:
        fb = spec.get("hpcc", {}).get("fallback_args")
        if fb and e.exit_code == EXIT_NOTFOUND:
            _execute(list(fb), env)
        raise


def _status_code(status):
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return EXIT_LAUNCH


def _children():
    out = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _kill_leftovers(keep):
    """End what the command left behind (there is no pid namespace to do it): hpcc is a
    child subreaper, so every orphaned descendant of the command is now its child."""
    for _ in range(100):
        left = [p for p in _children() if p not in keep]
        if not left:
            return
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        for p in left:
            try:
                os.waitpid(p, 0)
            except ChildProcessError:
                pass


def run_container(spec, *, privileged=None, log=None, supervise=True, named=None,
                  save_to=None, premount=None):
    """Enter namespaces, set up the root and run the command.

    supervise=True (the CLI): fork the command and wait for it, forwarding signals; return
    its exit status (128+N when it died by signal N, like docker run). supervise=False:
    become the command (execve in this process: same pid, one process less; the FUSE daemon
    is its child and dies with it); allowed only without poststart/poststop hooks, a named
    container or a save.
    named: the NamedContainer (locked) whose layer this container writes; the supervisor
    records its pid there for `exec` attaches and holds the lock until it ends.
    save_to: (dir_fd, name): after the command, write the container's root there as a
    squashfs image (hpcc.runtime.save), as the user; a failure to save makes the status 125
    when the command itself succeeded.
    premount: an imagemount.HelperMount the caller started early (unprivileged only)."""
    from . import rootfs
    from .ocihooks import run_hooks, state

    if privileged is None:
        privileged = os.geteuid() == 0
    hooks = spec.get("hooks") or {}
    if hooks.get("poststart") or hooks.get("poststop") or named or save_to:
        supervise = True
    warn = log or (lambda m: None)
    mount = None
    if not privileged:  # before the user namespace: setuid does not work inside it
        if premount is None:
            from .imagemount import HelperMount
            premount = HelperMount.for_spec(spec)
        mount = premount.result()
    rootfs.enter_namespaces(privileged)
    handle = rootfs.setup_root(spec, privileged, log=log, premount=mount)
    warn("root ready")
    if not supervise:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        exec_process(spec, privileged=privileged)  # returns only by raising
    if named is not None:
        named.record_pid(os.getpid())
    pid = _start_command(spec, privileged)
    st = state(spec, "running", pid, handle.bundle, handle.id)
    run_hooks(spec, "poststart", st, root_fd=handle.host_root_fd, warn=warn)
    code = _supervise(pid, handle)
    _kill_leftovers({os.getpid(), handle.fuse_pid})
    warn(f"command exited ({code})")
    if handle.warming:
        warn(handle.warming.summary())
    if save_to is not None:
        problem = _save(spec, save_to, privileged)
        if problem:
            sys.stderr.write(f"hpcc: {problem}\n")
            if code == 0:
                code = EXIT_LAUNCH
        else:
            warn("container saved")
    st = state(spec, "stopped", pid, handle.bundle, handle.id)
    run_hooks(spec, "poststop", st, root_fd=handle.host_root_fd, warn=warn)
    handle.close()
    return code


def _save(spec, save_to, privileged):
    """Write the overlay root (a non-recursive clone of /: no binds) as an image."""
    from .save import save_in_child

    try:
        tree = _sys.open_tree(_sys.AT_FDCWD, "/", _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC)
    except OSError as e:
        return f"cannot save the container: {e.strerror}"
    try:
        user = spec["hpcc"].get("host_user") if privileged else None
        return save_in_child(tree, save_to, user=user)
    finally:
        os.close(tree)


def _start_command(spec, privileged):
    """Fork the command (exec_process in the child, PR_SET_PDEATHSIG); signals to forward
    and SIGCHLD stay blocked here for _supervise."""
    parent = os.getpid()
    _sys.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the command come back to us
    signal.pthread_sigmask(signal.SIG_BLOCK, set(FORWARD) | {signal.SIGCHLD})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    pid = os.fork()
    if pid == 0:
        code = EXIT_LAUNCH
        try:
            _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(137)
            exec_process(spec, privileged=privileged)
        except HpccError as e:
            code = e.exit_code
            os.write(2, f"hpcc: {e}\n".encode())
        except BaseException as e:  # never let the child return into the CLI
            os.write(2, f"hpcc: internal error before exec: {e!r}\n".encode())
        os._exit(code)
    return pid


def _supervise(pid, handle):
    """Wait for the command, forwarding signals; its status (128+N for signal N)."""
    sigs = set(FORWARD) | {signal.SIGCHLD}
    code = EXIT_LAUNCH
    while True:
        info = signal.sigwaitinfo(sigs)
        if info.si_signo == signal.SIGCHLD:
            done = False
            while True:
                try:
                    wpid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if wpid == 0:
                    break
                if wpid == pid:
                    code = _status_code(status)
                    done = True
                elif handle is not None and wpid == handle.fuse_pid:
                    handle.fuse_pid = None
            if done:
                return code
            continue
        # A signal the kernel sent to the whole foreground process group (Ctrl-C, terminal
        # hangup, window size) reached the command already; forward only the others.
        if info.si_code != SI_KERNEL:
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass


def attach_container(spec, target_pid, *, privileged=None, log=None):
    """Run spec's process in the running container whose supervisor is target_pid (a named
    container's, `--name NAME:exec`): join its namespaces (user and mount when
    unprivileged; mount as root; network, IPC and UTS when it has its own), then fork the
    command as run_container does and wait for it. The container's root, binds and writable
    layer are the running one's; spec's mounts are not applied."""
    if privileged is None:
        privileged = os.geteuid() == 0
    warn = log or (lambda m: None)
    kinds = (["user"] if not privileged else []) + ["mnt", "net", "ipc", "uts"]
    fds = []
    try:
        for kind in kinds:
            try:
                fd = os.open(f"/proc/{target_pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise LaunchError(f"cannot attach to the running container: {e.strerror}") \
                    from None
            if os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino:
                os.close(fd)
                continue
            fds.append((kind, fd))
        for kind, fd in fds:
            try:
                _sys.setns(fd, 0)
            except OSError as e:
                raise LaunchError(f"cannot join the running container's {kind} namespace: "
                                  f"{e.strerror}") from None
    finally:
        for _, fd in fds:
            os.close(fd)
    os.chdir("/")
    warn("attached")
    spec.setdefault("hpcc", {})["keep_fds"] = spec["hpcc"].get("keep_fds", [])
    pid = _start_command(spec, privileged)
    code = _supervise(pid, None)
    _kill_leftovers({os.getpid()})
    warn(f"command exited ({code})")
    return code
