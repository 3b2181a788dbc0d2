"""The one ELF parser (hpcc.runtime.elf) and its two users on hostile files from images: the
launch path's `elf_deps` (preads) answers (None, []) for anything malformed, the hooks'
`ElfInfo` (mmap) a HookError or empty facts; neither raises anything else nor loops.

The files are built here byte by byte (64-bit little-endian, virtual address = file offset):
a well-formed one first, so that each malformed variant differs from a file both users read.
"""
import os
import random
import struct
import time

import pytest

from hpcc.errors import HookError
from hpcc.runtime.elf import ElfInfo, elf_deps

INTERP, STRTAB, TABLES, DYNAMIC = 0x100, 0x200, 0x300, 0x600
NAMES = b"\0libfoo.so.1\0libbar.so.2\0libself.so.3\0/opt/lib:/x\0FOO_1.0\0"
IDX = {n: NAMES.index(n.encode() + b"\0") for n in
       ("libfoo.so.1", "libbar.so.2", "libself.so.3", "/opt/lib:/x", "FOO_1.0")}


def elf(tags, tables=b"", *, dyn_off=DYNAMIC, dyn_size=None):
    """An ELF file with a PT_INTERP, one PT_LOAD over the whole file and a PT_DYNAMIC holding
    `tags` ((tag, value) pairs, DT_NULL added); `tables` lands at TABLES."""
    dyn = b"".join(struct.pack("<qQ", t, v) for t, v in [*tags, (0, 0)])
    size = DYNAMIC + len(dyn)
    ph = [(1, 5, 0, 0, 0, size, size, 0x1000),                                  # PT_LOAD
          (3, 4, INTERP, INTERP, INTERP, 28, 28, 1),                            # PT_INTERP
          (2, 6, dyn_off, dyn_off, dyn_off, dyn_size or len(dyn), len(dyn), 8)]  # PT_DYNAMIC
    head = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64,
                                                            0, 0, 64, 56, len(ph), 64, 0, 0))
    out = bytearray(size)
    out[:64] = head
    for i, p in enumerate(ph):
        out[64 + i * 56:64 + (i + 1) * 56] = struct.pack("<IIQQQQQQ", *p)
    out[INTERP:INTERP + 28] = b"/lib64/ld-linux-x86-64.so.2\0"
    out[STRTAB:STRTAB + len(NAMES)] = NAMES
    out[TABLES:TABLES + len(tables)] = tables
    out[DYNAMIC:] = dyn
    return bytes(out)


BASE = [(1, IDX["libfoo.so.1"]), (1, IDX["libbar.so.2"]), (14, IDX["libself.so.3"]),
        (29, IDX["/opt/lib:/x"]), (5, STRTAB), (10, len(NAMES))]


def deps(data, tmp_path):
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        return elf_deps(data[:64], fd, len(data))
    finally:
        os.close(fd)


def info(data):
    """ElfInfo's facts, or the HookError's message; nothing else may come out."""
    try:
        e = ElfInfo(data, name="img:/lib/libx.so")
        return e.needed, e.soname, e.runpath, e.verneed, e.verdef, e.symbols()
    except HookError as err:
        return str(err)


def test_a_well_formed_file_gives_both_users_the_same_facts(tmp_path):
    # the control for every malformed variant below: the same builder, nothing broken
    verneed = struct.pack("<HHIII", 1, 1, IDX["libfoo.so.1"], 16, 0) \
        + struct.pack("<IHHII", 0, 0, 2, IDX["FOO_1.0"], 0)
    data = elf(BASE + [(0x6FFFFFFE, TABLES), (0x6FFFFFFF, 1)], verneed)
    assert deps(data, tmp_path) == ("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1", "libbar.so.2"])
    assert info(data) == (["libfoo.so.1", "libbar.so.2"], "libself.so.3", ["/opt/lib", "/x"],
                          {"libfoo.so.1": {"FOO_1.0"}}, set(), (set(), set()))


MALFORMED = {
    # PT_DYNAMIC points past the end of the file
    "dynamic past EOF": dict(tags=BASE, dyn_off=1 << 40),
    "dynamic runs past EOF": dict(tags=BASE, dyn_size=(1 << 20) - 1),
    # DT_STRTAB's address is in no PT_LOAD segment
    "string table outside the file": dict(tags=[(1, 1), (5, 1 << 50)]),
    "no string table": dict(tags=[(1, 1)]),
    # a name's index past DT_STRSZ, or past the end of the file
    "name past DT_STRSZ": dict(tags=[(1, len(NAMES) + 4), (5, STRTAB), (10, len(NAMES))]),
    "name past EOF": dict(tags=[(1, 1 << 40), (5, STRTAB)]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_dynamic_section_gives_nothing_to_warm_and_one_hook_error(tmp_path, case):
    data = elf(**MALFORMED[case])
    assert deps(data, tmp_path) == (None, [])
    out = info(data)
    assert isinstance(out, str), out
    assert out.startswith("img:/lib/libx.so is not a valid ELF file ("), out


def test_endless_version_and_hash_walks_end_cleanly(tmp_path):
    """Counts that promise 2^32 records and chains without their end bit: every walk is
    bounded by the file and the module's caps, fast, and ends in a clean answer."""
    aux_forever = struct.pack("<HHIII", 1, 0xFFFF, IDX["libfoo.so.1"], 16, 16) \
        + struct.pack("<IHHII", 0, 0, 2, IDX["FOO_1.0"], 16) * 8
    gnu_hash = struct.pack("<IIII", 1, 1, 1, 6) + bytes(8) + struct.pack("<I", 1) \
        + struct.pack("<I", 2) * 16                               # no chain entry has bit 0 set
    cases = [
        [(0x6FFFFFFE, TABLES), (0x6FFFFFFF, 0xFFFFFFFF)],                 # DT_VERNEEDNUM
        [(0x6FFFFFFC, TABLES), (0x6FFFFFFD, 0xFFFFFFFF)],                 # DT_VERDEFNUM
        [(6, TABLES + 0x100), (0x6FFFFEF5, TABLES), (11, 24)],            # DT_GNU_HASH
    ]
    for extra, tables in zip(cases, [aux_forever, aux_forever, gnu_hash]):
        data = elf(BASE + extra, tables)
        t0 = time.monotonic()
        assert deps(data, tmp_path) == ("/lib64/ld-linux-x86-64.so.2",
                                        ["libfoo.so.1", "libbar.so.2"])
        out = info(data)
        assert time.monotonic() - t0 < 2
        # facts (the hash walk runs off the file: no symbols) or one HookError
        if extra[0][0] == 6:
            assert out[0] == ["libfoo.so.1", "libbar.so.2"] and out[-1] == (set(), set())
        else:
            assert isinstance(out, tuple) or "is not a valid ELF file" in out, out


def test_truncated_and_corrupted_real_library_never_raises_for_either_user(tmp_path):
    data = open("/lib/x86_64-linux-gnu/libnuma.so.1", "rb").read()
    assert deps(data, tmp_path)[1] and not isinstance(info(data), str)   # the control
    rng = random.Random(4321)
    variants = [data[:n] for n in (0, 4, 20, 63, 64, 200, 1000, 4096, len(data) // 2)]
    for _ in range(150):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(0, 8192) if rng.random() < 0.7 else rng.randrange(len(bad))
            bad[i] = rng.randrange(256)
        variants.append(bytes(bad))
    for v in variants:
        interp, needed = deps(v, tmp_path)
        assert interp is None or isinstance(interp, str)
        assert all(isinstance(n, str) and "/" not in n for n in needed)
        info(v)          # facts or a HookError; anything else fails the test
