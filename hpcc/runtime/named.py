"""Named containers: a container's writable layer kept under a name for later launches.

`hpcc run --name NAME` and `srun --container-name=NAME[:FLAG]` keep the overlay's upper
layer in a directory of their own instead of the launch's tmpfs; the next launch with that
name mounts the same image under the same upper layer, so what one step installed is there
for the next. Unnamed containers keep their writable layer in the launch's tmpfs, gone when
the container ends.

Where (`launcher.containers_dir`, docs/launcher.md):
- root (the Slurm helper, `hpcc run` as root): `/run/hpcc-containers` by default, every
  directory of the path owned by root and writable by no one else (checked by file
  descriptor, component by component, symlinks refused); in it `job-JOB-uUID/NAME` (scope
  "job", removed at the end of the job by `remove_job`) or `user-UID/NAME` (scope "user",
  kept on the node until removed). The container's files belong to the user only inside
  the layer; every directory above it is root's, so root never works in a place the user
  controls.
- a user (rootless `hpcc run`): `$XDG_RUNTIME_DIR/hpcc-containers`, else
  `/tmp/hpcc-containers-UID` (a directory of theirs, mode 0700).

Each NAME directory holds `upper/` and `work/` (the overlay's), `image` (the image file,
digest and name the container was made from, NUL-separated), `lock`, `pid` and, under
Slurm, `idle` (the process that keeps the assembled namespace between the job's steps). A launch
holds an exclusive flock on `lock` for as long as the container runs: a second launch with
the name finds it running (FLAG exec attaches to it, auto too; no_exec and create refuse).

Flags as pyxis: auto (default: use the container if it exists, else create it; attach
when it runs), create (it must not exist yet), exec (it must be running: attach),
no_exec (never attach).

This module: where a named container lives and who owns it, opening or attaching, its
records and idle keeper (the launch path). Listing and removal (`hpcc containers`, the job
epilog): named_admin.py.
"""
import errno
import fcntl
import os
import stat

from ..errors import LaunchError, UsageError

_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def valid_name(name):
    """1-64 letters, digits, '.', '_', '-', starting with a letter or digit (no `re`: it
    costs the launch ~5 ms of imports)."""
    return (0 < len(name) <= 64 and name[0] not in "_.-"
            and all(c in _NAME_CHARS for c in name))
FLAGS = ("auto", "create", "exec", "no_exec")
ROOT_DEFAULT = "/run/hpcc-containers"
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parse_name(text, option="--name"):
    """'NAME[:FLAG]' -> (NAME, FLAG); one clear line for anything else."""
    name, _, flag = text.partition(":")
    flag = flag or "auto"
    if not valid_name(name):
        raise UsageError(f"bad {option} '{text}': a name is 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    if flag not in FLAGS:
        raise UsageError(f"bad {option} '{text}': the flag after ':' must be one of "
                         + ", ".join(FLAGS))
    return name, flag


def _check_dir(fd, path, owner):
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o022:
        raise LaunchError(f"{path} must be a directory owned by "
                          f"{'root' if owner == 0 else 'you'} and writable by no one else",
                          hint="the admin must fix launcher.containers_dir" if owner == 0
                          else f"remove {path}")


def open_dir_chain(path, owner, create_mode=0o700):
    """fd of directory `path`, walked from / by file descriptor without following symlinks;
    missing components are created (create_mode) and every component must be owned by
    `owner` or root and writable by no one else. Raises LaunchError."""
    if not path.startswith("/"):
        raise LaunchError(f"launcher.containers_dir '{path}' must be an absolute path")
    fd = os.open("/", O_DIR)
    here = ""
    try:
        for comp in [c for c in path.split("/") if c]:
            if comp in (".", ".."):
                raise LaunchError(f"launcher.containers_dir '{path}' must be a plain path")
            here += "/" + comp
            try:
                nfd = os.open(comp, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(comp, create_mode, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise LaunchError(f"cannot create {here}: {e.strerror}") from None
                try:
                    nfd = os.open(comp, O_DIR, dir_fd=fd)
                except OSError as e:
                    raise LaunchError(f"cannot open {here}: {e.strerror}") from None
            except OSError as e:
                what = "is a symlink" if e.errno == errno.ELOOP else e.strerror
                raise LaunchError(f"cannot use {here}: {what}") from None
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if st.st_uid not in (0, owner) or (st.st_mode & 0o022 and not
                                              (st.st_mode & stat.S_ISVTX and st.st_uid == 0)):
                raise LaunchError(f"cannot keep containers under {path}: {here} is not owned "
                                  "by root (or you) or is writable by others")
        return fd
    except BaseException:
        os.close(fd)
        raise


def containers_dir(privileged, config=None, uid=None):
    """The directory that holds the named containers of this caller (not created)."""
    launcher = (config or {}).get("launcher", {})
    if privileged:
        return launcher.get("containers_dir") or ROOT_DEFAULT
    uid = os.getuid() if uid is None else uid
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
            if st.st_uid == uid and stat.S_ISDIR(st.st_mode):
                return os.path.join(xdg, "hpcc-containers")
        except OSError:
            pass
    return f"/tmp/hpcc-containers-{uid}"


def scope_name(privileged, uid, job=None, scope="job", node=None):
    """The per-job or per-user directory name under containers_dir. node: the node's index
    in the job (several slurmd on one host share /run: each node keeps its own)."""
    if not privileged:
        return "user"
    if scope == "job" and job is not None:
        return f"job-{int(job)}-u{int(uid)}" + (f"-n{int(node)}" if node is not None else "")
    return f"user-{int(uid)}"


class NamedContainer:
    """One named container's directory, opened (and locked when it is to run)."""

    def __init__(self, name, flag, path, dir_fd, created, image):
        self.name, self.flag, self.path = name, flag, path
        self.dir_fd = dir_fd
        self.created = created      # True: this launch made it
        self.image = image          # dict recorded at creation: sqfs, digest, name
        self.lock_fd = None
        self.running_pid = None     # the pid to attach to, when it runs and we attach

    @property
    def upper(self):
        return f"{self.path}/upper"

    @property
    def work(self):
        return f"{self.path}/work"

    def lock(self):
        """Take the running lock (kept until close or the process ends)."""
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def record_pid(self, pid):
        """Write the pid a later `exec` attaches to (this process holds the lock)."""
        self._write_record("pid", f"{pid} {_start_time(pid)}\n")

    def record_idle(self, pid, key, userns_fd=None):
        """Write `idle`: the pid of the process that keeps this container's assembled mount
        namespace between the steps of a job, its start time, the key of the step settings
        it was assembled for (hpcc.runtime.stepcontainer.reuse_key) and, with remap-root,
        the number of its fd of the tasks' user namespace (kept for the next steps too)."""
        extra = "" if userns_fd is None else f" {int(userns_fd)}"
        self._write_record("idle", f"{pid} {_start_time(pid)} {key}{extra}\n")

    def _write_record(self, name, text):
        """Replace the record `name` in the container's directory (by its fd, no links
        followed): a temporary file of this process, then a rename."""
        tmp = f"{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dir_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def idle_keeper(self):
        """(pid, key, userns fd number or None) of the process keeping this container's
        namespace between steps, when it still is that process; else None."""
        return _idle_record(self.dir_fd)

    def stop_idle(self):
        """End the idle keeper (its namespace is not the one this launch needs) and wait
        until it is gone: the writable layer must not be mounted twice."""
        stop_idle_keeper(self.dir_fd)

    def close(self):
        for attr in ("lock_fd", "dir_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


def _start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def _running(pid, start):
    """Is pid still the process that started at `start`, and not a zombie (an exited
    keeper whose parent has not reaped it yet has let go of its namespace)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19]) == start and fields[0] not in (b"Z", b"X")
    except (OSError, IndexError, ValueError):
        return False


_FIELDS = ("sqfs", "digest", "name")


def read_record(dir_fd, name):
    """The image record ({"sqfs", "digest", "name"}: NUL-separated fields), or None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        parts = os.read(fd, 1 << 16).decode(errors="surrogateescape").split("\0")
    finally:
        os.close(fd)
    if len(parts) != len(_FIELDS):
        return None
    return {k: (v or None) for k, v in zip(_FIELDS, parts)}


def _running_pid(dir_fd):
    """The pid recorded by the launch that holds the lock, if it still is that process."""
    try:
        fd = os.open("pid", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        pid, start = (int(x) for x in os.read(fd, 64).split())
    except ValueError:
        return None
    finally:
        os.close(fd)
    return pid if _start_time(pid) == start else None


def _idle_keeper(dir_fd):
    """(pid, key) of the live idle keeper recorded in dir_fd, or None."""
    found = _idle_record(dir_fd)
    return found[:2] if found else None


def _idle_record(dir_fd):
    """(pid, key, userns fd number or None) of the live idle keeper, or None."""
    try:
        fd = os.open("idle", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        fields = os.read(fd, 256).decode(errors="replace").split()
        if len(fields) not in (3, 4):
            return None
        pid, start, key = int(fields[0]), int(fields[1]), fields[2]
        userns = int(fields[3]) if len(fields) == 4 else None
    except ValueError:
        return None
    finally:
        os.close(fd)
    if userns is not None and userns < 0:
        return None
    return (pid, key, userns) if pid > 1 and _start_time(pid) == start else None


def stop_idle_keeper(dir_fd, wait=10.0):
    """SIGTERM the idle keeper recorded in dir_fd (checked by its start time: never another
    process that got its pid), wait for it to end (SIGKILL after `wait` s), remove `idle`."""
    import signal
    import time

    found = _idle_keeper(dir_fd)
    if found is not None:
        pid = found[0]
        start = _start_time(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        killed = False
        while _running(pid, start):
            if time.monotonic() > deadline:
                if killed:
                    break  # unkillable (D state): give up rather than hang the epilog
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed, deadline = True, time.monotonic() + 2.0
            time.sleep(0.01)
    try:
        os.unlink("idle", dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def open_named(text, *, image=None, image_name=None, privileged, uid=None, job=None,
               scope="job", config=None, option="--name", node=None):
    """Open (or create) the named container `text` ('NAME[:FLAG]') for a launch.

    image: the launch's ImageRecord, or None when only the name was given (the container
    must exist then). Returns a NamedContainer; when it is running and the flag allows
    attaching, .running_pid is set and nothing is locked, else it is locked for this launch.
    Raises UsageError / LaunchError with one line for the user."""
    name, flag = parse_name(text, option)
    uid = os.getuid() if uid is None else uid
    base = containers_dir(privileged, config, uid)
    if any(c in base for c in ",:\\\n"):
        raise LaunchError(f"containers directory {base}: ',', ':' and '\\' cannot be used "
                          "in an overlay's layer path")
    owner = 0 if privileged else os.getuid()
    top = open_dir_chain(base, owner)
    try:
        _check_dir(top, base, owner)
        sub = scope_name(privileged, uid, job, scope, node)
        try:
            os.mkdir(sub, 0o700, dir_fd=top)
        except FileExistsError:
            pass
        sfd = os.open(sub, O_DIR, dir_fd=top)
    finally:
        os.close(top)
    path = f"{base}/{sub}/{name}"
    try:
        _check_dir(sfd, f"{base}/{sub}", owner)
        created = False
        try:
            os.mkdir(name, 0o700, dir_fd=sfd)
            created = True
        except FileExistsError:
            pass
        nfd = os.open(name, O_DIR, dir_fd=sfd)
    finally:
        os.close(sfd)
    nc = NamedContainer(name, flag, path, nfd, created, None)
    try:
        _check_dir(nfd, path, owner)
        recorded = read_record(nfd, "image")
        if recorded is None:
            created = nc.created = True  # an earlier launch died before recording it
        if not created:
            nc.image = recorded
            if flag == "create":
                raise LaunchError(f"container '{name}' already exists and {option} asked "
                                  f"to create it ({option}={name}:create)",
                                  hint="choose another name or drop ':create'")
        elif image is None:
            raise LaunchError(f"container '{name}' does not exist and no image was given",
                              hint="give an image to create it")
        if nc.lock():
            if flag == "exec":
                raise LaunchError(f"container '{name}' is not running ({option}={name}:exec "
                                  "attaches to a running one)")
            if created:
                for d in ("upper", "work"):
                    try:
                        os.mkdir(d, 0o755, dir_fd=nfd)
                    except FileExistsError:
                        pass
                nc.image = {"sqfs": str(image.sqfs_path),
                            "digest": str(getattr(image, "digest", "") or ""),
                            "name": image_name}
                _write_record(nfd, "image", nc.image)
            return nc
        # it runs
        pid = _running_pid(nfd)
        if flag == "no_exec" or flag == "create" or pid is None:
            raise LaunchError(f"container '{name}' is in use by a running launch",
                              hint=f"wait for it, or attach with {option}={name}:exec"
                              if flag == "no_exec" else "wait for it to end")
        nc.running_pid = pid
        return nc
    except BaseException:
        nc.close()
        raise


def _write_record(dir_fd, name, data):
    text = "\0".join(str(data.get(k) or "").replace("\0", "") for k in _FIELDS)
    tmp = f"{name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode(errors="surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


if __name__ == "__main__":  # python3 -I -m hpcc.runtime.named remove-job JOB (job epilog)
    from hpcc.runtime.named_admin import main
    raise SystemExit(main())
