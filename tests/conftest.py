"""Root test configuration.

The tests run against the *installed* package (make test installs it into the venv whose
python runs pytest), so the console scripts sit next to sys.executable. Fixtures that start
real services live in tests/fixtures/*.py and are loaded as plugins below.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

# The tests import the *installed* hpcc: the checkout's hpcc/ lacks the subpackages that
# pyproject.toml maps from other directories (hpcc.gateway <- gateway/, hpcc.hooks <- hooks/)
# and the compiled extensions. `pytest`, `python -P -m pytest` (`make test`) and pytest's
# --import-mode=append (pyproject.toml) leave the checkout last on sys.path. These two lines
# must stay for `python -m pytest` (how the project's guides run single test files): Python
# itself puts the current directory first, before pytest reads any option, and without them
# collection fails with "No module named 'hpcc.runtime._linux'" (the checkout's hpcc/ wins).
# They move that entry to the end, where `tests.*` still resolves.
if sys.path and Path(sys.path[0] or ".").resolve() == REPO:
    sys.path.append(sys.path.pop(0))

pytest_plugins = [
    "tests.fixtures.registry",
    "tests.fixtures.users",
    "tests.fixtures.launcher_images",
    "tests.fixtures.mount_helper",
    "tests.fixtures.slurm",
    "tests.fixtures.gateway_service",
]


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (kernel mounts, useradd, services)")
        for item in items:
            if "root" in item.keywords or "slurm" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _fuse_device_mode():
    """This machine's /dev/fuse is 0600; a normal distribution's udev makes it 0666."""
    if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)


def tool(name):
    """Path of one of hpcc's console scripts in the venv that runs the tests."""
    return str(BIN / name)


@pytest.fixture
def run_cli():
    """Run a console script; return CompletedProcess with text stdout/stderr."""

    def _run(name, *args, env=None, input=None, timeout=300, check=False, user=None):
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        cmd = [tool(name), *map(str, args)]
        # another user starts in /: the checkout (the cwd) may be below root's 0700 home
        p = subprocess.run(cmd, env=full_env, input=input, capture_output=True, text=True,
                           timeout=timeout, user=user, cwd="/" if user is not None else None)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    return _run
