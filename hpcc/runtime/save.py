"""Save a container's root (image plus writable layer) as a squashfs image.

`hpcc run --save PATH` and `srun --container-save=PATH`: when the command has ended, the
container's root filesystem (the overlay only: none of the binds, /proc, /dev or /tmp
mounted on it) is written with hpcc's libsquashfs writer to PATH, an image `hpcc run PATH`
runs. The walk and the write run in a child process with the user's identity (their uid,
gid and groups; in a rootless container, the caller): root never writes into a path the user
chose, and the user can save only what they may read. The file appears atomically: written
to a hidden temporary name beside PATH, fsynced, renamed. A failure leaves nothing.

Ownership: files of the container user are saved as owned by 0 (root), as an image's files
are, unless `keep_owner` is set; other ids are kept.
"""
import os
import stat

from ..errors import LaunchError
from .children import output_of_child

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_destination(path, cwd=None):
    """(dir_fd, name) of PATH, opened before the container starts (after pivot_root the
    host's paths are out of reach). Its directory must exist and PATH must not be a
    directory. The directory is opened O_PATH: what is written there is written by the
    child of save_in_child, with the user's rights. Raises LaunchError."""
    if not path:
        raise LaunchError("the save path is empty")
    try:
        full = os.path.normpath(path if path.startswith("/") else
                                os.path.join(cwd or os.getcwd(), path))
    except FileNotFoundError:   # a directory removed under the shell
        raise LaunchError(f"cannot save the container to {path}: a relative path, and the "
                          "current directory no longer exists") from None
    parent, name = os.path.split(full)
    try:
        dir_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError(f"cannot save the container to {full}: {parent}: {e.strerror}") \
            from None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.close(dir_fd)
            raise LaunchError(f"cannot save the container to {full}: it is a directory")
    except FileNotFoundError:
        pass
    return dir_fd, name


def _walk(writer, dir_fd, rel, owner_uid, owner_gid, links):
    """Tree of the directory dir_fd (squashfs tree nodes), file data streamed to writer."""
    from ..squashfs import Device, Dir, Fifo, File, Socket, Symlink

    st = os.fstat(dir_fd)
    node = Dir(mode=stat.S_IMODE(st.st_mode), uid=_id(st.st_uid, owner_uid),
               gid=_id(st.st_gid, owner_gid), mtime=int(st.st_mtime))
    for name in sorted(os.listdir(dir_fd)):
        path = f"{rel}/{name}"
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise LaunchError(f"cannot save {path}: {e.strerror}") from None
        meta = dict(mode=stat.S_IMODE(st.st_mode), uid=_id(st.st_uid, owner_uid),
                    gid=_id(st.st_gid, owner_gid), mtime=int(st.st_mtime))
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            try:
                sub = os.open(name, O_DIR, dir_fd=dir_fd)
            except OSError as e:
                raise LaunchError(f"cannot save {path}: {e.strerror}") from None
            try:
                if os.fstat(sub).st_dev != st.st_dev:
                    continue  # never happens in a non-recursive clone; be safe
                node.children[name] = _walk(writer, sub, path, owner_uid, owner_gid, links)
            finally:
                os.close(sub)
        elif kind == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                node.children[name] = links[key]
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as e:
                raise LaunchError(f"cannot save {path}: {e.strerror}",
                                  hint="only what you may read can be saved") from None
            with os.fdopen(fd, "rb", buffering=0) as f:
                data = writer.add_file_data(f)
            f_node = File(data=data, **meta)
            if st.st_nlink > 1:
                links[key] = f_node
            node.children[name] = f_node
        elif kind == stat.S_IFLNK:
            node.children[name] = Symlink(os.readlink(name, dir_fd=dir_fd), **meta)
        elif kind == stat.S_IFIFO:
            node.children[name] = Fifo(**meta)
        elif kind == stat.S_IFSOCK:
            node.children[name] = Socket(**meta)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            if kind == stat.S_IFCHR and st.st_rdev == 0:
                continue  # an overlay whiteout (a file deleted in the container)
            node.children[name] = Device("c" if kind == stat.S_IFCHR else "b", st.st_rdev,
                                         **meta)
    return node


def _id(value, owner):
    return 0 if owner is not None and value == owner else value


def write_image(root_fd, dest, *, owner_uid=None, owner_gid=None, compressor="zstd"):
    """Write the tree under root_fd to dest = (dir_fd, name) atomically: a hidden temporary
    name in that directory, fsync, rename."""
    from ..squashfs import SquashfsWriter

    dir_fd, name = dest
    tmp = f".{name}.hpcc-save-{os.getpid()}"
    ok = False
    top = os.open(".", O_DIR, dir_fd=root_fd)  # root_fd may be O_PATH (open_tree)
    try:
        with SquashfsWriter(f"/proc/self/fd/{dir_fd}/{tmp}", compressor=compressor) as w:
            tree = _walk(w, top, "", owner_uid, owner_gid, {})
            w.finish(tree)
            w.sync()
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        ok = True
    finally:
        os.close(top)
        if not ok:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass


def save_in_child(root_fd, dest, *, user=None):
    """Fork; in the child take the user's identity (user = {"uid", "gid", "additionalGids"}
    on the host, for a root caller; None: stay who we are) and write the image to dest =
    (dir_fd, name). Returns None on success or the child's one-line error."""
    def child(w):
        try:
            owner_uid = owner_gid = None
            if user is not None and os.geteuid() == 0 and user["uid"] != 0:
                os.setgroups(user.get("additionalGids") or [])
                os.setresgid(user["gid"], user["gid"], user["gid"])
                os.setresuid(user["uid"], user["uid"], user["uid"])
                from . import _sys
                _sys.prctl(4, 1)  # PR_SET_DUMPABLE: /proc/self/fd is ours again
                owner_uid, owner_gid = user["uid"], user["gid"]
            write_image(root_fd, dest, owner_uid=owner_uid, owner_gid=owner_gid)
            return 0
        except LaunchError as e:
            os.write(w, str(e).encode()[:4000])
        except OSError as e:
            os.write(w, f"cannot save the container to {dest[1]}: {e.strerror}".encode())
        except BaseException as e:  # noqa: BLE001 - a line for the user, never a traceback
            os.write(w, f"cannot save the container to {dest[1]}: {e}".encode()[:4000])
        return 1

    code, msg = output_of_child(child, 4096)
    if code == 0:
        return None
    return msg.decode(errors="replace") or f"cannot save the container to {dest[1]}"
