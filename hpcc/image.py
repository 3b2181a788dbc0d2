"""ImageRecord, and images given by the path of their .sqfs file (not in a store).

A path's image config comes from NAME.json beside it, when there is one. Kept apart from
`hpcc.store` because the launch path uses it without importing json or re (the store's
reference parsing compiles regular expressions): with a cache, a warm launch reads the
parsed metadata from the launch cache instead.
"""
import os

from .errors import ImageNotFound, StoreError


class ImageRecord:
    """An image: its digest, squashfs path and metadata (a plain class: importing
    dataclasses costs ~10 ms of a launch)."""

    __slots__ = ("digest", "sqfs_path", "meta", "store")

    def __init__(self, digest, sqfs_path, meta=None, store=None):
        self.digest = digest
        self.sqfs_path = sqfs_path
        self.meta = {} if meta is None else meta
        self.store = store

    @property
    def config(self):
        return self.meta.get("config") or {}

    def __repr__(self):
        return f"ImageRecord({self.digest!r}, {self.sqfs_path!r})"


def is_image_path(arg):
    """Does the user's IMAGE argument name a file (or a directory, which is refused with
    what it is) rather than a reference?"""
    return arg.endswith(".sqfs") or (os.sep in arg and os.path.lexists(arg))


def check_squashfs(path, shown=None):
    """Refuse, in one line, a file that is not a squashfs image or is cut short (a copy
    that did not finish): reads the 96-byte superblock (magic "hsqs", bytes_used at 40)
    before anything is mounted, so squashfuse or the kernel never report it their way."""
    shown = shown or path
    try:
        with open(path, "rb") as f:
            sb = f.read(96)
            size = os.fstat(f.fileno()).st_size
    except PermissionError:
        raise ImageNotFound(f"cannot read image file {shown}: permission denied") from None
    except OSError as e:
        raise ImageNotFound(f"cannot read image file {shown}: {e.strerror}") from None
    if len(sb) < 96 or sb[:4] != b"hsqs":
        what = "an empty file" if size == 0 else f"a file of {size} bytes"
        raise ImageNotFound(f"{shown} is not a squashfs image ({what} that does not start "
                            "with the squashfs magic)",
                            hint="hpcc runs .sqfs files made by 'gateway pull' or mksquashfs")
    used = int.from_bytes(sb[40:48], "little")
    if used > size:
        raise ImageNotFound(f"image file {shown} is truncated: {size} of its {used} bytes "
                            "are there", hint="copy or pull it again")


def local_image(arg, cache=None):
    """ImageRecord for a .sqfs path; `cache` (optional) has .get(path, load)."""
    try:
        path = os.path.abspath(arg)
    except FileNotFoundError:   # relative, in a directory removed under the shell
        raise ImageNotFound(f"image file {arg} is a relative path and the current directory "
                            "no longer exists", hint="give its absolute path") from None
    try:
        st = os.stat(path)
    except PermissionError:
        raise ImageNotFound(f"cannot access image file {arg}: permission denied",
                            hint="a directory on its path is not open to you") from None
    except (FileNotFoundError, NotADirectoryError):
        raise ImageNotFound(f"image file {arg} does not exist") from None
    if os.path.isdir(path):
        raise ImageNotFound(f"{arg} is a directory, not an image",
                            hint="give a .sqfs file or a store reference such as ubuntu:22.04")
    if not (st.st_mode & 0o170000 == 0o100000):
        raise ImageNotFound(f"{arg} is not a regular file; an image is a .sqfs file")
    side = path[:-5] + ".json" if path.endswith(".sqfs") else path + ".json"
    meta = {}
    if os.path.exists(side):
        def load():
            try:
                with open(side, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise StoreError(f"cannot read image metadata {side}: {e.strerror}") from None
            import json
            try:
                return json.loads(raw)
            except ValueError:
                raise StoreError(f"{side}: not valid JSON (the image config beside "
                                 f"{arg})") from None
        meta = cache.get(side, load) if cache is not None else load()
    return ImageRecord(meta.get("digest", ""), path, meta, None)
