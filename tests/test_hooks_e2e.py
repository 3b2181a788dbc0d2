"""End to end through the launcher: `hpcc run --mpi` / `--gpus` with the shipped hooks.d configs.

As root (kernel squashfs mount) and as the unprivileged test user (user namespace +
squashfuse_ll): the launcher selects the hook by annotation, runs `hpcc-hook` with the OCI
state on stdin, and the MPI program inside maps the host's MPICH. A 2-rank exchange runs
under hydra (`mpiexec -n 2 hpcc run --mpi IMG -- /app/pingpong`): PMI reaches the ranks
through the launcher (PMI_FD and friends).
"""
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, tool
from tests.fixtures.launcher_images import hook_test_site, run_hpcc
from tests.hooks_images import HOST_MPICH

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def e2e(request):
    """World-readable images and a root-owned config + hooks.d made from etc/hooks.d."""
    d = tempfile.mkdtemp(prefix="hpcc-hooks-e2e-")
    os.chmod(d, 0o755)
    images, cfg = hook_test_site(Path(d), ("mpi.json", "nvidia.json"))
    yield {"images": images, "config": cfg, "dir": d}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["root", "user"])
def who(request, test_user):
    return None if request.param == "root" else test_user.pw_name


def hpcc(e2e, args, who=None, **kw):
    return run_hpcc(args, user=who, config=e2e["config"], **kw)


def host_id():
    st = os.stat(os.path.realpath(HOST_MPICH))
    return st.st_dev, st.st_ino


def mapped(stdout, rank):
    out = set()
    for line in stdout.splitlines():
        m = re.match(rf"maps {rank} \S+ \S+ \S+ ([0-9a-f]+):([0-9a-f]+) (\d+)", line)
        if m:
            out.add((os.makedev(int(m.group(1), 16), int(m.group(2), 16)), int(m.group(3))))
    return out


def test_e2e_shipped_hook_configs_select_on_the_annotations():
    from hpcc.runtime.ocihooks import load_hooks, select_hooks
    hooks = load_hooks(str(REPO / "etc/hooks.d"), privileged=False)
    assert select_hooks(hooks, {"annotations": {}}) == {}
    mpi = select_hooks(hooks, {"annotations": {"org.hpcc.mpi": "1"}})
    assert [h["args"] for h in mpi["createRuntime"]] == [["hpcc-hook", "mpi"]]
    gpu = select_hooks(hooks, {"annotations": {"org.hpcc.gpu": "0,1", "org.hpcc.mpi": "1"}})
    assert [h["args"] for h in gpu["createRuntime"]] == [["hpcc-hook", "mpi"],
                                                         ["hpcc-hook", "nvidia"]]


def test_e2e_run_mpi_maps_the_hosts_library(e2e, who):
    p = hpcc(e2e, ["run", "--mpi", e2e["images"]["mpich"], "--", "/app/pingpong", "--maps"], who)
    # one rank: the program says it needs two, after MPI_Init with the host's library
    assert "pingpong needs 2 ranks" in p.stderr, p.stderr
    assert mapped(p.stdout, 0) == {host_id()}


def test_e2e_run_without_mpi_keeps_the_containers_mpich(e2e):
    p = hpcc(e2e, ["run", e2e["images"]["mpich"], "--", "/app/pingpong", "--maps"])
    assert "pingpong needs 2 ranks" in p.stderr, p.stderr
    maps = mapped(p.stdout, 0)
    assert maps and host_id() not in maps


def test_e2e_two_ranks_under_mpiexec_exchange_messages_with_the_host_mpi(e2e, who):
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = e2e["config"]
    kw = {}
    if who:
        import pwd
        ent = pwd.getpwnam(who)
        env.update(HOME=ent.pw_dir, USER=who, LOGNAME=who)
        kw = {"user": who, "group": ent.pw_gid, "extra_groups": []}
    p = subprocess.run(["mpiexec", "-n", "2", tool("hpcc"), "run", "--mpi", e2e["images"]["nompi"],
                        "--", "/app/pingpong-abi", "--maps", "50", "65536"],
                       env=env, cwd="/", capture_output=True, text=True, timeout=120, **kw)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout
    assert mapped(p.stdout, 0) == {host_id()} and mapped(p.stdout, 1) == {host_id()}


def test_e2e_run_mpi_refuses_an_open_mpi_image_in_one_line(e2e, who):
    if "openmpi" not in e2e["images"]:
        pytest.skip("Debian's libopenmpi3 is not installed (apt-get install libopenmpi3)")
    p = hpcc(e2e, ["run", "--mpi", e2e["images"]["openmpi"], "--", "/bin/true"], who)
    assert p.returncode == 125
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "--mpi requested but the container has Open MPI (libmpi.so.40" in lines[0]


def test_e2e_run_gpus_on_a_node_without_gpus_says_so(e2e, who):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA GPU (see test_hooks_gpu.py)")
    p = hpcc(e2e, ["run", "--gpus", "all", e2e["images"]["nompi"], "--", "/bin/true"], who)
    assert p.returncode == 125
    assert "GPUs requested but this node has no NVIDIA driver" in p.stderr


def test_e2e_unprivileged_launch_gets_ucx_shared_memory_settings(e2e, who):
    p = hpcc(e2e, ["run", "--mpi", e2e["images"]["mpich"], "--", "/bin/cat", "/etc/ucx/ucx.conf"],
             who)
    if who is None:   # privileged: ranks share the initial user namespace, UCX defaults work
        assert p.returncode == 1 and "No such file" in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert "UCX_POSIX_USE_PROC_LINK=n" in p.stdout and "UCX_TLS=^cma" in p.stdout
