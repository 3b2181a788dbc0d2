"""The container root as the hooks see it: every path is resolved and every change is made by
the runtime's in-root module (hpcc.runtime.inroot), so hooks and runtime follow one rule:
lookups stay inside the root, and anything created, replaced or removed lands only on the
container's own writable layer. A hook that needs a host file in a directory bound from the
host binds over a file that exists there, or, to add entries, first covers that directory
with an overlay whose upper layer is a tmpfs of the container's own (the host directory is
its read-only lower layer): nothing is ever created or deleted in the host directory.

Under hpcc the writable layer is named by the runtime in config.json (`hpcc.writable_devs`:
the overlay root and the tmpfs mounts it made); started by another runtime (crun, runc),
only the filesystem of the root itself counts as writable.
"""
import os
import stat

from hpcc.errors import HookError, MountError
from hpcc.runtime import _sys, inroot


class Root:
    """The assembled container root, addressed only by paths resolved inside it."""

    def __init__(self, path, writable_devs=None):
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise HookError(f"container root {self.path} is not accessible: "
                            f"{e.strerror}") from None
        self.writable = set(writable_devs or ()) or {os.fstat(self.fd).st_dev}
        self._covered = set()

    def close(self):
        os.close(self.fd)

    # -- lookup --------------------------------------------------------------------------
    def open(self, cpath, flags=os.O_PATH, *, follow=True):
        """fd of container path `cpath`; symlinks are resolved as if the root were /."""
        return inroot.open_in_root(self.fd, cpath, flags, follow=follow)

    def exists(self, cpath):
        return self.stat(cpath) is not None

    def stat(self, cpath):
        """os.stat_result of cpath (symlinks followed inside the root) or None."""
        try:
            fd = self.open(cpath)
        except OSError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def realpath(self, cpath):
        """The container-absolute path cpath resolves to (None if it does not exist)."""
        try:
            fd = self.open(cpath)
        except OSError:
            return None
        try:
            where = inroot.container_path(self.fd, fd)
        finally:
            os.close(fd)
        if where is None:
            raise HookError(f"path resolution of {cpath} left the container root")
        return where

    def read(self, cpath, limit=64 << 20):
        """Bytes of a regular file inside the root, or None if absent."""
        try:
            fd = self.open(cpath, os.O_RDONLY)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit)
        finally:
            os.close(fd)

    def listdir(self, cpath):
        try:
            fd = self.open(cpath, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    # -- changes (the writable layer only) -------------------------------------------------
    def _change(self, fn, *args, **kw):
        """Run an inroot change; where it would touch a directory that is not on the
        container's own layer (a host directory bound in), first cover that directory with
        an overlay whose upper layer is a tmpfs of the container's own, then retry."""
        with _as_hook_error():
            for _ in range(8):
                try:
                    return fn(self.fd, *args, **kw)
                except inroot.NotOwnLayer as e:
                    if not e.directory or e.directory in self._covered:
                        raise
                    inroot.overlay_on_own_layer(self.fd, e.directory, self.writable)
                    self._covered.add(e.directory)
            return fn(self.fd, *args, **kw)

    def makedirs(self, cpath, mode=0o755):
        os.close(self._change(inroot.makedirs, cpath, self.writable, mode))

    def create_file(self, cpath, mode=0o644):
        """Make sure a file exists at cpath (a bind target); new files are empty."""
        self._change(inroot.create_file, cpath, self.writable, mode)

    def symlink(self, target, cpath, *, replace=False):
        return self._change(inroot.symlink, target, cpath, self.writable, replace=replace)

    def write_file(self, cpath, data, mode=0o644):
        self._change(inroot.write_file, cpath, data, self.writable, mode)

    # -- mounts --------------------------------------------------------------------------
    def bind(self, src, cpath, *, readonly=True, device=False):
        """Bind host path `src` (file, device or directory) onto cpath inside the root."""
        try:
            sfd = os.open(src, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise HookError(f"cannot open host path {src}: {e.strerror}") from None
        try:
            sst = os.fstat(sfd)
            is_dir = stat.S_ISDIR(sst.st_mode)
            if is_dir:
                self.makedirs(cpath)
            else:
                self.create_file(cpath)
            try:
                dfd = self.open(cpath, os.O_PATH)
            except OSError as e:
                raise HookError(f"cannot resolve {cpath} in the container: "
                                f"{e.strerror}") from None
            try:
                dst = os.fstat(dfd)
                if stat.S_ISDIR(dst.st_mode) != is_dir:
                    kind = "directory" if is_dir else "file"
                    raise HookError(f"cannot bind host {kind} {src} onto {cpath}: the "
                                    f"container has a {'file' if is_dir else 'directory'} there")
                if device:
                    attrs = _sys.MOUNT_ATTR_NOSUID | _sys.MOUNT_ATTR_NOEXEC
                else:
                    attrs = (_sys.MOUNT_ATTR_NOSUID | _sys.MOUNT_ATTR_NODEV
                             | (_sys.MOUNT_ATTR_RDONLY if readonly else 0))
                bind_mount(sfd, dfd, attrs, recursive=is_dir)
            finally:
                os.close(dfd)
            # Re-resolve: the path must now lead to the host object (no swapped symlink).
            after = self.stat(cpath)
            if after is None or (after.st_dev, after.st_ino) != (sst.st_dev, sst.st_ino):
                raise HookError(f"bind of {src} onto {cpath} did not take effect")
        finally:
            os.close(sfd)

    def mask(self, cpath):
        """Hide a directory of the container (e.g. an unselected GPU's /proc entry) under an
        empty read-only tmpfs."""
        try:
            fd = self.open(cpath, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise HookError(f"cannot resolve {cpath} in the container: {e.strerror}") from None
        try:
            _sys.mount("tmpfs", f"/proc/self/fd/{fd}", "tmpfs",
                       _sys.MS_RDONLY | _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC,
                       "mode=0555,size=4k")
        except OSError as e:
            raise HookError(f"cannot mask {cpath}: mount: {e.strerror}") from None
        finally:
            os.close(fd)


class _as_hook_error:
    """The in-root module's MountError, reported as the hook's error (same one line)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is not None and issubclass(typ, MountError):
            raise HookError(exc.message, hint=exc.hint) from None
        return False


def bind_mount(src_fd, dst_fd, attrs, *, recursive=False):
    """Clone the mount of src_fd and attach it on dst_fd with mount attributes `attrs`
    (open_tree, mount_setattr, move_mount)."""
    rec = _sys.AT_RECURSIVE if recursive else 0
    try:
        tree = _sys.open_tree(src_fd, "", _sys.OPEN_TREE_CLONE | _sys.OPEN_TREE_CLOEXEC
                              | _sys.AT_EMPTY_PATH | rec)
    except OSError as e:
        raise HookError(f"cannot bind: open_tree: {e.strerror}") from None
    try:
        _sys.mount_setattr(tree, "", _sys.AT_EMPTY_PATH | rec, attrs)
        _sys.move_mount(tree, "", dst_fd, "",
                        _sys.MOVE_MOUNT_F_EMPTY_PATH | _sys.MOVE_MOUNT_T_EMPTY_PATH)
    except OSError as e:
        raise HookError(f"cannot bind: {e.strerror}") from None
    finally:
        os.close(tree)
