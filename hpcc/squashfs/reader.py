"""SquashfsReader: metadata walk and file reads of a squashfs image (for inspect and tests)."""
import os
import stat
from typing import NamedTuple, Optional

from hpcc.errors import SquashfsError
from hpcc.squashfs._sqfs import ffi, lib
from hpcc.squashfs.errors import describe
from hpcc.squashfs.handle import NativeHandle

__all__ = ["SquashfsReader", "Entry"]

_COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
_TYPES = {1: "dir", 2: "file", 3: "symlink", 4: "blk", 5: "chr", 6: "fifo", 7: "socket"}
_FLAGS = {
    0x0001: "uncompressed_inodes", 0x0002: "uncompressed_data",
    0x0008: "uncompressed_fragments", 0x0010: "no_fragments", 0x0020: "always_fragments",
    0x0040: "no_duplicates", 0x0080: "exportable", 0x0100: "uncompressed_xattrs",
    0x0200: "no_xattrs", 0x0400: "compressor_options", 0x0800: "uncompressed_ids",
}
CHUNK = 1 << 20


class Entry(NamedTuple):
    path: str              # "/" for the root, else "/a/b" (surrogateescape for non-UTF-8 bytes)
    type: str              # dir, file, symlink, fifo, socket, chr, blk
    mode: int              # permission bits incl. 07000
    uid: int
    gid: int
    mtime: int
    size: int              # file size; symlink target length; directory listing size
    target: Optional[str]  # symlink target, else None
    inode_number: int
    nlink: int
    xattrs: Optional[dict]  # {name: bytes} or None
    rdev: int = 0          # devices only


class SquashfsReader(NativeHandle):
    def __init__(self, path):
        self._r = None
        self._fd = -1
        self._path = os.fspath(path)
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SquashfsError(f"cannot open squashfs image {self._path}: {e.strerror}") \
                from None
        out = ffi.new("hpcc_reader_t **")
        rc = lib.hpcc_reader_open(self._fd, out)
        if rc != 0:
            err = lib.hpcc_reader_errno(out[0])
            lib.hpcc_reader_destroy(out[0])
            self.close()
            raise SquashfsError(f"{self._path}: cannot read squashfs image: {describe(rc, err)}")
        self._r = out[0]
        self._st = ffi.new("hpcc_stat_t *")

    def close(self):
        r, self._r = self._r, None
        if r is not None:
            lib.hpcc_reader_destroy(r)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _live(self):
        if self._r is None:
            raise SquashfsError("squashfs reader is closed")
        return self._r

    def _fail(self, rc, what):
        err = lib.hpcc_reader_errno(self._r) if self._r is not None else 0
        raise SquashfsError(f"{self._path}: {what}: {describe(rc, err)}")

    def info(self):
        sb = self._live().super
        return {
            "compressor": _COMPRESSORS.get(sb.compression_id, str(sb.compression_id)),
            "block_size": sb.block_size,
            "inodes": sb.inode_count,
            "bytes_used": sb.bytes_used,
            "mod_time": sb.modification_time,
            "fragments": sb.fragment_entry_count,
            "ids": sb.id_count,
            "flags": [name for bit, name in _FLAGS.items() if sb.flags & bit],
            "compressor_level": self._level(sb),
        }

    def _level(self, sb):
        """Compression level from the compressor options block, if the image has one."""
        if sb.compression_id not in (1, 6):              # gzip, zstd: options start with it
            return None
        if not sb.flags & 0x0400:                         # no options: the library default
            return 9 if sb.compression_id == 1 else 15
        head = os.pread(self._fd, 6, 96)                  # meta block header + u32 level
        if len(head) < 6 or not int.from_bytes(head[:2], "little") & 0x8000:
            return None                                   # options are stored uncompressed
        return int.from_bytes(head[2:6], "little")

    # -------------------------------------------------------------- metadata

    def _entry(self, path, inode):
        r = self._r
        st = self._st
        rc = lib.hpcc_reader_stat(r, inode, st)
        if rc:
            self._fail(rc, f"reading inode of {path}")
        kind = _TYPES[(st.type - 1) % 7 + 1]
        target = None
        if kind == "symlink":
            target = os.fsdecode(ffi.unpack(st.target, st.size))
        xattrs = self._xattrs(st.xattr, path) if st.xattr != 0xFFFFFFFF else None
        return Entry(path, kind, st.mode & 0o7777, st.uid, st.gid, st.mtime, st.size, target,
                     st.ino, st.nlink, xattrs, st.rdev)

    def _xattrs(self, idx, path):
        r = self._r
        desc = ffi.new("sqfs_xattr_id_t *")
        rc = lib.sqfs_xattr_reader_get_desc(r.xr, idx, desc)
        if rc == 0:
            rc = lib.sqfs_xattr_reader_seek_kv(r.xr, desc)
        if rc:
            self._fail(rc, f"reading xattrs of {path}")
        out = {}
        kp = ffi.new("sqfs_xattr_entry_t **")
        vp = ffi.new("sqfs_xattr_value_t **")
        for _ in range(desc.count):
            rc = lib.sqfs_xattr_reader_read_key(r.xr, kp)
            if rc:
                self._fail(rc, f"reading xattrs of {path}")
            key = ffi.gc(kp[0], lib.sqfs_free)
            rc = lib.sqfs_xattr_reader_read_value(r.xr, key, vp)
            if rc:
                self._fail(rc, f"reading xattrs of {path}")
            val = ffi.gc(vp[0], lib.sqfs_free)
            out[os.fsdecode(ffi.string(ffi.cast("char *", key.key)))] = \
                ffi.unpack(ffi.cast("char *", val.value), val.size)
        return out

    def _list(self, path, inode):
        """[(name, inode)] of a directory, in on-disk (sorted) order."""
        r = self._r
        rc = lib.hpcc_reader_opendir(r, inode)
        if rc:
            self._fail(rc, f"opening directory {path}")
        ep = ffi.new("sqfs_dir_entry_t **")
        ip = ffi.new("sqfs_inode_generic_t **")
        out = []
        while True:
            rc = lib.hpcc_reader_next(r, ep, ip)
            if rc == 1:
                return out
            if rc:
                self._fail(rc, f"reading directory {path}")
            ent = ep[0]
            name = os.fsdecode(ffi.unpack(ffi.cast("char *", ent.name), ent.size + 1))
            lib.sqfs_free(ent)
            out.append((name, ffi.gc(ip[0], lib.sqfs_free)))

    def walk(self):
        """Every entry, root first, then depth-first in name order."""
        r = self._live()
        yield self._entry("/", r.root)
        stack = [iter(self._list("/", r.root))]
        prefixes = ["/"]
        while stack:
            self._live()
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                prefixes.pop()
                continue
            name, inode = item
            path = prefixes[-1] + name
            entry = self._entry(path, inode)
            yield entry
            if entry.type == "dir":
                stack.append(iter(self._list(path, inode)))
                prefixes.append(path + "/")

    def _lookup(self, path):
        r = self._live()
        rel = os.fsencode(path).strip(b"/")
        out = ffi.new("sqfs_inode_generic_t **")
        rc = lib.sqfs_dir_reader_find_by_path(r.dr, r.root, rel, out)
        if rc:
            self._fail(rc, f"looking up {path}")
        return ffi.gc(out[0], lib.sqfs_free)

    def stat(self, path):
        """The Entry of one path."""
        p = "/" + os.fsdecode(os.fsencode(path).strip(b"/"))
        return self._entry(p, self._lookup(path))

    def read_file(self, path):
        """The whole contents of a regular file."""
        inode = self._lookup(path)
        e = self._entry(path, inode)
        if e.type != "file":
            raise SquashfsError(f"{self._path}: {path} is not a regular file")
        buf = bytearray(e.size)
        ptr = ffi.cast("char *", ffi.from_buffer(buf))
        off = 0
        while off < e.size:
            n = lib.sqfs_data_reader_read(self._r.data, inode, off, ptr + off,
                                          min(CHUNK, e.size - off))
            if n < 0:
                self._fail(n, f"reading {path}")
            if n == 0:
                self._fail(-8, f"reading {path}")
            off += n
        return bytes(buf)


def mode_of(entry):
    """st_mode of an Entry (type bits + permissions)."""
    fmt = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
           "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK, "chr": stat.S_IFCHR,
           "blk": stat.S_IFBLK}[entry.type]
    return fmt | entry.mode
