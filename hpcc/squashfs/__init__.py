"""libsquashfs (squashfs-tools-ng) binding: build images from an in-memory tree, read them back.

    from hpcc.squashfs import SquashfsWriter, SquashfsReader, Dir, File, Symlink

The compiled part (``hpcc.squashfs._sqfs``) is built by cffi at install time from the C in
``csrc/`` (``build_ffi.py``); importing this package does not import it until a writer or
reader is used.
"""
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
