"""libsquashfs (squashfs-tools-ng) binding: build images from an in-memory tree, read them back.

    from hpcc.squashfs import SquashfsWriter, SquashfsReader, Dir, File, Symlink

The compiled part (``hpcc.squashfs._sqfs``) is built by cffi at install time from
``build_ffi.py``; importing this package does not import it until a writer or reader is used.
"""
import os as _os
import sys as _sys

# A source checkout that comes first on sys.path (pytest run from the repository root) shadows
# the installed package, but only the installed copy holds the compiled extension: then let
# this package also search the other hpcc/squashfs directories on sys.path for it.
if not any(n.startswith("_sqfs.") and n.endswith(".so") for n in _os.listdir(__path__[0])):
    for _entry in _sys.path:
        _dir = _os.path.join(_entry or ".", "hpcc", "squashfs")
        if _os.path.isdir(_dir) and not any(_os.path.samefile(_dir, p) for p in __path__):
            __path__.append(_dir)

from hpcc.squashfs.tree import Device, Dir, Fifo, File, FileData, Node, Socket, Symlink

__all__ = ["Node", "Dir", "File", "Symlink", "Fifo", "Socket", "Device", "FileData",
           "SquashfsWriter", "SquashfsReader", "Entry"]


def __getattr__(name):
    if name == "SquashfsWriter":
        from hpcc.squashfs.writer import SquashfsWriter
        return SquashfsWriter
    if name in ("SquashfsReader", "Entry"):
        from hpcc.squashfs import reader
        return getattr(reader, name)
    raise AttributeError(name)
