"""spank_hpcc.so as a shared object: builds warning-free, exports the SPANK entry points,
and never registers Slurm's own `container` option (Slurm would disable it with an error)."""
import subprocess
from pathlib import Path

import pytest

SPANK = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    out = tmp_path_factory.mktemp("spank") / "spank_hpcc.so"
    p = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                        "-o", str(out), str(SPANK / "spank_hpcc.c")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


def test_exports_the_spank_entry_points(plugin):
    syms = subprocess.run(["nm", "-D", "--defined-only", str(plugin)], capture_output=True,
                          text=True, check=True).stdout.split()
    for name in ("plugin_name", "plugin_type", "plugin_version", "slurm_spank_init",
                 "slurm_spank_init_post_opt", "slurm_spank_local_user_init",
                 "slurm_spank_user_init", "slurm_spank_task_init_privileged",
                 "slurm_spank_task_init", "slurm_spank_exit"):
        assert name in syms, name


def test_option_names_do_not_collide_with_slurms_container(plugin):
    data = plugin.read_bytes()
    names = {s.decode() for s in data.split(b"\0") if s.startswith(b"container")}
    assert "container" not in names
    assert {"container-image", "container-mounts", "container-workdir", "container-env",
            "container-writable", "container-mpi", "container-gpus"} <= names
