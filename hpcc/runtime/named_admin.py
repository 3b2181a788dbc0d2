"""Named containers seen from outside a launch: listing them (`hpcc containers`), removing
one (`hpcc containers rm`) and removing a job's at its end (the job epilog's
`python3 -I -m hpcc.runtime.named remove-job JOB`). Every removal goes by file descriptor and
never follows a symlink a user may have left in a layer; a running container (its lock
held) is not removed, an idle keeper is stopped first. The directories and records
themselves: named.py."""
import errno
import os
import stat

from ..errors import LaunchError
from .named import (
    O_DIR,
    NamedContainer,
    containers_dir,
    open_dir_chain,
    parse_name,
    read_record,
    scope_name,
    stop_idle_keeper,
    valid_name,
)


def remove_tree(parent_fd, name):
    """Remove parent_fd/name and everything under it, by file descriptor, never following a
    symlink. A directory its owner cannot enter (the overlay leaves work/work at mode 0) is
    made 0700 first, through an O_PATH descriptor (so a symlink is not followed)."""
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except PermissionError:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                raise
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(name, dir_fd=parent_fd)
            return
        raise
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_job(job, config=None):
    """Remove every named container of job `job` on this node (root, at the end of the
    job). Returns the number removed. The tree is removed by file descriptor, never
    following a symlink a user may have left in a layer."""
    import re

    base = containers_dir(True, config)
    try:
        top = open_dir_chain(base, 0)
    except LaunchError:
        return 0
    n = 0
    try:
        pattern = re.compile(rf"job-{int(job)}-u[0-9]+(-n[0-9]+)?\Z")
        for entry in os.listdir(top):
            if pattern.match(entry):
                try:
                    _stop_idle_keepers(top, entry)
                    remove_tree(top, entry)
                    n += 1
                except OSError:
                    pass
    finally:
        os.close(top)
    return n


def _stop_idle_keepers(top, entry):
    """End the processes keeping the namespaces of the named containers in top/entry."""
    try:
        sfd = os.open(entry, O_DIR, dir_fd=top)
    except OSError:
        return
    try:
        for name in os.listdir(sfd):
            try:
                nfd = os.open(name, O_DIR, dir_fd=sfd)
            except OSError:
                continue
            try:
                stop_idle_keeper(nfd)
            finally:
                os.close(nfd)
    finally:
        os.close(sfd)


def remove_named(text, *, privileged, uid=None, job=None, scope="user", config=None):
    """Remove one named container that is not running. Returns False when it does not
    exist; raises LaunchError when it runs."""
    name, _ = parse_name(text)
    uid = os.getuid() if uid is None else uid
    base = containers_dir(privileged, config, uid)
    sub = scope_name(privileged, uid, job, scope)
    owner = 0 if privileged else os.getuid()
    try:
        top = open_dir_chain(base, owner)
    except LaunchError:
        return False
    try:
        try:
            sfd = os.open(sub, O_DIR, dir_fd=top)
        except FileNotFoundError:
            return False
        try:
            try:
                nfd = os.open(name, O_DIR, dir_fd=sfd)
            except FileNotFoundError:
                return False
            nc = NamedContainer(name, "auto", f"{base}/{sub}/{name}", nfd, False, None)
            try:
                if not nc.lock():
                    raise LaunchError(f"container '{name}' is running; it cannot be removed")
                stop_idle_keeper(nfd)
                try:
                    remove_tree(sfd, name)
                except OSError as e:
                    raise LaunchError(f"cannot remove container '{name}': {e.strerror}") \
                        from None
            finally:
                nc.close()
            return True
        finally:
            os.close(sfd)
    finally:
        os.close(top)


def list_named(*, privileged, uid=None, job=None, scope="user", config=None):
    """[(name, image dict, running)] of the caller's named containers (sorted by name)."""
    uid = os.getuid() if uid is None else uid
    base = containers_dir(privileged, config, uid)
    sub = scope_name(privileged, uid, job, scope)
    out = []
    try:
        top = os.open(f"{base}/{sub}", O_DIR)
    except OSError:
        return out
    try:
        for name in sorted(os.listdir(top)):
            if not valid_name(name):
                continue
            try:
                nfd = os.open(name, O_DIR, dir_fd=top)
            except OSError:
                continue
            nc = NamedContainer(name, "auto", f"{base}/{sub}/{name}", nfd, False, None)
            try:
                image = read_record(nfd, "image") or {}
                running = not nc.lock()
                out.append((name, image, running))
            finally:
                nc.close()
    finally:
        os.close(top)
    return out


def main(argv=None):
    """python3 -I -m hpcc.runtime.named remove-job JOB (named.py hands over to this): root, at
    the end of a job (a Slurm Epilog, or the plugin's job epilog), removes the job's named
    containers on this node."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "remove-job" or not argv[1].isdigit():
        sys.stderr.write("usage: python3 -m hpcc.runtime.named remove-job JOB\n")
        return 2
    if os.geteuid() != 0:
        sys.stderr.write("hpcc.runtime.named: remove-job is for root\n")
        return 1
    from ..config import load_config
    try:
        config = load_config(validate_schema=False)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        sys.stderr.write(f"hpcc.runtime.named: {e}\n")
        return 1
    remove_job(int(argv[1]), config)
    return 0
