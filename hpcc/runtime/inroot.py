"""Paths inside a container root, for everything hpcc and its hooks do there as root.

One module, used by the runtime (mount targets, /etc files) and by the OCI hooks
(hooks/root.py), so there is one rule:

- Lookup: a path is resolved as if the root were `/`: symlinks (absolute or climbing) stay
  inside it, magic links (/proc/self/...) are refused. openat2(RESOLVE_IN_ROOT) does it,
  retried when it returns EAGAIN (a rename or mount anywhere on the system raced with the
  lookup: the kernel's advice is to retry); where the kernel lacks openat2 (before 5.6, or
  a seccomp filter answering ENOSYS/EPERM), one walk does the same, a component at a time
  with O_NOFOLLOW, following each symlink by re-walking its target from the root or the
  directory it sits in, never opening `..` (it pops the walked stack instead).
- Changes: anything created, replaced or removed inside the container lands only on the
  container's own writable layer, i.e. a filesystem whose device is in `writable_devs`
  (the overlay root with its tmpfs upper layer, and the tmpfs mounts hpcc made). A host
  directory bound into the container, the image, or anything else is refused.
"""
import errno
import os
import stat

from ..errors import MountError
from . import _sys
from .spec import clean_dest

O_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
RESOLVE = _sys.RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS
MAX_LINKS = 40
_HAVE_OPENAT2 = True


def _walk(root_fd, rel, flags, follow):
    """openat2(RESOLVE_IN_ROOT) for kernels without it: one O_NOFOLLOW step at a time."""
    todo = [c for c in rel.split("/") if c not in ("", ".")]
    stack = [os.dup(root_fd)]
    links = 0
    plain = (flags & ~(os.O_NOFOLLOW | os.O_CLOEXEC)) == os.O_PATH
    done = False  # the top of the stack was opened with `flags`
    try:
        while todo:
            comp = todo.pop(0)
            done = False
            if comp == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not todo
            fd = os.open(comp, O_PATH_FLAGS | os.O_NOFOLLOW, dir_fd=stack[-1])
            if stat.S_ISLNK(os.fstat(fd).st_mode) and (follow or not last):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(comp, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo = [c for c in target.split("/") if c not in ("", ".")] + todo
                continue
            if last and not plain:
                os.close(fd)
                fd = os.open(comp, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                done = True
            stack.append(fd)
        if plain:
            return os.dup(stack[-1])
        if done:
            return stack.pop()
        # ended on a directory reached by `..` or a symlink's target (or the root itself)
        return os.open(".", (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(root_fd, path, flags=O_PATH_FLAGS, *, follow=True):
    """Open `path` as seen from inside the root (see the module docstring). follow=False
    opens a final symlink itself (O_PATH) instead of its target. Returns an fd; raises
    OSError."""
    global _HAVE_OPENAT2
    rel = clean_dest(path).lstrip("/") or "."
    if not follow:
        flags |= os.O_NOFOLLOW
    if _HAVE_OPENAT2:
        for _ in range(64):
            try:
                return _sys.openat2(root_fd, rel, flags | os.O_CLOEXEC, RESOLVE)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    continue
                if e.errno not in (errno.ENOSYS, errno.EPERM) or e.errno == errno.EPERM \
                        and not _openat2_filtered(root_fd):
                    raise
                _HAVE_OPENAT2 = False
                break
    return _walk(root_fd, rel, flags, follow)


def _openat2_filtered(root_fd):
    """EPERM from openat2 means a seccomp filter only if the plainest call fails too."""
    try:
        os.close(_sys.openat2(root_fd, ".", O_PATH_FLAGS, RESOLVE))
        return False
    except OSError as e:
        return e.errno in (errno.ENOSYS, errno.EPERM)


def container_path(root_fd, fd):
    """The container-absolute path of an fd opened inside the root (from /proc/self/fd),
    or None when the fd is not below the root."""
    top = os.readlink(f"/proc/self/fd/{root_fd}").rstrip("/")
    real = os.readlink(f"/proc/self/fd/{fd}")
    if real == top or real == top + "/":
        return "/"
    if not real.startswith(top + "/"):
        return None
    return real[len(top):]


def resolve_target(root_fd, path, create=None, writable_devs=(), _depth=0):
    """fd (O_PATH) of the mount target `path` inside the root. Missing components are
    created (directories, or an empty file last when create == "file") only on the
    filesystems in writable_devs (the overlay and tmpfs mounts of this container), never
    on a bind of a host directory."""
    try:
        return open_in_root(root_fd, path)
    except OSError as e:
        if e.errno != errno.ENOENT or not create:
            raise MountError(f"cannot resolve {path} in the container: {e.strerror}") from None
    parts = [p for p in clean_dest(path).split("/") if p]
    cur = os.dup(root_fd)
    try:
        for i, comp in enumerate(parts):
            sub = "/" + "/".join(parts[:i + 1])
            try:
                nfd = open_in_root(root_fd, sub)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise MountError(f"cannot resolve {sub} in the container: {e.strerror}") \
                        from None
                if os.fstat(cur).st_dev not in writable_devs:
                    raise MountError(
                        f"mount point {path} does not exist and would have to be created "
                        f"on a host directory bound into the container",
                        hint="create it on the host or choose another destination") from None
                try:
                    if create == "file" and i == len(parts) - 1:
                        os.close(os.open(comp, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=cur))
                    else:
                        os.mkdir(comp, 0o755, dir_fd=cur)
                except FileExistsError:
                    # a dangling symlink: create what it points to, inside the root
                    try:
                        link = os.readlink(comp, dir_fd=cur)
                    except OSError:
                        link = None
                    if link is None or _depth > 16:
                        raise MountError(f"cannot create mount point {path}: {sub} is a "
                                         "dangling symlink in the image") from None
                    base = "/" + "/".join(parts[:i])
                    rest = "/".join(parts[i + 1:])
                    target = os.path.join(base, link, rest) if rest else os.path.join(base, link)
                    os.close(cur)
                    cur = -1
                    return resolve_target(root_fd, clean_dest(target), create, writable_devs,
                                          _depth + 1)
                except OSError as e2:
                    raise MountError(f"cannot create mount point {path}: {e2.strerror}") \
                        from None
                nfd = open_in_root(root_fd, sub)
            os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        if cur >= 0:
            os.close(cur)
        raise


def _replace_file(dir_fd, name, cpath, data, mode, owner=None):
    """Put a new regular file `name` holding `data` in directory dir_fd (already checked
    to be on the writable layer), replacing what is there unless it is a directory. A
    symlink there is removed, never followed: the file is created O_EXCL|O_NOFOLLOW.
    owner: (uid, gid) to give it, or None to keep the creator's."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise MountError(f"cannot write {cpath}: the container has a directory there")
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if owner is not None:  # (uid, gid): the image's root as the user (idmapped)
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_file_in_root(root_fd, path, data, writable_devs, mode=0o644, owner=None):
    """Replace `path` inside the root by a new regular file with `data` (in the overlay:
    the image is not changed). A symlink at `path` is replaced, not followed."""
    parent = resolve_target(root_fd, os.path.dirname(clean_dest(path)), "dir", writable_devs)
    name = os.path.basename(path)
    try:
        if os.fstat(parent).st_dev not in writable_devs:
            raise MountError(f"cannot write {path}: its directory is a host bind")
        _replace_file(parent, name, path, data, mode, owner)
    except OSError as e:
        raise MountError(f"cannot write {path} in the container: {e.strerror}") from None
    finally:
        os.close(parent)


def read_file_in_root(root_fd, path, limit=4 << 20):
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, limit)
    finally:
        os.close(fd)




# ---------------------------------------------------------------------------------------
# changes inside the root: only on the container's own writable layer

class NotOwnLayer(MountError):
    """A change refused by the writable-layer rule; .directory is the directory (inside the
    container) that would have changed."""

    def __init__(self, message, *, hint=None, directory=None):
        super().__init__(message, hint=hint)
        self.directory = directory


def refuse_unless_writable(dir_fd, cpath, writable_devs, what="create"):
    """The one rule for changes: `dir_fd` (the directory that would change) must be on a
    filesystem in writable_devs; otherwise one line naming the path."""
    if os.fstat(dir_fd).st_dev not in writable_devs:
        raise NotOwnLayer(f"refusing to {what} {cpath} in the container: its directory is not "
                         "on the container's own writable layer (it is a host directory bound "
                         "into the container, or the image), and hpcc never writes there",
                         hint="bind that host directory elsewhere in the container",
                         directory=os.path.dirname(clean_dest(cpath)))


def parent_in_root(root_fd, cpath, writable_devs, *, create=True):
    """(fd of the directory that holds cpath, its last component). Missing directories are
    created (create=True) on the writable layer only."""
    parent, name = os.path.split(clean_dest(cpath))
    if not name or name in (".", ".."):
        raise MountError(f"bad container path {cpath!r}")
    if create:
        os.close(makedirs(root_fd, parent, writable_devs))
    try:
        return open_in_root(root_fd, parent, O_PATH_FLAGS | os.O_DIRECTORY), name
    except OSError as e:
        raise MountError(f"cannot resolve {parent} in the container: {e.strerror}") from None


def makedirs(root_fd, cpath, writable_devs, mode=0o755):
    """fd (O_PATH) of directory cpath, creating what is missing on the writable layer."""
    done = ""
    cur = os.dup(root_fd)
    try:
        for comp in [c for c in clean_dest(cpath).split("/") if c]:
            done += "/" + comp
            try:
                nfd = open_in_root(root_fd, done, O_PATH_FLAGS | os.O_DIRECTORY)
            except NotADirectoryError:
                raise MountError(f"{done} exists in the container but is not a "
                                 "directory") from None
            except FileNotFoundError:
                pfd, name = parent_in_root(root_fd, done, writable_devs, create=False)
                try:
                    refuse_unless_writable(pfd, done, writable_devs)
                    os.mkdir(name, mode, dir_fd=pfd)
                except FileExistsError:
                    pass  # a dangling symlink: the lookup below says what it is
                except OSError as e:
                    raise MountError(f"cannot create {done} in the container: "
                                     f"{e.strerror}") from None
                finally:
                    os.close(pfd)
                try:
                    nfd = open_in_root(root_fd, done, O_PATH_FLAGS | os.O_DIRECTORY)
                except OSError as e:
                    raise MountError(f"cannot create {done} in the container: "
                                     f"{e.strerror}") from None
            os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        os.close(cur)
        raise


def create_file(root_fd, cpath, writable_devs, mode=0o644):
    """Make sure a regular file or device exists at cpath (a bind target): an existing one
    is kept wherever it is (a bind over it writes nothing); a new one is an empty file on
    the writable layer, replacing a dangling symlink there (never followed)."""
    try:
        os.close(open_in_root(root_fd, cpath))
        return
    except OSError:
        pass
    pfd, name = parent_in_root(root_fd, cpath, writable_devs)
    try:
        refuse_unless_writable(pfd, cpath, writable_devs)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=pfd))
        except FileExistsError:
            pass
    except OSError as e:
        raise MountError(f"cannot create {cpath} in the container: {e.strerror}") from None
    finally:
        os.close(pfd)


def symlink(root_fd, target, cpath, writable_devs, *, replace=False):
    """Create symlink cpath -> target on the writable layer (replace=True: an existing
    non-directory there is replaced). Returns False when it exists and replace is False."""
    pfd, name = parent_in_root(root_fd, cpath, writable_devs)
    try:
        refuse_unless_writable(pfd, cpath, writable_devs)
        try:
            os.symlink(target, name, dir_fd=pfd)
        except FileExistsError:
            if not replace:
                return False
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise MountError(f"{cpath} is a directory in the container") from None
            os.unlink(name, dir_fd=pfd)
            os.symlink(target, name, dir_fd=pfd)
        return True
    except OSError as e:
        raise MountError(f"cannot create {cpath} in the container: {e.strerror}") from None
    finally:
        os.close(pfd)


def write_file(root_fd, cpath, data, writable_devs, mode=0o644):
    """Replace cpath by a regular file holding data, on the writable layer (a symlink
    there is replaced, never written through)."""
    pfd, name = parent_in_root(root_fd, cpath, writable_devs)
    try:
        refuse_unless_writable(pfd, cpath, writable_devs, "write")
        _replace_file(pfd, name, cpath, data, mode)
    except OSError as e:
        raise MountError(f"cannot write {cpath} in the container: {e.strerror}") from None
    finally:
        os.close(pfd)


def overlay_on_own_layer(root_fd, dir_cpath, writable_devs):
    """Give directory dir_cpath (a host directory bound into the container, say) a writable
    layer of the container's own: an overlay whose lower layer is what is there now and
    whose upper layer is a fresh tmpfs, mounted over it. New entries then land in that tmpfs
    and the host directory is never changed (rule W). The tmpfs is mounted on a scratch
    directory of the root's own layer, which is detached and removed once the overlay holds
    it. Adds the overlay's device to writable_devs; raises MountError."""
    try:
        dfd = open_in_root(root_fd, dir_cpath, O_PATH_FLAGS | os.O_DIRECTORY)
    except OSError as e:
        raise MountError(f"cannot resolve {dir_cpath} in the container: {e.strerror}") from None
    scratch = f".hpcc-layer-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        refuse_unless_writable(root_fd, f"/{scratch}", writable_devs)
        os.mkdir(scratch, 0o700, dir_fd=root_fd)
        try:
            sfd = os.open(scratch, O_PATH_FLAGS | os.O_DIRECTORY | os.O_NOFOLLOW,
                          dir_fd=root_fd)
            try:
                _sys.mount("hpcc-layer", f"/proc/self/fd/{sfd}", "tmpfs",
                           _sys.MS_NOSUID | _sys.MS_NODEV, "mode=0755")
                # a fresh lookup crosses onto the tmpfs (sfd's magic link is the covered dir)
                tfd = os.open(scratch, O_PATH_FLAGS | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=root_fd)
                try:
                    if os.fstat(tfd).st_dev == os.fstat(sfd).st_dev:
                        raise OSError(errno.EIO, "the scratch tmpfs is not where it was mounted")
                    for d in ("upper", "work"):
                        os.mkdir(d, 0o755, dir_fd=tfd)
                    st = os.fstat(dfd)
                    try:
                        os.chown("upper", st.st_uid, st.st_gid, dir_fd=tfd)
                    except OSError:  # an owner this user namespace does not map
                        pass
                    os.chmod("upper", stat.S_IMODE(st.st_mode), dir_fd=tfd)
                    opts = (f"lowerdir=/proc/self/fd/{dfd},upperdir=/proc/self/fd/{tfd}/upper,"
                            f"workdir=/proc/self/fd/{tfd}/work"
                            + ("" if _in_initial_userns() else ",userxattr"))
                    _sys.mount("overlay", f"/proc/self/fd/{dfd}", "overlay",
                               _sys.MS_NOSUID | _sys.MS_NODEV, opts)
                finally:
                    # the overlay keeps its layers; the scratch mount point goes either way
                    _sys.umount2(f"/proc/self/fd/{tfd}", _sys.MNT_DETACH)
                    os.close(tfd)
            finally:
                os.close(sfd)
        finally:
            os.rmdir(scratch, dir_fd=root_fd)
        nfd = open_in_root(root_fd, dir_cpath, O_PATH_FLAGS | os.O_DIRECTORY)
        writable_devs.add(os.fstat(nfd).st_dev)
        os.close(nfd)
    except OSError as e:
        raise MountError(f"cannot give {dir_cpath} a writable layer of the container's own: "
                         f"{e.strerror}") from None
    finally:
        os.close(dfd)


def _in_initial_userns():
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
