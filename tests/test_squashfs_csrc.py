"""The libsquashfs glue's C (hpcc/squashfs/csrc/): the interface cffi is given is the
header's, so Python sees every function. (Compiler warnings: tests/test_c_sources.py.)"""
import re

from tests.conftest import REPO

CSRC = REPO / "hpcc" / "squashfs" / "csrc"


def test_every_function_of_the_header_interface_is_callable_from_python():
    from hpcc.squashfs._sqfs import lib

    header = (CSRC / "hpcc_sqfs.h").read_text()
    interface = re.search(r"CFFI-CDEF-BEGIN \*/(.*?)/\* CFFI-CDEF-END", header, re.S).group(1)
    names = re.findall(r"\b(hpcc_\w+)\(", interface)
    assert len(names) >= 20, names
    missing = [n for n in names if not callable(getattr(lib, n, None))]
    assert not missing, missing
    assert "#" not in interface    # cffi's cdef takes no preprocessor lines
