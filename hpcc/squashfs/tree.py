"""The in-memory directory tree that is serialised into a squashfs image.

Nodes are deliberately light (``__slots__``, no per-node dicts): images hold 10^5 entries.
A hard link is the SAME node instance under several names; the writer counts the names to get
``nlink`` (directories always get 2 + number of subdirectories and cannot be hard-linked).

Names are ``str``; bytes that are not UTF-8 (from tar headers) travel as surrogateescape
characters, exactly as ``os.fsdecode`` produces them, and are written back as the original bytes.

The ``_gen``, ``_nlink``, ``_ino`` and ``_ref`` slots are scratch space of the writer.
"""

__all__ = ["Node", "Dir", "File", "Symlink", "Fifo", "Socket", "Device", "FileData"]

# squashfs basic inode types, used as each class's kind
_DIR, _FILE, _SLINK, _BDEV, _CDEV, _FIFO, _SOCKET = 1, 2, 3, 4, 5, 6, 7


class Node:
    """Common metadata: permission bits (incl. 07000), owner, mtime (seconds), xattrs."""

    __slots__ = ("mode", "uid", "gid", "mtime", "xattrs", "_gen", "_nlink", "_ino", "_ref")
    _kind = 0

    def __init__(self, mode, uid=0, gid=0, mtime=0, xattrs=None):
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.xattrs = xattrs
        self._gen = None

    def __repr__(self):
        mode = oct(self.mode) if isinstance(self.mode, int) else repr(self.mode)
        return f"<{type(self).__name__} mode={mode} uid={self.uid!r} gid={self.gid!r}>"


class Dir(Node):
    """A directory; ``children`` maps a name to a node."""

    __slots__ = ("children",)
    _kind = _DIR

    def __init__(self, mode=0o755, uid=0, gid=0, mtime=0, xattrs=None, children=None):
        super().__init__(mode, uid, gid, mtime, xattrs)
        self.children = {} if children is None else children


class File(Node):
    """A regular file; ``data`` is a FileData from SquashfsWriter.add_file_data, None if empty."""

    __slots__ = ("data",)
    _kind = _FILE

    def __init__(self, mode=0o644, uid=0, gid=0, mtime=0, xattrs=None, data=None):
        super().__init__(mode, uid, gid, mtime, xattrs)
        self.data = data


class Symlink(Node):
    __slots__ = ("target",)
    _kind = _SLINK

    def __init__(self, target, mode=0o777, uid=0, gid=0, mtime=0, xattrs=None):
        super().__init__(mode, uid, gid, mtime, xattrs)
        self.target = target


class Fifo(Node):
    __slots__ = ()
    _kind = _FIFO

    def __init__(self, mode=0o644, uid=0, gid=0, mtime=0, xattrs=None):
        super().__init__(mode, uid, gid, mtime, xattrs)


class Socket(Node):
    __slots__ = ()
    _kind = _SOCKET

    def __init__(self, mode=0o755, uid=0, gid=0, mtime=0, xattrs=None):
        super().__init__(mode, uid, gid, mtime, xattrs)


class Device(Node):
    """A character ("c") or block ("b") device; ``rdev`` as ``os.makedev`` gives it."""

    __slots__ = ("_kind", "rdev")

    def __init__(self, kind, rdev, mode=0o600, uid=0, gid=0, mtime=0, xattrs=None):
        super().__init__(mode, uid, gid, mtime, xattrs)
        self.kind = kind
        self.rdev = rdev

    @property
    def kind(self):
        return "b" if self._kind == _BDEV else "c"

    @kind.setter
    def kind(self, value):
        if value not in ("c", "b"):
            raise ValueError(f"device kind must be 'c' or 'b', not {value!r}")
        self._kind = _BDEV if value == "b" else _CDEV


class FileData:
    """Opaque handle for the data of one file, made by SquashfsWriter.add_file_data.

    ``size`` is the file size in bytes. It is only valid with the writer that made it and
    until that writer is closed.
    """

    __slots__ = ("_cell", "_owner", "size")

    def __init__(self, cell, owner, size):
        self._cell = cell
        self._owner = owner
        self.size = size

    def __repr__(self):
        return f"<FileData size={self.size}>"
