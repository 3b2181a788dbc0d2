"""The container process (exec_process) and the supervisor that waits for it (run_container).

Process tree of one launch (no pid namespace: MPI ranks and Slurm see real pids):

    hpcc (supervisor; in the new mount [+user] namespace, after pivot_root)
      +- squashfuse_ll   (unprivileged / untrusted image; PR_SET_PDEATHSIG=SIGKILL)
      +- the command     (PR_SET_PDEATHSIG=SIGKILL, no_new_privs, no capabilities)

kill -9 of hpcc kills both children through the death signal; the namespace, and with it
every mount, goes when its last process is gone. kill -9 of the command: hpcc reaps it,
stops the daemon and exits 137.
"""
import errno
import os
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import sys

from ..errors import EXIT_LAUNCH, EXIT_NOEXEC, EXIT_NOTFOUND, HpccError, LaunchError
from . import _sys
from .spec import spec_env

FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT, signal.SIGALRM)
SI_KERNEL = 0x80
PR_SET_CHILD_SUBREAPER = 36


class ExecError(LaunchError):
    def __init__(self, message, code, **kw):
        super().__init__(message, **kw)
        self.exit_code = code


def _set_identity(user, privileged):
    if not privileged:
        # Leave the setup namespace (where the caller is 0) for a nested one mapping the
        # caller's uid and gid to themselves, as `id` shows them on the host.
        from .namespaces import write_id_maps
        _sys.unshare(_sys.CLONE_NEWUSER)
        write_id_maps(user["uid"], 0, user["gid"], 0)
        return
    os.setgroups(user.get("additionalGids") or [])
    os.setresgid(user["gid"], user["gid"], user["gid"])
    os.setresuid(user["uid"], user["uid"], user["uid"])


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
        _set_identity(p["user"], privileged)
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


def run_container(spec, *, privileged=None, log=None, supervise=True):
    """Enter namespaces, set up the root and run the command.

    supervise=True (the CLI): fork the command and wait for it, forwarding signals; return
    its exit status (128+N when it died by signal N, like docker run). supervise=False:
    become the command (execve in this process: same pid, one process less; the FUSE daemon
    is its child and dies with it); allowed only without poststart/poststop hooks."""
    from . import rootfs
    from .ocihooks import run_hooks, state

    if privileged is None:
        privileged = os.geteuid() == 0
    hooks = spec.get("hooks") or {}
    if hooks.get("poststart") or hooks.get("poststop"):
        supervise = True
    warn = log or (lambda m: None)
    rootfs.enter_namespaces(privileged)
    handle = rootfs.setup_root(spec, privileged, log=log)
    warn("root ready")
    if not supervise:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        exec_process(spec, privileged=privileged)  # returns only by raising
    parent = os.getpid()
    _sys.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the command come back to us
    sigs = set(FORWARD) | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
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
    st = state(spec, "running", pid, handle.bundle, handle.id)
    run_hooks(spec, "poststart", st, root_fd=handle.host_root_fd, warn=warn)
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
                elif wpid == handle.fuse_pid:
                    handle.fuse_pid = None
            if done:
                break
            continue
        # A signal the kernel sent to the whole foreground process group (Ctrl-C, terminal
        # hangup, window size) reached the command already; forward only the others.
        if info.si_code != SI_KERNEL:
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass
    _kill_leftovers({os.getpid(), handle.fuse_pid})
    warn(f"command exited ({code})")
    if handle.warming:
        warn(handle.warming.summary())
    st = state(spec, "stopped", pid, handle.bundle, handle.id)
    run_hooks(spec, "poststop", st, root_fd=handle.host_root_fd, warn=warn)
    handle.close()
    return code
