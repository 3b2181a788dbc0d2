"""What the dynamic linkers on both sides would load: the host's (`HostLibraries`) and the
container's (`ContainerLibraries`, through the in-root `Root`), from their ld.so.cache files,
search paths and default directories.
"""
import os
import stat
import struct

from .elf import ElfInfo, default_lib_dirs, elf_header

_OLD_MAGIC = b"ld.so-1.7.0"
_NEW_MAGIC = b"glibc-ld.so.cache1.1"


def parse_ld_cache(data):
    """{soname: [path, ...]} in cache order from the bytes of an ld.so.cache (glibc formats).

    The cache comes from the image (untrusted): anything malformed ends the parse with what
    was read so far, never an exception."""
    out = {}
    try:
        _parse_ld_cache(data or b"", out)
    except struct.error:
        pass
    return out


def _parse_ld_cache(data, out):
    base = 0
    if data.startswith(_OLD_MAGIC):
        (n,) = struct.unpack_from("<I", data, 12)
        n = min(n, len(data) // 12)
        off = 16 + n * 12
        off = (off + 7) & ~7
        if data[off:off + len(_NEW_MAGIC)] == _NEW_MAGIC:
            base = off
        else:  # old format only: strings follow the entries
            strings = 16 + n * 12
            for i in range(n):
                flags, key, value = struct.unpack_from("<iII", data, 16 + i * 12)
                _add(out, data, strings + key, strings + value)
            return
    if data[base:base + len(_NEW_MAGIC)] != _NEW_MAGIC:
        return
    (n, _strlen) = struct.unpack_from("<II", data, base + 20)
    n = min(n, len(data) // 24)
    # String offsets are relative to the start of the new-format header (the file start
    # when the cache has only the new format).
    ent = base + 48
    for i in range(n):
        flags, key, value, _osv, _hw = struct.unpack_from("<iIIIQ", data, ent + i * 24)
        _add(out, data, base + key, base + value)


def _add(out, data, koff, voff):
    try:
        key = data[koff:data.index(b"\0", koff)].decode()
        val = data[voff:data.index(b"\0", voff)].decode()
    except (ValueError, UnicodeDecodeError):
        return
    out.setdefault(key, []).append(val)


class HostLibraries:
    """Resolve sonames as the host's dynamic linker would (RPATH/RUNPATH, cache, defaults)."""

    def __init__(self, extra_dirs=(), cache_path="/etc/ld.so.cache", sysroot="/"):
        self.sysroot = sysroot
        try:
            with open(self._p(cache_path), "rb") as f:
                self.cache = parse_ld_cache(f.read())
        except OSError:
            self.cache = {}
        self.extra_dirs = list(extra_dirs)
        self._header = None

    def _p(self, path):
        return path if self.sysroot == "/" else os.path.join(self.sysroot, path.lstrip("/"))

    def _matches(self, path, want):
        if want is None:
            return True
        try:
            with open(path, "rb") as f:
                return elf_header(f.read(20)) == want
        except OSError:
            return False

    def find(self, soname, *, origin=None, rpath=(), runpath=(), want=None):
        def expand(d):
            if origin:
                d = d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            return d
        cands = [os.path.join(expand(d), soname) for d in (rpath if not runpath else ())]
        cands += [os.path.join(expand(d), soname) for d in runpath]
        cands += [os.path.join(d, soname) for d in self.extra_dirs]
        cands += [self._p(p) for p in self.cache.get(soname, [])]
        cands += [os.path.join(self._p(d), soname) for d in default_lib_dirs()]
        for c in cands:
            if os.path.isfile(c) and self._matches(c, want):
                return c
        return None


class ContainerLibraries:
    """Where the container's dynamic linker finds a soname (its cache, LD_LIBRARY_PATH,
    defaults)."""

    def __init__(self, root, env):
        self.root = root
        self.cache = parse_ld_cache(root.read("/etc/ld.so.cache"))
        self.ld_library_path = [d for d in env.get("LD_LIBRARY_PATH", "").split(":")
                                if d.startswith("/")]
        self.default_dirs = default_lib_dirs()
        libc = self.find("libc.so.6", use_env=False)
        self.libc = libc
        self.libdir = os.path.dirname(root.realpath(libc)) if libc else None

    def find(self, soname, *, use_env=True):
        dirs = list(self.ld_library_path) if use_env else []
        for d in dirs:
            p = f"{d.rstrip('/')}/{soname}"
            if self._is_file(p):
                return p
        for p in self.cache.get(soname, []):
            if self._is_file(p):
                return p
        for d in self.default_dirs:
            p = f"{d}/{soname}"
            if self._is_file(p):
                return p
        return None

    def _is_file(self, cpath):
        st = self.root.stat(cpath)
        return st is not None and stat.S_ISREG(st.st_mode)

    def sonames_with_prefix(self, prefix):
        """Sonames starting with prefix that the container's cache or lib dirs know."""
        found = {k for k in self.cache if k.startswith(prefix)}
        for d in self.ld_library_path + self.default_dirs:
            for name in self.root.listdir(d):
                if name.startswith(prefix):
                    found.add(name)
        return found

    def elf(self, cpath):
        try:
            fd = self.root.open(cpath, os.O_RDONLY)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return ElfInfo(os.fdopen(fd, "rb"), name=cpath)

    def musl(self):
        return any(n.startswith("ld-musl-")
                   for d in ("/lib", "/usr/lib") for n in self.root.listdir(d))
