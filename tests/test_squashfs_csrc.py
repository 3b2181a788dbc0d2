"""The libsquashfs glue's C (hpcc/squashfs/csrc/): warning-free under the flags the build
uses, and the interface cffi is given is the header's, so Python sees every function."""
import re
import shutil
import subprocess
import sysconfig

import pytest

from tests.conftest import REPO

CSRC = REPO / "hpcc" / "squashfs" / "csrc"


def _pkg_cflags():
    for name in ("libsquashfs1", "libsquashfs"):
        p = subprocess.run(["pkg-config", "--cflags", name], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout.split()
    return []


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.c")))
def test_c_source_compiles_without_warnings(source):
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-c", "-o", "/dev/null",
           *_pkg_cflags(), f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}",
           str(CSRC / source)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_function_of_the_header_interface_is_callable_from_python():
    from hpcc.squashfs._sqfs import lib

    header = (CSRC / "hpcc_sqfs.h").read_text()
    interface = re.search(r"CFFI-CDEF-BEGIN \*/(.*?)/\* CFFI-CDEF-END", header, re.S).group(1)
    names = re.findall(r"\b(hpcc_\w+)\(", interface)
    assert len(names) >= 20, names
    missing = [n for n in names if not callable(getattr(lib, n, None))]
    assert not missing, missing
    assert "#" not in interface    # cffi's cdef takes no preprocessor lines
