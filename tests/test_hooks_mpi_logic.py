"""The MPI hook's decisions on container trees (no mounts, no root): glibc too old, container
libraries too old to keep, musl, the ABI names. The host side is this machine's real MPICH.

Container trees are plain directories. Where a test needs a library of a kind this machine
does not have (an older glibc, an older libhwloc), it builds a real ELF shared object with
gcc and a version script: test data with the same soname and symbol versions such a
library has, not a stand-in for hpcc's logic.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcc.errors import HookError
from hpcc.hooks import mpi
from hpcc.hooks.elf import ElfInfo
from hpcc.hooks.libraries import HostLibraries
from hpcc.hooks.oci import Container
from hpcc.hooks.root import Root

LIB = "usr/lib/x86_64-linux-gnu"


def build_so(path, soname, versions=(), symbols=("hpcc_test_symbol",)):
    """A shared object with `soname`, defining `symbols`, under version nodes `versions`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.with_suffix(".c")
    src.write_text("".join(f"int {s}(void) {{ return 0; }}\n" for s in symbols))
    args = ["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(path), str(src)]
    if versions:
        vs = path.with_suffix(".map")
        body = []
        for i, v in enumerate(versions):
            glob = f"global: {'; '.join(symbols)}; " if i == len(versions) - 1 else ""
            body.append(f"{v} {{ {glob}{'local: *; ' if i == len(versions) - 1 else ''}}};")
        vs.write_text("\n".join(body) + "\n")
        args.append(f"-Wl,--version-script={vs}")
    subprocess.run(args, check=True)
    src.unlink()


def glibc_tree(root, *, fake_libc_versions=None):
    """A container root with glibc (the host's, or a fake one with the given versions)."""
    lib = root / LIB
    lib.mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    if fake_libc_versions:
        build_so(lib / "libc.so.6", "libc.so.6", fake_libc_versions)
        build_so(lib / "libm.so.6", "libm.so.6", ["GLIBC_2.2.5"])
    else:
        for name in ("libc.so.6", "libm.so.6"):
            shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", lib / name)
    return root


def plan_for(root, config=None, args=(), env=()):
    c = Container({"annotations": {"org.hpcc.mpi": "1"}},
                         {"root": {"path": str(root)},
                          "process": {"args": list(args), "env": list(env), "cwd": "/"}},
                         "/x", str(root))
    return mpi.plan_mpi(c, Root(str(root)), config or {"mpi": {}})


FUTURE = """#include <mpi.h>
int MPI_Status_set_source(MPI_Status *status, int source);  /* MPI 4.1, not in MPICH 4.0 */
int main(int argc, char **argv)
{
    MPI_Status st;
    MPI_Init(&argc, &argv);
    MPI_Status_set_source(&st, 0);
    MPI_Finalize();
    return 0;
}
"""


def future_program(tmp_path, dst):
    """A program built against a newer MPICH-ABI library: linked (with mpicc) against a
    link-time library named libmpich.so.12 that has MPI 4.1's MPI_Status_set_source."""
    stub = tmp_path / "newer-mpi"
    build_so(stub / "libmpich.so", "libmpich.so.12",
             symbols=("MPI_Init", "MPI_Finalize", "MPI_Status_set_source"))
    src = tmp_path / "future.c"
    src.write_text(FUTURE)
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mpicc", "-o", str(dst), str(src), f"-L{stub}", f"-Wl,-rpath-link,{stub}"],
                   check=True)


def test_mpi_logic_container_glibc_older_than_the_host_mpi_needs_is_refused(tmp_path):
    # the version nodes of a glibc 2.31 (Debian 11, Ubuntu 20.04): the host's up to 2.31
    def vt(v):
        return tuple(int(x) for x in v[len("GLIBC_"):].split("."))
    host = ElfInfo.from_path("/lib/x86_64-linux-gnu/libc.so.6").verdef
    old = sorted((v for v in host if v.startswith("GLIBC_2") and vt(v) <= (2, 31)), key=vt)
    root = glibc_tree(tmp_path / "c", fake_libc_versions=old)
    with pytest.raises(HookError) as e:
        plan_for(root)
    assert str(e.value) == (
        "--mpi: the host's MPI needs glibc 2.34 (GLIBC_2.32, GLIBC_2.33, GLIBC_2.34 from "
        "libc.so.6) but the container has glibc 2.31; use an image with glibc >= 2.34, or run "
        "without --mpi")


def test_mpi_logic_older_container_library_is_covered_by_the_hosts(tmp_path):
    root = glibc_tree(tmp_path / "c")
    # a libhwloc.so.15 that lacks the functions the host's MPICH calls
    build_so(root / LIB / "libhwloc.so.15.0.0", "libhwloc.so.15")
    (root / LIB / "libhwloc.so.15").symlink_to("libhwloc.so.15.0.0")
    p = plan_for(root)
    binds = {a["dst"]: a["src"] for a in p.actions if a["op"] == "bind"}
    assert Path(binds[f"/{LIB}/libhwloc.so.15.0.0"]).resolve() == \
        Path("/lib/x86_64-linux-gnu/libhwloc.so.15").resolve()


def test_mpi_logic_same_library_in_the_container_is_kept(tmp_path):
    root = glibc_tree(tmp_path / "c")
    shutil.copy2(Path("/lib/x86_64-linux-gnu/libhwloc.so.15").resolve(),
                 root / LIB / "libhwloc.so.15")
    p = plan_for(root)
    assert not any(a["op"] == "bind" and "libhwloc" in a["dst"] for a in p.actions)
    assert any("kept: libhwloc.so.15" in n for n in p.notes)


def test_mpi_logic_musl_container_is_refused(tmp_path):
    root = tmp_path / "c"
    (root / "lib").mkdir(parents=True)
    (root / "lib/ld-musl-x86_64.so.1").write_text("")
    with pytest.raises(HookError, match="the container uses musl libc"):
        plan_for(root)


def test_mpi_logic_static_container_without_glibc_is_refused(tmp_path):
    root = tmp_path / "c"
    (root / "bin").mkdir(parents=True)
    with pytest.raises(HookError, match=r"the container has no glibc \(libc.so.6\)"):
        plan_for(root)


def test_mpi_logic_abi_name_only_container_gets_the_host_library_under_both_names(tmp_path):
    root = glibc_tree(tmp_path / "c")
    # an image built elsewhere: libmpi.so.12 (ABI name), e.g. Intel MPI's file name
    shutil.copy2(Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12").resolve(),
                 root / LIB / "libmpi.so.12.0.0")
    (root / LIB / "libmpi.so.12").symlink_to("libmpi.so.12.0.0")
    p = plan_for(root)
    binds = {a["dst"]: a["src"] for a in p.actions if a["op"] == "bind"}
    links = {a["dst"]: a["target"] for a in p.actions if a["op"] == "symlink"}
    assert f"/{LIB}/libmpi.so.12.0.0" in binds                      # covered at its own path
    assert links[f"/{LIB}/libmpich.so.12"] == f"/{LIB}/libmpi.so.12.0.0"
    assert any("container MPI 12.0.0 replaced by host MPI 12.2.2" in n for n in p.notes)


def test_mpi_logic_host_without_mpich_abi_library_says_what_to_do(tmp_path):
    root = glibc_tree(tmp_path / "c")
    host = glibc_tree(tmp_path / "host-without-mpi")        # a host tree with no MPI at all
    c = Container({}, {"root": {"path": str(root)}, "process": {"env": []}}, "/x", str(root))
    with pytest.raises(HookError, match="this host has no MPICH-ABI MPI library .* set "
                                        "mpi.libraries"):
        mpi.plan_mpi(c, Root(str(root)), {"mpi": {}},
                     hostlibs=HostLibraries(sysroot=str(host)))


def test_mpi_logic_configured_library_missing_on_this_node(tmp_path):
    root = glibc_tree(tmp_path / "c")
    with pytest.raises(HookError, match="mpi.libraries in hpcc.toml names /opt/mpi/libmpi.so.12, "
                                        "which does not exist on this node"):
        plan_for(root, {"mpi": {"libraries": ["/opt/mpi/libmpi.so.12"]}})


def test_mpi_logic_program_calling_a_function_the_host_mpi_lacks_is_refused(tmp_path):
    root = glibc_tree(tmp_path / "c")
    future_program(tmp_path, root / "app/future")
    with pytest.raises(HookError) as e:
        plan_for(root, args=["/app/future"])
    assert str(e.value).startswith(
        "--mpi: /app/future calls 1 MPI function(s) that the host's MPI (libmpich.so.12.2.2) lacks "
        "(MPI_Status_set_source): the host's MPI is older than the program needs")
    # found through the container's PATH as well
    with pytest.raises(HookError, match="/app/future calls 1 MPI function"):
        plan_for(root, args=["future"], env=["PATH=/usr/bin:/app"])


def test_mpi_logic_program_using_only_what_the_host_has_passes(tmp_path):
    root = glibc_tree(tmp_path / "c")
    src = tmp_path / "ok.c"
    src.write_text("#include <mpi.h>\nint main(int c, char **v) { MPI_Init(&c, &v); return "
                   "MPI_Finalize(); }\n")
    (root / "app").mkdir()
    subprocess.run(["mpicc", "-o", str(root / "app/ok"), str(src)], check=True)
    plan_for(root, args=["/app/ok"])
    plan_for(root, args=["/bin/sh"])          # not there / not MPI: nothing to check


def test_mpi_logic_abi_check_major_accepts_a_newer_revision_minor_refuses_it(tmp_path):
    root = glibc_tree(tmp_path / "c")
    shutil.copy2(Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12").resolve(),
                 root / LIB / "libmpich.so.12.5.0")      # a newer revision's file name
    (root / LIB / "libmpich.so.12").symlink_to("libmpich.so.12.5.0")
    with pytest.raises(HookError, match=r"ABI 12.5\) is newer than the host's "
                                        r"\(libmpich.so.12.2.2, ABI 12.2\)"):
        plan_for(root)
    p = plan_for(root, {"mpi": {"abi_check": "major"}})
    assert any(a["dst"] == f"/{LIB}/libmpich.so.12.5.0" for a in p.actions if a["op"] == "bind")


def test_mpi_logic_malformed_files_from_the_image_do_not_break_the_hook(tmp_path):
    root = glibc_tree(tmp_path / "c")
    real = Path("/lib/x86_64-linux-gnu/libhwloc.so.15").resolve().read_bytes()
    (root / LIB / "libhwloc.so.15").write_bytes(real[:3000])          # truncated ELF
    (root / LIB / "libucp.so.0").write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\xff" * 200)
    (root / "etc").mkdir()
    (root / "etc/ld.so.cache").write_bytes(b"glibc-ld.so.cache1.1" + b"\xff" * 500)
    p = plan_for(root)
    binds = {a["dst"] for a in p.actions if a["op"] == "bind"}
    assert {f"/{LIB}/libhwloc.so.15", f"/{LIB}/libucp.so.0"} <= binds   # covered by the host's
