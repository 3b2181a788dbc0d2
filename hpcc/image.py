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
    """Does the user's IMAGE argument name a file rather than a reference?"""
    return arg.endswith(".sqfs") or (os.sep in arg and os.path.isfile(arg))


def local_image(arg, cache=None):
    """ImageRecord for a .sqfs path; `cache` (optional) has .get(path, load)."""
    path = os.path.abspath(arg)
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
