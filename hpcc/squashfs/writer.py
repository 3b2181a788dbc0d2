"""SquashfsWriter: stream file data into libsquashfs, then serialise a tree.

File data goes into libsquashfs's block processor through a feeder thread of the C glue: the
Python side copies each chunk into a bounded queue and reads on, the feeder drives the block
processor in batches and its worker threads compress (cffi releases the GIL in every call).
Blocks and tail-end fragments are deduplicated, all-zero blocks are stored as sparse holes.
``finish(root)`` numbers the inodes, writes inode table, directory table (sorted, with index for
large directories), fragment table, id table, xattr tables and the super block.

The image file is created by the writer (O_CREAT|O_EXCL, 0644) and never renamed or synced
by it: the caller fsyncs (``sync()``) and publishes. ``close()`` without a successful
``finish()`` removes the partial file.
"""
import os

from hpcc.errors import SquashfsError
from hpcc.squashfs._sqfs import ffi, lib
from hpcc.squashfs.errors import describe
from hpcc.squashfs.handle import NativeHandle
from hpcc.squashfs.tree import Dir, FileData

__all__ = ["SquashfsWriter", "COMPRESSORS", "DEFAULT_LEVELS"]

COMPRESSORS = {"gzip": 1, "zstd": 6}
# level=0 picks these: zstd 3 and gzip 6, the libraries' own defaults. Measured on a /usr slice
# (docs/squashfs.md), zstd 6 costs 1.8x the CPU for a 5.5% smaller image; libsquashfs's own
# defaults (zstd 15, gzip 9) cost far more for little: a pull should not wait on them.
DEFAULT_LEVELS = {"gzip": 6, "zstd": 3}
LEVEL_RANGES = {"gzip": (1, 9), "zstd": (1, 22)}

CHUNK = 1 << 20          # bytes handed to the block processor per call
NO_XATTR = 0xFFFFFFFF
U32 = 0xFFFFFFFF
_S_IFMT = {1: 0o040000, 2: 0o100000, 3: 0o120000, 4: 0o060000, 5: 0o020000, 6: 0o010000,
           7: 0o140000}
_XATTR_PREFIXES = ("user.", "trusted.", "security.")


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SquashfsWriter(NativeHandle):
    """Write one squashfs image to ``path`` (which must not exist).

    compressor: "zstd" or "gzip"; level: 0 for the default (DEFAULT_LEVELS); block_size: a
    power of two from 4 KiB to 1 MiB; workers: compression threads (0 = CPUs we may run on);
    mod_time: the image's own timestamp (super block).
    """

    def __init__(self, path, *, compressor="zstd", level=0, block_size=131072, workers=0,
                 mod_time=0, backlog=0):
        self._w = None
        self._fd = -1
        self._path = os.fspath(path)
        self._finished = False
        self._failed = None
        self._in_file = False
        self._cells = []
        if compressor not in COMPRESSORS:
            raise SquashfsError(f"unknown squashfs compressor {compressor!r}",
                                hint=f"use one of {', '.join(sorted(COMPRESSORS))}")
        lo, hi = LEVEL_RANGES[compressor]
        if level == 0:
            level = DEFAULT_LEVELS[compressor]
        if not isinstance(level, int) or not lo <= level <= hi:
            raise SquashfsError(f"{compressor} level {level!r} out of range {lo}..{hi}")
        if (not isinstance(block_size, int) or block_size & (block_size - 1)
                or not 4096 <= block_size <= 1 << 20):
            raise SquashfsError(f"squashfs block size {block_size!r} invalid",
                                hint="use a power of two from 4096 to 1048576")
        workers = workers or _cpu_count()
        if not 0 < workers <= 1024:
            raise SquashfsError(f"squashfs workers {workers!r} invalid")
        backlog = backlog or 10 * workers
        self.compressor = compressor
        self.level = level
        self.block_size = block_size
        self.workers = workers
        mod_time = min(max(int(mod_time), 0), U32)
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o644)
        except OSError as e:
            raise SquashfsError(f"cannot create squashfs image {self._path}: {e.strerror}") \
                from None
        out = ffi.new("hpcc_writer_t **")
        rc = lib.hpcc_writer_create(self._fd, COMPRESSORS[compressor], level, block_size,
                                    workers, backlog, mod_time, out)
        if rc != 0:
            self._abandon()
            raise SquashfsError(f"cannot start squashfs image {self._path}: {describe(rc)}")
        self._w = out[0]
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)
        self._ptr = ffi.from_buffer(self._buf)

    # ----------------------------------------------------------------- plumbing

    def fileno(self):
        if self._fd < 0:
            raise SquashfsError("squashfs writer is closed")
        return self._fd

    def sync(self):
        """fsync the image (after finish(), before the caller renames it into place)."""
        os.fsync(self.fileno())

    def _check(self, rc, what):
        if rc < 0:
            err = lib.hpcc_writer_errno(self._w) if self._w is not None else 0
            exc = SquashfsError(f"{self._path}: {what}: {describe(rc, err)}")
            self._failed = exc
            raise exc

    def _usable(self):
        if self._w is None:
            raise SquashfsError("squashfs writer is closed")
        if self._failed is not None:
            raise SquashfsError(f"squashfs writer unusable after an earlier error ({self._failed})")
        if self._finished:
            raise SquashfsError("squashfs image already finished")

    def _abandon(self):
        """Release the libsquashfs objects, the descriptor, and (unfinished) the file."""
        w, self._w = self._w, None
        if w is not None:
            lib.hpcc_writer_destroy(w)        # joins the worker threads
        cells, self._cells = self._cells, []
        for cell in cells:                    # file inodes the block processor allocated
            if cell[0] != ffi.NULL:
                lib.sqfs_free(cell[0])
                cell[0] = ffi.NULL
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            if not self._finished:
                try:
                    os.unlink(self._path)
                except OSError:
                    pass

    def close(self):
        """Release everything; idempotent. Removes the file unless finish() succeeded."""
        self._abandon()

    # ----------------------------------------------------------------- file data

    def add_bytes(self, data):
        """Store ``data`` (any buffer) as a file's contents; returns its FileData (None if
        empty)."""
        self._usable()
        n = memoryview(data).nbytes
        if n == 0:
            return None
        cell = ffi.new("sqfs_inode_generic_t **")
        self._cells.append(cell)
        self._in_file = True
        rc = lib.hpcc_file_whole(self._w, cell, ffi.from_buffer(data), n)
        self._check(rc, "storing file data")
        self._in_file = False
        return FileData(cell, self, n)

    def add_file_data(self, stream, size=None):
        """Read a binary file object to EOF (or exactly ``size`` bytes) into the image.

        Uses ``readinto`` when the stream has it (into a reused 1 MiB buffer, whose contents the
        C side copies into its queue), else ``read``. Returns a FileData for File.data, or None
        for an empty file. An exception from the stream propagates unchanged; once data of the
        file has been handed over it leaves the writer unusable (close() cleans up). A stream
        that ends before ``size`` bytes raises SquashfsError.
        """
        self._usable()
        want = CHUNK if size is None else min(size, CHUNK)
        left = size
        view, ptr = self._view, self._ptr
        readinto = getattr(stream, "readinto", None)
        w = self._w
        cell = None
        total = 0
        try:
            while True:
                # fill up to `want` bytes (a short read is not EOF)
                got = 0
                while got < want:
                    if readinto is not None:
                        n = readinto(view[got:want])
                    else:
                        chunk = stream.read(want - got)
                        n = len(chunk)
                        view[got:got + n] = chunk
                    if not n:
                        break
                    got += n
                if left is not None and got < want:
                    raise SquashfsError(f"file data ended after {total + got} of {size} bytes")
                if cell is None:
                    if got == 0:
                        return None
                    cell = ffi.new("sqfs_inode_generic_t **")
                    self._cells.append(cell)
                    self._in_file = True
                    if got < want or left == got:
                        # the whole file in one call: begin + append + end in C
                        self._check(lib.hpcc_file_whole(w, cell, ptr, got), "storing file data")
                        total = got
                        break
                    self._check(lib.hpcc_file_begin(w, cell), "starting file data")
                if got:
                    self._check(lib.hpcc_file_append(w, ptr, got), "storing file data")
                    total += got
                if left is not None:
                    left -= got
                    if left == 0:
                        self._check(lib.hpcc_file_end(w), "ending file data")
                        break
                    want = min(left, CHUNK)
                elif got < want:
                    self._check(lib.hpcc_file_end(w), "ending file data")
                    break
        except BaseException as e:
            # mid-file the block processor cannot drop what it has: the writer is done for
            if self._in_file and self._failed is None:
                self._failed = e
            raise
        self._in_file = False
        return FileData(cell, self, total)

    # ----------------------------------------------------------------- tree

    def finish(self, root):
        """Write the tree rooted at ``root`` (a Dir) and complete the image; returns stats."""
        self._usable()
        if not isinstance(root, Dir):
            raise SquashfsError("the root of a squashfs image must be a Dir")
        try:
            self._check(lib.hpcc_writer_data_done(self._w), "finishing file data")
            order, ents_of, parent_of = self._scan(root)
            seq = self._number(order, ents_of, root)
            self._write(seq, ents_of, parent_of)
            self._check(lib.hpcc_writer_finish(self._w, root._ref, len(seq)), "writing tables")
        except BaseException as e:
            if self._failed is None:
                self._failed = e
            raise
        self._finished = True
        out = ffi.new("sqfs_u64[10]")
        lib.hpcc_writer_stats(self._w, out)
        data_blocks, frag_blocks, written = out[3], out[4], out[8]
        return {
            "path": self._path,
            "compressor": self.compressor,
            "level": self.level,
            "block_size": self.block_size,
            "bytes_used": out[0],
            "inodes": out[1],
            "input_bytes": out[2],
            "blocks": data_blocks,
            "fragment_blocks": frag_blocks,
            "blocks_written": written,
            "duplicate_blocks": max(data_blocks + frag_blocks - written, 0),
            "sparse_blocks": out[5],
            "fragments": out[7],
            "duplicate_fragments": out[6] - out[7],
            "ids": out[9],
        }

    def _scan(self, root):
        """Pre-order walk: validate names, count links, sort entries by their bytes."""
        gen = object()
        root._gen = gen
        root._nlink = 2
        root._ino = 0
        order = []        # directories in pre-order, subdirectories in name order
        ents_of = {}      # id(dir) -> [(name bytes, node)] sorted by name bytes
        parent_of = {}    # id(dir) -> parent dir
        stack = [root]
        while stack:
            d = stack.pop()
            ch = d.children
            if not ch:
                d._nlink = 2
                order.append(d)
                ents_of[id(d)] = []
                continue
            names = list(ch)
            try:
                blob = "\0".join(names).encode("utf-8", "surrogateescape")
            except (TypeError, UnicodeEncodeError):
                blob = None
            bnames = blob.split(b"\0") if blob is not None else ()
            if (len(bnames) != len(names) or b"/" in blob or "" in ch or "." in ch
                    or ".." in ch or max(map(len, bnames)) > 255
                    or len(set(bnames)) != len(bnames)):
                _bad_names(names)
            nodes = list(ch.values())
            subdirs = 0
            for child in nodes:
                if child._gen is gen:
                    if child._kind == 1:
                        raise SquashfsError("a directory appears twice in the image tree "
                                            "(directories cannot be hard-linked)")
                    child._nlink += 1
                else:
                    child._gen = gen
                    child._nlink = 1
                    child._ino = 0
                    if child._kind == 1:
                        subdirs += 1
            items = sorted(zip(bnames, nodes))   # names are unique: nodes never compared
            d._nlink = 2 + subdirs
            if subdirs:
                for _b, s in items:
                    if s._kind == 1:
                        parent_of[id(s)] = d
                        stack.append(s)
            order.append(d)
            ents_of[id(d)] = items
        order.reverse()    # post-order: children before parents, siblings in name order
        return order, ents_of, parent_of

    @staticmethod
    def _number(order, ents_of, root):
        """Inode numbers: each directory's entries together, deepest directories first (as
        tar2sqfs does), the root last. Every inode thus precedes the directories listing it."""
        seq = []
        ino = 0
        for d in order:
            for _b, c in ents_of[id(d)]:
                if not c._ino:
                    ino += 1
                    c._ino = ino
                    seq.append(c)
        root._ino = ino + 1
        seq.append(root)
        return seq

    def _xattrs(self, xattrs):
        w = self._w
        self._check(lib.hpcc_xattr_begin(w), "recording xattrs")
        for key in sorted(xattrs):
            value = xattrs[key]
            if not isinstance(key, str) or not key.startswith(_XATTR_PREFIXES):
                raise SquashfsError(f"xattr {key!r} cannot be stored in squashfs "
                                    "(only user.*, trusted.* and security.* can)")
            kb = key.encode("utf-8", "surrogateescape")
            if b"\0" in kb:
                raise SquashfsError(f"bad xattr name {key!r}")
            rc = lib.hpcc_xattr_add(w, kb, ffi.from_buffer(value), len(value))
            self._check(rc, f"recording xattr {key!r}")
        out = ffi.new("sqfs_u32 *")
        self._check(lib.hpcc_xattr_end(w, out), "recording xattrs")
        return out[0]

    def _write(self, seq, ents_of, parent_of):
        w = self._w
        null = ffi.NULL
        write_file = lib.hpcc_write_file
        write_special = lib.hpcc_write_special
        dir_write = lib.hpcc_dir_write
        root_parent = len(seq) + 1
        n = None
        try:
            for n in seq:
                k = n._kind
                x = n.xattrs
                xi = self._xattrs(x) if x else NO_XATTR
                mt = n.mtime
                if mt < 0:
                    mt = 0
                elif mt > U32:
                    mt = U32
                mode = n.mode & 0o7777
                if k == 2:
                    fd = n.data
                    if fd is None:
                        inode = null
                    elif fd._owner is self:
                        inode = fd._cell[0]
                    else:
                        raise SquashfsError("file data handle made by another squashfs writer")
                    ref = write_file(w, inode, mode, n.uid, n.gid, mt, n._ino, n._nlink, xi)
                elif k == 1:
                    items = ents_of[id(n)]
                    p = parent_of.get(id(n))
                    ref = dir_write(w, b"\0".join([b for b, _c in items]), len(items),
                                    [c._ino for _b, c in items], [c._ref for _b, c in items],
                                    [c._kind for _b, c in items],
                                    mode, n.uid, n.gid, mt, n._ino, n._nlink, xi,
                                    root_parent if p is None else p._ino)
                elif k == 3:
                    t = n.target.encode("utf-8", "surrogateescape")
                    if len(t) > 4095 or b"\0" in t:
                        raise SquashfsError(f"bad symlink target {n.target!r}")
                    ref = write_special(w, 3, mode, n.uid, n.gid, mt, n._ino, n._nlink, xi, 0,
                                        t, len(t))
                else:
                    dev = n.rdev if k == 4 or k == 5 else 0
                    ref = write_special(w, k, mode, n.uid, n.gid, mt, n._ino, n._nlink, xi, dev,
                                        null, 0)
                if ref < 0:
                    self._check(ref, "writing inode table")
                n._ref = ref
        except (OverflowError, TypeError, AttributeError) as e:
            raise SquashfsError(f"bad metadata in image tree ({n!r}): {e}") from None


def _bad_names(names):
    for name in names:
        try:
            b = name.encode("utf-8", "surrogateescape")
        except (AttributeError, UnicodeEncodeError):
            raise SquashfsError(f"bad file name {name!r} in image tree") from None
        if b in (b"", b".", b"..") or b"/" in b or b"\0" in b:
            raise SquashfsError(f"bad file name {name!r} in image tree")
        if len(b) > 255:
            raise SquashfsError(f"file name too long (over 255 bytes) in image tree: {name!r}")
    raise SquashfsError("two names in one directory of the image tree encode to the same "
                        f"bytes: {sorted(names)!r}")
