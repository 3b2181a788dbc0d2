"""The one ELF reader of hpcc: the facts the runtime and the hooks need from ELF files that
come from images (untrusted: every offset is bounds-checked, anything malformed is an error or
an empty answer, never an exception of another kind).

- `elf_deps(head, fd, size)`: the interpreter and DT_NEEDED names, from the program headers,
  by a few preads (the launch path: runtime.warm reads the command's loader chain with it).
- `elf_header(data)`: (class, machine) from the first 20 bytes (does a host library suit).
- `ElfInfo`: soname, DT_NEEDED, RPATH/RUNPATH, symbol versions needed and defined, dynamic
  symbols, from the section headers over an mmap (the MPI and GPU hooks: ~50x faster than
  pyelftools for the same facts; tests check that both agree).

Imports stay at os and struct (mmap when ElfInfo maps a file): runtime.warm imports this module
on every launch.
"""
import os
import struct

from ..errors import HookError

PT_INTERP, PT_DYNAMIC, PT_LOAD = 3, 2, 1
SHT_DYNSYM, SHT_DYNAMIC = 11, 6
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 5, 14, 15, 29
MAX_NEEDED = 32


def elf_header(data):
    """(class, machine) from the first bytes of an ELF file, or None."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        return None
    order = "<" if data[5] == 1 else ">"
    return data[4], struct.unpack_from(order + "H", data, 18)[0]


def elf_deps(head, fd, size):
    """(interpreter, [DT_NEEDED names]) of a 64-bit little-endian ELF file, from its first
    bytes `head` and preads of fd; ([], None) for anything else. Bounds-checked: the file
    comes from the image."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None, []
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize < 56 or phnum > 64:
        return None, []
    ph = os.pread(fd, phentsize * phnum, phoff)
    if len(ph) < phentsize * phnum:
        return None, []
    interp, dyn, loads = None, None, []
    for i in range(phnum):
        p_type, _, p_off, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", ph,
                                                                         i * phentsize)
        if p_type == PT_INTERP and 0 < p_filesz < 4096:
            interp = os.pread(fd, p_filesz, p_off).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif p_type == PT_DYNAMIC and 0 < p_filesz < (1 << 20):
            dyn = (p_off, p_filesz)
        elif p_type == PT_LOAD:
            loads.append((p_vaddr, p_off, p_filesz))
    needed = []
    if dyn:
        raw = os.pread(fd, dyn[1], dyn[0])
        strtab, offs = None, []
        for j in range(len(raw) // 16):
            tag, val = struct.unpack_from("<qQ", raw, j * 16)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                offs.append(val)
            elif tag == DT_STRTAB:
                strtab = val
        base = None
        for vaddr, off, filesz in loads:  # the string table's vaddr to a file offset
            if strtab is not None and vaddr <= strtab < vaddr + filesz:
                base = strtab - vaddr + off
        if base is not None:
            for o in offs[:MAX_NEEDED]:
                if 0 <= base + o < size:
                    name = os.pread(fd, 256, base + o).split(b"\0", 1)[0]
                    name = name.decode("utf-8", "replace")
                    if name and "/" not in name:
                        needed.append(name)
    return interp, needed


class ElfInfo:
    """Dynamic-linking facts of one ELF file: soname, DT_NEEDED, RPATH/RUNPATH, the symbol
    versions it needs (per soname) and defines, and its dynamic symbols.

    A small reader of its own over an mmap (section headers, .dynamic, .gnu.version_r/_d,
    .dynsym): the hook runs on every launch, and this is ~50x faster than pyelftools for the
    same facts (tests check that both agree)."""

    def __init__(self, data_or_file, name="?"):
        import mmap
        self.name = name
        self._syms = None
        try:
            if isinstance(data_or_file, (bytes, bytearray)):
                self._m = bytes(data_or_file)
            else:
                self._m = mmap.mmap(data_or_file.fileno(), 0, prot=mmap.PROT_READ)
            self._parse()
        except (struct.error, IndexError, ValueError, OverflowError, OSError) as e:
            raise HookError(f"{name} is not a valid ELF file ({e})") from None

    @classmethod
    def from_path(cls, path):
        try:
            with open(path, "rb") as f:
                return cls(f, name=path)
        except OSError as e:
            raise HookError(f"cannot read {path}: {e.strerror}") from None

    def _parse(self):
        m = self._m
        if m[:4] != b"\x7fELF" or m[4] not in (1, 2) or m[5] not in (1, 2):
            raise ValueError("no ELF header")
        self.elfclass = 64 if m[4] == 2 else 32
        o = self._o = "<" if m[5] == 1 else ">"
        if self.elfclass == 64:
            (self.machine,) = struct.unpack_from(o + "H", m, 18)
            shoff, = struct.unpack_from(o + "Q", m, 40)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", m, 58)
            shfmt = o + "IIQQQQIIQQ"
        else:
            (self.machine,) = struct.unpack_from(o + "H", m, 18)
            shoff, = struct.unpack_from(o + "I", m, 32)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", m, 46)
            shfmt = o + "IIIIIIIIII"
        secs = []
        for i in range(shnum):
            n, t, _fl, _addr, off, size, link, info, _al, ent = struct.unpack_from(
                shfmt, m, shoff + i * shentsize)
            secs.append((t, off, size, link, info, ent))
        self._secs = secs
        self.soname = None
        self.needed, self.rpath, self.runpath = [], [], []
        self.verneed, self.verdef = {}, set()
        for t, off, size, link, info, ent in secs:
            if t == SHT_DYNAMIC:
                stroff = secs[link][1]
                fmt = o + ("qQ" if self.elfclass == 64 else "iI")
                step = struct.calcsize(fmt)
                for i in range(size // step):
                    tag, val = struct.unpack_from(fmt, m, off + i * step)
                    if tag == 0:
                        break
                    if tag == DT_NEEDED:
                        self.needed.append(self._str(stroff, val))
                    elif tag == DT_SONAME:
                        self.soname = self._str(stroff, val)
                    elif tag == DT_RPATH:
                        self.rpath += [p for p in self._str(stroff, val).split(":") if p]
                    elif tag == DT_RUNPATH:
                        self.runpath += [p for p in self._str(stroff, val).split(":") if p]
            elif t == SHT_GNU_VERNEED:
                stroff = secs[link][1]
                pos = off
                for _ in range(info):
                    _v, cnt, file_, aux, nxt = struct.unpack_from(o + "HHIII", m, pos)
                    names = self.verneed.setdefault(self._str(stroff, file_), set())
                    apos = pos + aux
                    for _ in range(cnt):
                        _h, _f, _oth, vname, anext = struct.unpack_from(o + "IHHII", m, apos)
                        names.add(self._str(stroff, vname))
                        apos += anext
                    if not nxt:
                        break
                    pos += nxt
            elif t == SHT_GNU_VERDEF:
                stroff = secs[link][1]
                pos = off
                for _ in range(info):
                    _v, flags, _ndx, cnt, _h, aux, nxt = struct.unpack_from(o + "HHHHIII", m, pos)
                    if cnt and not flags & 0x1:    # VER_FLG_BASE names the file itself
                        vname, = struct.unpack_from(o + "I", m, pos + aux)
                        self.verdef.add(self._str(stroff, vname))
                    if not nxt:
                        break
                    pos += nxt

    def _str(self, stroff, idx):
        start = stroff + idx
        end = self._m.find(b"\0", start)
        return bytes(self._m[start:end]).decode("utf-8", "replace")

    def symbols(self):
        """(defined, undefined-strong) sets of dynamic symbol names (empty for a malformed
        symbol table: files from images are untrusted)."""
        if self._syms is None:
            try:
                self._syms = self._read_symbols()
            except (struct.error, IndexError, ValueError, OverflowError):
                self._syms = (set(), set())
        return self._syms

    def _read_symbols(self):
        defined, undefined = set(), set()
        m, o = self._m, self._o
        for t, off, size, link, info, ent in self._secs:
            if t != SHT_DYNSYM:
                continue
            stroff = self._secs[link][1]
            if self.elfclass == 64:
                fmt, ni, nb, ns = o + "IBBHQQ", 0, 1, 3
            else:
                fmt, ni, nb, ns = o + "IIIBBH", 0, 3, 5
            step = struct.calcsize(fmt)
            for rec in struct.iter_unpack(fmt, m[off:off + (size // step) * step]):
                if not rec[ni]:
                    continue
                bind = rec[nb] >> 4
                if rec[ns] == 0:
                    if bind == 1:
                        undefined.add(self._str(stroff, rec[ni]))
                elif bind in (1, 2, 10):
                    defined.add(self._str(stroff, rec[ni]))
        return defined, undefined
