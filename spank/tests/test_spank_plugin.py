"""spank_hpcc.so as a shared object: builds warning-free, exports the SPANK entry points,
and never registers Slurm's own `container` option (Slurm would disable it with an error)."""
import shutil
import subprocess
from pathlib import Path

import pytest

SPANK = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin as spank/Makefile builds it (all its parts, one shared object), with warnings
    made errors, in a copy so the checkout's build is left alone."""
    src = tmp_path_factory.mktemp("spank")
    for f in [SPANK / "Makefile", *SPANK.glob("*.c"), *SPANK.glob("*.h")]:
        shutil.copy(f, src / f.name)
    p = subprocess.run(["make", "-s", "-C", str(src), "CFLAGS=-O2 -Wall -Wextra -Werror"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return src / "spank_hpcc.so"


def test_exports_the_spank_entry_points(plugin):
    syms = subprocess.run(["nm", "-D", "--defined-only", str(plugin)], capture_output=True,
                          text=True, check=True).stdout.split()
    for name in ("plugin_name", "plugin_type", "plugin_version", "slurm_spank_init",
                 "slurm_spank_init_post_opt", "slurm_spank_local_user_init",
                 "slurm_spank_user_init", "slurm_spank_task_init_privileged",
                 "slurm_spank_task_init", "slurm_spank_exit"):
        assert name in syms, name


def test_exports_nothing_but_the_entry_points(plugin):
    """The parts share functions and state among themselves (-fvisibility=hidden): none of it is
    a symbol slurmd, srun or another plugin could bind to."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(plugin)], capture_output=True,
                         text=True, check=True).stdout
    syms = {line.split()[-1] for line in out.splitlines() if line.strip()}
    ident = {"plugin_name", "plugin_type", "plugin_version", "spank_plugin_version"}
    extra = {s for s in syms - ident if not s.startswith("slurm_spank_")}
    assert not extra, extra
    assert ident <= syms


def test_option_names_do_not_collide_with_slurms_container(plugin):
    data = plugin.read_bytes()
    names = {s.decode() for s in data.split(b"\0") if s.startswith(b"container")}
    assert "container" not in names
    assert {"container-image", "container-mounts", "container-workdir", "container-env",
            "container-writable", "container-mpi", "container-gpus"} <= names
