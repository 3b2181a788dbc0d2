"""ELF facts for the hooks: the reader is the runtime's (hpcc.runtime.elf.ElfInfo, one for
both, with its (class, machine) check); here the glibc sonames and the host's library
directories.
"""
import platform

from hpcc.runtime.elf import ElfInfo, elf_header  # noqa: F401 (the one ELF reader)

GLIBC_SONAMES = frozenset({
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2",
    "libutil.so.1", "libanl.so.1", "libmvec.so.1", "libBrokenLocale.so.1", "libnss_files.so.2",
    "libnss_dns.so.2", "libthread_db.so.1", "libc_malloc_debug.so.0",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld64.so.2", "ld-linux.so.2", "ld64.so.1",
})


def is_glibc(soname):
    return soname in GLIBC_SONAMES


def multiarch_triplet():
    m = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
            "ppc64le": "powerpc64le-linux-gnu"}.get(m, f"{m}-linux-gnu")


def default_lib_dirs():
    t = multiarch_triplet()
    return [f"/lib/{t}", f"/usr/lib/{t}", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]
