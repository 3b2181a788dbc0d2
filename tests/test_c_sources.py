"""Every C file of the product compiles warning-free with -Wall -Wextra (the flags its build
uses), so a warning is a test failure, not a line scrolling past in `make install`."""
import shutil
import subprocess
import sysconfig

import pytest

from tests.conftest import REPO

SKIP_DIRS = {"tests", "bench", "build", ".git"}
SOURCES = sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.c")
                 if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def _pkg_cflags(*names):
    for name in names:
        p = subprocess.run(["pkg-config", "--cflags", name], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout.split()
    return []


def test_the_product_has_c_sources():
    assert {"hpcc/runtime/_linux.c", "spank/spank_hpcc.c", "hpcc/squashfs/csrc/writer.c"} <= set(
        SOURCES), SOURCES


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")
@pytest.mark.parametrize("source", SOURCES)
def test_c_source_compiles_without_warnings(source):
    path = REPO / source
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-c", "-o", "/dev/null",
           *_pkg_cflags("libsquashfs1", "libsquashfs"), f"-I{path.parent}",
           f"-I{sysconfig.get_paths()['include']}", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
