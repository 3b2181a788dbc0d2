"""hpcc's container runtime: an OCI-shaped spec, a root assembled from a squashfs image,
OCI hooks, and the container process. Python, with the system calls Python 3.11 lacks in a
small C extension (`_linux.c`); nothing here is or needs to be setuid.

API (usable on its own, e.g. by the Slurm helper as root in slurmstepd):

build_spec(image, *, mode="run", command=None, entrypoint=None, env=(), env_files=(),
           mounts=(), workdir=None, writable=False, bind_home=None, bind_cwd=None,
           user=None, annotations=None, config=None, privileged=None, host_env=None,
           cwd=None, image_name=None) -> dict
    The OCI runtime config of one container: ociVersion, process{args, env, cwd,
    user{uid, gid, additionalGids}, noNewPrivileges, capabilities (all empty)},
    root{path, readonly}, mounts[] (proc, sys, minimal /dev, /dev/pts, /dev/shm, devices
    from config, tmpfs /tmp, site binds, home, cwd, user binds), hooks{stage: [...]} (the
    hooks.d configs that match), annotations{org.hpcc.image, ...}, linux{namespaces,
    uid/gidMappings}, plus "hpcc" (private: squashfs path, passwd/group lines, fds to keep).
    `image` is an hpcc.image.ImageRecord (or any object with sqfs_path, digest, meta).
    Docker semantics for ENTRYPOINT/CMD (mode "run"), the command as is (mode "exec"), the
    user's shell or /bin/sh (mode "shell"). Environment precedence: docs/launcher.md.

enter_namespaces(privileged) -> None
    unshare a mount namespace (+ a user namespace mapping the caller to themselves when
    unprivileged) and make every mount private. The caller must be single-threaded.

setup_root(spec, privileged=False, *, container_id=None, pivot=True, log=None) -> RootHandle
    In the calling process, already in its own mount namespace (and user namespace when
    unprivileged): mounts the image (kernel squashfs via a loop device, ro,nodev,nosuid, when
    privileged and the file is root-owned and not writable by others; squashfuse_ll otherwise),
    builds root = overlay(image, tmpfs), writes /etc/passwd, /etc/group, /etc/resolv.conf,
    /etc/hosts into the overlay, applies spec["mounts"] with every target resolved inside the
    root (openat2 RESOLVE_IN_ROOT; bind sources by O_PATH fd; missing targets created only in
    the overlay or a tmpfs), writes <bundle>/config.json with root.path = the host-visible root
    (when hooks are configured: they are its readers), runs the createRuntime, prestart and
    createContainer hooks (children of this process; OCI state on stdin, pid = this process),
    makes the root read-only unless spec["root"]["readonly"] is false, and (pivot=True)
    pivot_roots into it, detaching the host's tree. RootHandle: .id, .bundle, .fuse_pid (the
    squashfuse_ll daemon, a child of this process that dies with it), .close().

exec_process(spec, *, privileged=None) -> never returns
    After setup_root, in the process that becomes the command: startContainer hooks,
    chdir to process.cwd (inside the root), supplementary groups/gid/uid (root callers),
    PR_SET_NO_NEW_PRIVS, every capability set emptied, every fd closed but 0-2 and those
    named by PMI_FD/PMI_*FD/PMIX_*FD, signal dispositions reset, execve with a PATH search
    in the container's env. Raises LaunchError (125) or ExecError (126 not executable,
    127 not found) when it cannot exec.

run_container(spec, *, privileged=None, log=None, supervise=True) -> int
    The whole launch for the CLI: enter_namespaces, setup_root, fork + exec_process, wait
    while forwarding SIGINT/TERM/HUP/QUIT/USR1/USR2/WINCH/CONT/ALRM (not those the terminal
    already sent to the whole process group), poststart/poststop hooks, stop the FUSE
    daemon; returns the command's status (128+N for signal N). supervise=False (no
    poststart/poststop hooks): exec_process in this very process instead (same pid, one
    process less; the squashfuse_ll daemon, its child in its own session, dies with it).
"""
from .process import ExecError, exec_process, run_container
from .rootfs import RootHandle, enter_namespaces, setup_root
from .spec import build_spec

__all__ = ["build_spec", "enter_namespaces", "setup_root", "exec_process", "run_container",
           "RootHandle", "ExecError"]
