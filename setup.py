"""Build glue: the cffi extensions for libsquashfs and libmunge, the runtime's C extension for Linux
system calls, and the packaged copies of etc/ files.

Everything declarative lives in pyproject.toml; setup.py only exists because cffi's
`cffi_modules` hook, the extension and the copy of the config schema into the package need
code.
"""
import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_py import build_py as _build_py

ETC_FILES = ("hpcc.schema.json", "hpcc.toml")


class build_py(_build_py):
    """Ship etc/hpcc.toml and its schema inside the package (hpcc/data/)."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        dst = os.path.join(self.build_lib, "hpcc", "data")
        os.makedirs(dst, exist_ok=True)
        for name in ETC_FILES:
            shutil.copy(os.path.join(here, "etc", name), os.path.join(dst, name))


setup(
    cffi_modules=["hpcc/squashfs/build_ffi.py:ffibuilder",
                  "gateway/munge_build.py:ffibuilder"],
    ext_modules=[Extension("hpcc.runtime._linux", ["hpcc/runtime/_linux.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra"])],
    cmdclass={"build_py": build_py},
)
