"""Test images for the hook tests, built from real files of this machine.

Every image is a directory tree packed with mksquashfs (merged-/usr Debian layout):
busybox-static, the glibc and libraries copied from the host, programs compiled here with
Debian's `mpicc`, and, depending on the image, a container-side MPI:

- "mpich":   a container MPICH: libmpich.so.12 (a debug-stripped copy, i.e. a different file
             from the host's) with its dependency closure and UCX modules, plus the ABI-name
             link libmpi.so.12 -> libmpich.so.12.2.2. /app/pingpong records libmpich.so.12
             (what mpicc on Debian produces); /app/pingpong-abi records libmpi.so.12.
- "nompi":   glibc only and /app/pingpong-abi: no MPI at all in the image.
- "openmpi": the real Open MPI 4.1 library of Debian's libopenmpi3 (libmpi.so.40) + closure.
- "newabi":  like "mpich", but the container's library file is named libmpich.so.12.9.0
             (the same code under the real-name of a newer ABI revision: test data standing
             for an image built with a newer MPICH than the host's).

How /app/pingpong-abi gets `NEEDED libmpi.so.12`: Debian has no libmpi.so.12, so the program
is linked with mpicc (NEEDED libmpich.so.12) and that string is then rewritten in place in
.dynstr to "libmpi.so.12" (shorter, NUL-padded) -- the same edit `patchelf --replace-needed`
makes, done here without adding patchelf to the dependencies.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

from hpcc.testkit.busybox import install_busybox

REPO = Path(__file__).resolve().parent.parent
LIBDIR = "/usr/lib/x86_64-linux-gnu"
HOST_MPICH = Path(LIBDIR) / "libmpich.so.12"


def ldd(path):
    """Host paths of the shared-library closure of `path` (as the host's linker loads it)."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=> (/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def _copy_lib(tree, host_path, *, strip=False, realname=None):
    """Copy a host library into tree's LIBDIR as its real file plus the soname link."""
    host_path = Path(host_path)
    real = host_path.resolve()
    dst_dir = tree / LIBDIR.lstrip("/")
    dst_dir.mkdir(parents=True, exist_ok=True)
    rn = realname or real.name
    dst = dst_dir / rn
    if not dst.exists():
        if strip:
            subprocess.run(["objcopy", "--strip-debug", str(real), str(dst)], check=True)
        else:
            shutil.copy2(real, dst)
    for link in {host_path.name, real.name} - {rn}:
        lp = dst_dir / link
        if not lp.exists() and not lp.is_symlink():
            lp.symlink_to(rn)
    return dst


def base_tree(tree):
    tree = Path(tree)
    for d in ("bin", "usr/bin", "usr/lib64", "etc", "proc", "sys", "dev", "tmp", "app",
              LIBDIR.lstrip("/")):
        (tree / d).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "tmp", 0o1777)
    for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "bin")):
        if not (tree / link).is_symlink():
            (tree / link).symlink_to(target)
    install_busybox(tree, ("sh", "cat", "ls", "grep", "echo", "readlink", "stat", "true", "env",
                           "id"))
    # glibc and the interpreter at its ELF path
    for lib in ldd("/bin/ls") + ["/usr/lib/x86_64-linux-gnu/libm.so.6"]:
        _copy_lib(tree, lib)
    (tree / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (tree / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (tree / "etc/ld.so.conf.d").mkdir(exist_ok=True)
    (tree / "etc/ld.so.conf.d/x86_64-linux-gnu.conf").write_text(f"{LIBDIR}\n")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    return tree


def finish(tree, out):
    """ld.so.cache for the tree (what a distribution image has), then the squashfs."""
    subprocess.run(["ldconfig", "-r", str(tree)], check=True)
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-all-root", "-quiet",
                    "-noI", "-noD", "-noF", "-noX"], check=True, stdout=subprocess.DEVNULL)
    return out


def build_programs(work):
    """pingpong (NEEDED libmpich.so.12) and pingpong-abi (NEEDED libmpi.so.12)."""
    work = Path(work)
    src = REPO / "bench" / "pingpong.c"
    pp = work / "pingpong"
    subprocess.run(["mpicc", "-O2", "-o", str(pp), str(src)], check=True)
    data = pp.read_bytes()
    old, new = b"\0libmpich.so.12\0", b"\0libmpi.so.12\0\0\0"
    assert data.count(old) == 1, "expected one libmpich.so.12 string in the program"
    abi = work / "pingpong-abi"
    abi.write_bytes(data.replace(old, new))
    abi.chmod(0o755)
    out = subprocess.run(["readelf", "-d", str(abi)], capture_output=True, text=True,
                         check=True).stdout
    assert "[libmpi.so.12]" in out and "libmpich" not in out
    return pp, abi


def container_mpich(tree, *, realname=None):
    """Copy a complete container-side MPICH (stripped libmpich + closure + UCX modules)."""
    dst = _copy_lib(tree, HOST_MPICH, strip=True, realname=realname)
    libdir = tree / LIBDIR.lstrip("/")
    (libdir / "libmpi.so.12").symlink_to(dst.name)
    for lib in ldd(HOST_MPICH):
        _copy_lib(tree, lib)
    ucx = Path(LIBDIR) / "ucx"
    (libdir / "ucx").mkdir(exist_ok=True)
    for f in ucx.glob("*.so.0"):
        _copy_lib_to(f, libdir / "ucx")
        for lib in ldd(f):
            _copy_lib(tree, lib)


def _copy_lib_to(host_path, dst_dir):
    real = Path(host_path).resolve()
    shutil.copy2(real, dst_dir / real.name)
    if Path(host_path).name != real.name:
        (dst_dir / Path(host_path).name).symlink_to(real.name)


def build_images(work):
    """Build all test images under `work`; returns {name: path of .sqfs}."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    pp, abi = build_programs(work)
    images = {}

    t = base_tree(work / "t-mpich")
    shutil.copy2(pp, t / "app/pingpong")
    shutil.copy2(abi, t / "app/pingpong-abi")
    container_mpich(t)
    images["mpich"] = finish(t, work / "mpich.sqfs")

    t = base_tree(work / "t-nompi")
    shutil.copy2(abi, t / "app/pingpong-abi")
    images["nompi"] = finish(t, work / "nompi.sqfs")

    t = base_tree(work / "t-newabi")
    shutil.copy2(pp, t / "app/pingpong")
    container_mpich(t, realname="libmpich.so.12.9.0")
    images["newabi"] = finish(t, work / "newabi.sqfs")

    ompi = Path(LIBDIR) / "libmpi.so.40"
    if ompi.exists():
        t = base_tree(work / "t-openmpi")
        _copy_lib(t, ompi)
        for lib in ldd(ompi):
            _copy_lib(t, lib)
        images["openmpi"] = finish(t, work / "openmpi.sqfs")
    for d in work.glob("t-*"):
        shutil.rmtree(d)
    return images
