"""The one ELF reader of hpcc: the facts the runtime and the hooks need from ELF files that
come from images (untrusted: every offset is bounds-checked, every walk is bounded, anything
malformed is an error or an empty answer, never an exception of another kind).

There is one parser of the dynamic section, `_Dynamic`: it reads what the dynamic loader
reads, the program headers (PT_INTERP, PT_DYNAMIC, the PT_LOAD segments that map virtual
addresses to file offsets) and the dynamic entries, through a `read(offset, n)` callable, so
the same walk runs over a few preads (the launch path) or over an mmap (the hooks). Every
table comes from a dynamic entry, as for ld.so: the names (DT_STRTAB, DT_STRSZ), the symbol
versions (DT_VERNEED/DT_VERDEF and their counts), the dynamic symbols (DT_SYMTAB). Section
headers (which the loader never reads and strip tools may remove) give one number only, the
count of dynamic symbols, which no dynamic entry states (see `_Dynamic.symbol_count`).

- `elf_deps(head, fd, size)`: the interpreter and DT_NEEDED names by a few preads
  (runtime.warm reads the command's loader chain with it on every launch).
- `elf_header(data)`: (class, machine) from the first 20 bytes (does a host library suit).
- `ElfInfo`: soname, DT_NEEDED, RPATH/RUNPATH, symbol versions needed and defined, dynamic
  symbols, over an mmap (the MPI and GPU hooks: ~25x faster than pyelftools for the same
  facts, 1.1 ms against 29 ms for libmpich.so.12 on the loaded 2-core machine; tests check
  that both agree).

Imports stay at os and struct (mmap when ElfInfo maps a file): runtime.warm imports this module
on every launch.
"""
import os
import struct

from ..errors import HookError

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
SHT_DYNSYM = 11
DT_NEEDED, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT = 1, 4, 5, 6, 10, 11
DT_SONAME, DT_RPATH, DT_RUNPATH, DT_GNU_HASH = 14, 15, 29, 0x6FFFFEF5
DT_VERDEF, DT_VERDEFNUM, DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFC, 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF
# the dynamic entries whose tables hold names in DT_STRTAB
_NAMED_BY_STRTAB = (DT_SONAME, DT_VERNEED, DT_VERDEF, DT_SYMTAB)
MAX_NEEDED = 32          # what elf_deps hands the warmer
MAX_PHNUM = 256          # real objects have about 10-15 program headers
MAX_DYNAMIC = 1 << 20    # bytes of dynamic entries (a real one: a few hundred)
MAX_STR = 1 << 16        # one string (C++ symbol names run to a few KiB)
MAX_VERSIONS = 1 << 16   # records of a version table walk (offsets only go forward)
MAX_SYMBOLS = 1 << 22    # dynamic symbols (libc: ~3,000; large C++ libraries: ~10^5)


def elf_header(data):
    """(class, machine) from the first bytes of an ELF file, or None."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        return None
    order = "<" if data[5] == 1 else ">"
    return data[4], struct.unpack_from(order + "H", data, 18)[0]


class _Malformed(Exception):
    """Inside _Dynamic only: what is wrong with the file, for ElfInfo's message."""


class _Dynamic:
    """The program-header walk over `read(offset, n) -> bytes` (short at the end of the file)
    of a file of `size` bytes whose first 64 bytes are `head`. Raises _Malformed for a file
    that is not ELF or whose program headers cannot be read; after that, every fact is read
    on demand and bounds-checked (a string or table outside the file raises _Malformed, which
    elf_deps turns into an empty answer and ElfInfo into a HookError)."""

    def __init__(self, head, read, size, buf=None):
        if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) \
                or head[5] not in (1, 2):
            raise _Malformed("no ELF header")
        self.read, self.size, self.buf, self.head = read, size, buf, head
        self.is64 = head[4] == 2
        o = self.o = "<" if head[5] == 1 else ">"
        self.machine, = struct.unpack_from(o + "H", head, 18)
        # each program header read as (type, offset, vaddr, filesz), the rest skipped
        if self.is64:
            if len(head) < 64:
                raise _Malformed("no ELF header")
            phoff, = struct.unpack_from(o + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(o + "HH", head, 54)
            fmt, minsize = o + "I4xQQ8xQ", 56     # type, flags, offset, vaddr, paddr, filesz
        else:
            phoff, = struct.unpack_from(o + "I", head, 28)
            phentsize, phnum = struct.unpack_from(o + "HH", head, 42)
            fmt, minsize = o + "III4xI", 32       # type, offset, vaddr, paddr, filesz
        if phnum and (phentsize < minsize or phnum > MAX_PHNUM):
            raise _Malformed("bad program header table")
        ph = read(phoff, phentsize * phnum) if phnum else b""
        if len(ph) < phentsize * phnum:
            raise _Malformed("program headers past the end of the file")
        self.interp_at, dyn, self.loads = None, None, []
        fmt += f"{phentsize - struct.calcsize(fmt)}x"
        for p_type, p_off, p_vaddr, p_filesz in struct.iter_unpack(fmt, ph):
            if p_type == PT_LOAD:
                self.loads.append((p_vaddr, p_off, p_filesz))
            elif p_type == PT_DYNAMIC and 0 < p_filesz < MAX_DYNAMIC:
                dyn = (p_off, p_filesz)
            elif p_type == PT_INTERP and 0 < p_filesz < 4096:
                self.interp_at = (p_off, p_filesz)
        # the dynamic entries up to DT_NULL: {tag: value} (the last one wins, as in ld.so),
        # and the repeated ones in order
        tags, needed, rpath, runpath = {}, [], [], []
        if dyn:
            raw = read(dyn[0], dyn[1])
            if len(raw) < dyn[1]:
                raise _Malformed("dynamic section past the end of the file")
            step = 16 if self.is64 else 8
            for tag, val in struct.iter_unpack(o + ("qQ" if self.is64 else "iI"),
                                               raw[:len(raw) // step * step]):
                if tag == 0:
                    break
                if tag == DT_NEEDED:
                    needed.append(val)
                elif tag == DT_RPATH:
                    rpath.append(val)
                elif tag == DT_RUNPATH:
                    runpath.append(val)
                tags[tag] = val
        self.tags, self.needed_at, self.rpath_at, self.runpath_at = tags, needed, rpath, runpath

    def interp(self):
        if self.interp_at is None:
            return None
        off, n = self.interp_at
        return self.read(off, n).split(b"\0", 1)[0].decode("utf-8", "replace")

    def offset(self, vaddr, what):
        """The file offset of a virtual address (a table the dynamic entries point to)."""
        for start, off, filesz in self.loads:
            if start <= vaddr < start + filesz:
                return vaddr - start + off
        raise _Malformed(f"its {what} is outside the file")

    def names(self):
        """A function idx -> the NUL-terminated name at idx in DT_STRTAB (bounded by the file,
        DT_STRSZ and MAX_STR); raises _Malformed where there is no string table."""
        if DT_STRTAB not in self.tags:
            raise _Malformed("no string table")
        strtab = self.offset(self.tags[DT_STRTAB], "string table")
        strsz = self.tags.get(DT_STRSZ)
        limit = self.size if strsz is None else min(self.size, strtab + strsz)
        read, buf = self.read, self.buf

        def name(idx):
            pos = strtab + idx
            if not strtab <= pos < limit:
                raise _Malformed("a name is outside its string table")
            stop = min(pos + MAX_STR, limit)
            if buf is not None:                          # a buffer: search it in place
                end = buf.find(b"\0", pos, stop)
                return buf[pos:end if end >= 0 else stop].decode("utf-8", "replace")
            parts = []
            while pos < stop:                            # preads of 256 bytes (most names)
                chunk = read(pos, min(256, stop - pos))
                end = chunk.find(b"\0")
                if end >= 0 or not chunk:
                    parts.append(chunk[:end] if end >= 0 else chunk)
                    break
                parts.append(chunk)
                pos += len(chunk)
            return b"".join(parts).decode("utf-8", "replace")
        return name

    def u32s(self, off, n):
        data = self.read(off, 4 * n)
        if off < 0 or len(data) < 4 * n:
            raise _Malformed("a table is outside the file")
        return struct.unpack(f"{self.o}{n}I", data)

    def versions_needed(self, name):
        """{soname: {version}} from DT_VERNEED (Elf_Verneed records, each with its
        Elf_Vernaux list)."""
        out = {}
        if DT_VERNEED not in self.tags:
            return out
        pos = self.offset(self.tags[DT_VERNEED], "version table")
        for _ in range(min(self.tags.get(DT_VERNEEDNUM, 0), MAX_VERSIONS)):
            _v, cnt, file_, aux, nxt = struct.unpack(self.o + "HHIII", self._at(pos, 16))
            names = out.setdefault(name(file_), set())
            apos = pos + aux
            for _ in range(cnt):
                _h, _f, _oth, vname, anext = struct.unpack(self.o + "IHHII", self._at(apos, 16))
                names.add(name(vname))
                if not anext:
                    break
                apos += anext
            if not nxt:
                break
            pos += nxt
        return out

    def versions_defined(self, name):
        """The version names DT_VERDEF defines, less the base one (it names the file)."""
        out = set()
        if DT_VERDEF not in self.tags:
            return out
        pos = self.offset(self.tags[DT_VERDEF], "version table")
        for _ in range(min(self.tags.get(DT_VERDEFNUM, 0), MAX_VERSIONS)):
            _v, flags, _ndx, cnt, _h, aux, nxt = struct.unpack(self.o + "HHHHIII",
                                                               self._at(pos, 20))
            if cnt and not flags & 0x1:                  # VER_FLG_BASE names the file itself
                vname, = struct.unpack(self.o + "I", self._at(pos + aux, 4))
                out.add(name(vname))
            if not nxt:
                break
            pos += nxt
        return out

    def _at(self, off, n):
        data = self.read(off, n) if off >= 0 else b""
        if len(data) < n:
            raise _Malformed("a version record is outside the file")
        return data

    def symbol_count(self, symtab):
        """How many entries DT_SYMTAB has. No dynamic entry says so: DT_HASH's nchain does,
        but GNU-hash-only objects (the default since about 2010) hash only their defined
        symbols, so the undefined ones after the last hashed symbol (all of them, in an object
        that defines none) are counted by nothing but the .dynsym section header. Its count
        is used when its address is DT_SYMTAB's (a section header that lies can only shorten
        or lengthen the table it is bounds-checked against); without section headers, the
        hash tables' count."""
        n = self._dynsym_section_count(symtab)
        if n is not None:
            return n
        if DT_HASH in self.tags:
            return self.u32s(self.offset(self.tags[DT_HASH], "hash table"), 2)[1]
        if DT_GNU_HASH not in self.tags:
            return 0
        off = self.offset(self.tags[DT_GNU_HASH], "hash table")
        nbuckets, symoffset, bloom_size, _shift = self.u32s(off, 4)
        if nbuckets > MAX_SYMBOLS or bloom_size > MAX_SYMBOLS:
            raise _Malformed("a hash table is too large")
        buckets = off + 16 + bloom_size * (8 if self.is64 else 4)
        last = max(self.u32s(buckets, nbuckets), default=0) if nbuckets else 0
        if last < symoffset:
            return symoffset
        chain = buckets + 4 * nbuckets
        while last < MAX_SYMBOLS:                         # the last chain ends with bit 0 set
            if self.u32s(chain + 4 * (last - symoffset), 1)[0] & 1:
                return last + 1
            last += 1
        raise _Malformed("a hash chain does not end")

    def _dynsym_section_count(self, symtab):
        """sh_size / sh_entsize of the SHT_DYNSYM section at address symtab, or None (no
        readable section headers, or none of them is that table)."""
        h, o = self.head, self.o
        if self.is64:
            shoff, = struct.unpack_from(o + "Q", h, 40)
            (shentsize, shnum), fmt = struct.unpack_from(o + "HH", h, 58), o + "IIQQQQIIQQ"
        else:
            shoff, = struct.unpack_from(o + "I", h, 32)
            (shentsize, shnum), fmt = struct.unpack_from(o + "HH", h, 46), o + "IIIIIIIIII"
        if not shoff or shentsize < struct.calcsize(fmt) or not 0 < shnum <= 4096:
            return None
        table = self.read(shoff, shentsize * shnum)
        if len(table) < shentsize * shnum:
            return None
        for i in range(shnum):
            _n, t, _f, addr, _off, size, _l, _i, _a, ent = struct.unpack_from(fmt, table,
                                                                              i * shentsize)
            if t == SHT_DYNSYM and addr == symtab and ent:
                return size // ent
        return None

    def symbols(self, name):
        """(defined, undefined-strong) dynamic symbol names."""
        defined, undefined = set(), set()
        if DT_SYMTAB not in self.tags:
            return defined, undefined
        n = self.symbol_count(self.tags[DT_SYMTAB])
        if not n:
            return defined, undefined
        if n > MAX_SYMBOLS:
            raise _Malformed("too many symbols")
        off = self.offset(self.tags[DT_SYMTAB], "symbol table")
        if self.is64:
            fmt, ni, nb, ns = self.o + "IBBHQQ", 0, 1, 3
        else:
            fmt, ni, nb, ns = self.o + "IIIBBH", 0, 3, 5
        step = struct.calcsize(fmt)
        ent = self.tags.get(DT_SYMENT, step)
        if ent != step:
            raise _Malformed("bad symbol entry size")
        data = self.read(off, n * ent)
        if len(data) < n * ent:
            raise _Malformed("the symbol table is outside the file")
        for rec in struct.iter_unpack(fmt, data):
            if not rec[ni]:
                continue
            bind = rec[nb] >> 4
            if rec[ns] == 0:
                if bind == 1:
                    undefined.add(name(rec[ni]))
            elif bind in (1, 2, 10):                     # global, weak, GNU unique
                defined.add(name(rec[ni]))
        return defined, undefined


def elf_deps(head, fd, size):
    """(interpreter, [DT_NEEDED names]) of a 64-bit little-endian ELF file, from its first
    bytes `head` and preads of fd; (None, []) for anything else or anything malformed (the
    file comes from the image). Other classes are left out because the warmer looks the
    names up in the 64-bit library directories, where a 32-bit program's libraries are not;
    names with a '/' are left out too."""
    if head[4:6] != b"\x02\x01":
        return None, []
    try:
        dyn = _Dynamic(head, lambda off, n: os.pread(fd, n, off), size)
        interp = dyn.interp()
        needed = []
        if dyn.needed_at:
            name_at = dyn.names()
            for idx in dyn.needed_at[:MAX_NEEDED]:
                name = name_at(idx)
                if name and "/" not in name:
                    needed.append(name)
        return interp, needed
    except (_Malformed, struct.error, OSError, ValueError, OverflowError):
        return None, []


class ElfInfo:
    """Dynamic-linking facts of one ELF file: soname, DT_NEEDED, RPATH/RUNPATH, the symbol
    versions it needs (per soname) and defines, and its dynamic symbols (read on first use).

    The module's one dynamic-section walk over an mmap: the hook runs on every launch, and
    this is ~25x faster than pyelftools for the same facts (tests check that both agree)."""

    def __init__(self, data_or_file, name="?"):
        import mmap
        self.name = name
        self._syms = None
        try:
            if isinstance(data_or_file, (bytes, bytearray)):
                m = bytes(data_or_file)
            else:
                m = mmap.mmap(data_or_file.fileno(), 0, prot=mmap.PROT_READ)
            self._m = m
            d = self._dyn = _Dynamic(m[:64], lambda off, n: m[off:off + n] if off >= 0 else b"",
                                     len(m), m)
            self.elfclass = 64 if d.is64 else 32
            self.machine = d.machine
            self.soname = None
            self.needed, self.rpath, self.runpath = [], [], []
            self.verneed, self.verdef = {}, set()
            self._names = None
            if not (d.needed_at or d.rpath_at or d.runpath_at
                    or any(t in d.tags for t in _NAMED_BY_STRTAB)):
                return                                   # nothing named: static, or no names
            at = self._names = d.names()
            self.needed = [at(i) for i in d.needed_at]
            if DT_SONAME in d.tags:
                self.soname = at(d.tags[DT_SONAME])
            self.rpath = [p for i in d.rpath_at for p in at(i).split(":") if p]
            self.runpath = [p for i in d.runpath_at for p in at(i).split(":") if p]
            self.verneed = d.versions_needed(at)
            self.verdef = d.versions_defined(at)
        except (_Malformed, struct.error, ValueError, OverflowError, OSError) as e:
            raise HookError(f"{name} is not a valid ELF file ({e})") from None

    @classmethod
    def from_path(cls, path):
        try:
            with open(path, "rb") as f:
                return cls(f, name=path)
        except OSError as e:
            raise HookError(f"cannot read {path}: {e.strerror}") from None

    def symbols(self):
        """(defined, undefined-strong) sets of dynamic symbol names (empty for a malformed
        symbol table: files from images are untrusted)."""
        if self._syms is None:
            try:
                self._syms = (self._dyn.symbols(self._names) if self._names is not None
                              else (set(), set()))
            except (_Malformed, struct.error, ValueError, OverflowError):
                self._syms = (set(), set())
        return self._syms
