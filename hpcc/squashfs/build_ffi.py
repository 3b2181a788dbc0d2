"""cffi build script (API mode) for the libsquashfs binding: produces ``hpcc.squashfs._sqfs``.

Run at install time through setup.py's ``cffi_modules``. The C is in ``csrc/``: the glue's
interface is declared once, in ``csrc/hpcc_sqfs.h``; the part of it between the CFFI-CDEF
markers is also what cffi is told Python may call. Below is only what cffi cannot read from
a header itself: the few declarations of libsquashfs's own API that Python uses directly
(in API mode cffi checks them against the real headers when it compiles).

libsquashfs 1.2 (squashfs-tools-ng) ships its pkg-config file as ``libsquashfs1``; older or
newer packagings call it ``libsquashfs``. Both are tried, then a plain ``-lsquashfs``.
"""
import os
import re
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
HEADER = os.path.join(CSRC, "hpcc_sqfs.h")
SOURCES = ("fdfile.c", "feeder.c", "writer.c", "reader.c", "tarheader.c")
CFLAGS = ["-O2", "-Wall", "-Wextra"]

# libsquashfs (sqfs/*.h): the types and calls Python uses itself.
LIBSQUASHFS = r"""
typedef uint8_t sqfs_u8;
typedef uint16_t sqfs_u16;
typedef uint32_t sqfs_u32;
typedef uint64_t sqfs_u64;
typedef int32_t sqfs_s32;

typedef struct sqfs_inode_generic_t sqfs_inode_generic_t;
typedef struct sqfs_dir_entry_t {
    sqfs_u16 offset;
    int16_t inode_diff;
    sqfs_u16 type;
    sqfs_u16 size;
    sqfs_u8 name[];
} sqfs_dir_entry_t;
typedef struct sqfs_xattr_entry_t {
    sqfs_u16 type;
    sqfs_u16 size;
    sqfs_u8 key[];
} sqfs_xattr_entry_t;
typedef struct sqfs_xattr_value_t {
    sqfs_u32 size;
    sqfs_u8 value[];
} sqfs_xattr_value_t;
typedef struct sqfs_xattr_id_t {
    sqfs_u64 xattr;
    sqfs_u32 count;
    sqfs_u32 size;
} sqfs_xattr_id_t;
typedef struct sqfs_super_t {
    sqfs_u32 magic;
    sqfs_u32 inode_count;
    sqfs_u32 modification_time;
    sqfs_u32 block_size;
    sqfs_u32 fragment_entry_count;
    sqfs_u16 compression_id;
    sqfs_u16 block_log;
    sqfs_u16 flags;
    sqfs_u16 id_count;
    sqfs_u16 version_major;
    sqfs_u16 version_minor;
    sqfs_u64 root_inode_ref;
    sqfs_u64 bytes_used;
    sqfs_u64 id_table_start;
    sqfs_u64 xattr_id_table_start;
    sqfs_u64 inode_table_start;
    sqfs_u64 directory_table_start;
    sqfs_u64 fragment_table_start;
    sqfs_u64 export_table_start;
} sqfs_super_t;

typedef struct sqfs_xattr_reader_t sqfs_xattr_reader_t;
typedef struct sqfs_dir_reader_t sqfs_dir_reader_t;
typedef struct sqfs_data_reader_t sqfs_data_reader_t;
typedef struct sqfs_compressor_t sqfs_compressor_t;
typedef struct sqfs_id_table_t sqfs_id_table_t;

void sqfs_free(void *ptr);

int sqfs_dir_reader_find_by_path(sqfs_dir_reader_t *rd, const sqfs_inode_generic_t *start,
                                 const char *path, sqfs_inode_generic_t **out);
sqfs_s32 sqfs_data_reader_read(sqfs_data_reader_t *data, const sqfs_inode_generic_t *inode,
                               sqfs_u64 offset, void *buffer, sqfs_u32 size);
int sqfs_xattr_reader_get_desc(sqfs_xattr_reader_t *xr, sqfs_u32 idx, sqfs_xattr_id_t *desc);
int sqfs_xattr_reader_seek_kv(sqfs_xattr_reader_t *xr, const sqfs_xattr_id_t *desc);
int sqfs_xattr_reader_read_key(sqfs_xattr_reader_t *xr, sqfs_xattr_entry_t **key_out);
int sqfs_xattr_reader_read_value(sqfs_xattr_reader_t *xr, const sqfs_xattr_entry_t *key,
                                 sqfs_xattr_value_t **val_out);
"""


def glue_declarations():
    """The interface part of csrc/hpcc_sqfs.h, between its CFFI-CDEF markers."""
    with open(HEADER) as f:
        text = f.read()
    m = re.search(r"/\* CFFI-CDEF-BEGIN \*/\n(.*?)/\* CFFI-CDEF-END \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{HEADER}: the CFFI-CDEF-BEGIN/END markers are missing")
    return m.group(1)


def _pkg_config():
    for name in ("libsquashfs1", "libsquashfs"):
        try:
            cflags = subprocess.run(["pkg-config", "--cflags", name], check=True,
                                    capture_output=True, text=True).stdout
            libs = subprocess.run(["pkg-config", "--libs", name], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        return shlex.split(cflags), shlex.split(libs)
    return [], ["-lsquashfs"]


def _path(p):
    """Relative to the build's directory when below it (setuptools wants relative sources)."""
    rel = os.path.relpath(p)
    return p if rel.startswith("..") else rel


_cflags, _libs = _pkg_config()

ffibuilder = FFI()
ffibuilder.cdef(LIBSQUASHFS + glue_declarations())
ffibuilder.set_source(
    "hpcc.squashfs._sqfs",
    '#include "hpcc_sqfs.h"\n',
    sources=[_path(os.path.join(CSRC, s)) for s in SOURCES],
    depends=[_path(HEADER)],
    include_dirs=[_path(CSRC)],
    extra_compile_args=_cflags + CFLAGS,
    extra_link_args=_libs,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
