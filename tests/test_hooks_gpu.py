"""The NVIDIA hook on a real GPU: `hpcc run --gpus` with nvidia-smi and a CUDA driver-API
program inside. Skipped (with the reason) where the machine has no NVIDIA GPU and driver;
tests/gpu/run.sh runs them on a GPU machine. The GPU-less logic is in test_hooks_nvidia.py.
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, tool
from tests.fixtures.launcher_images import run_hpcc
from tests.hooks_images import base_tree

pytestmark = [pytest.mark.gpu, pytest.mark.root]

HAVE_GPU = os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi") is not None
if not HAVE_GPU:
    pytestmark.append(pytest.mark.skip(
        reason="no NVIDIA GPU on this machine (/dev/nvidiactl or nvidia-smi missing); "
               "run tests/gpu/run.sh on a GPU machine"))

PROBE = r"""
#include <dlfcn.h>
#include <stdio.h>
/* CUDA driver API, declared here: the image has no CUDA toolkit, only what the hook injects */
typedef int (*init_t)(unsigned);
typedef int (*count_t)(int *);
typedef int (*ver_t)(int *);
typedef int (*get_t)(int *, int);
typedef int (*name_t)(char *, int, int);
int main(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) { printf("no libcuda: %s\n", dlerror()); return 3; }
    int v = 0, n = -1, dev = 0;
    ((ver_t)dlsym(h, "cuDriverGetVersion"))(&v);
    int rc = ((init_t)dlsym(h, "cuInit"))(0);
    printf("driver cuda %d init %d\n", v, rc);
    if (rc != 0) return 4;
    ((count_t)dlsym(h, "cuDeviceGetCount"))(&n);
    printf("devices %d\n", n);
    for (int i = 0; i < n; i++) {
        char name[256] = "";
        ((get_t)dlsym(h, "cuDeviceGet"))(&dev, i);
        ((name_t)dlsym(h, "cuDeviceGetName"))(name, sizeof name, dev);
        printf("device %d %s\n", i, name);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def gpu_env():
    d = Path(tempfile.mkdtemp(prefix="hpcc-gpu-"))
    os.chmod(d, 0o755)
    t = base_tree(d / "tree")
    (d / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-O2", "-o", str(t / "app/cudaprobe"), str(d / "probe.c")], check=True)
    subprocess.run(["ldconfig", "-r", str(t)], check=True)
    images = {}
    for name, env in (("plain", []), ("toonew", ["NVIDIA_REQUIRE_CUDA=cuda>=99.0"])):
        out = d / f"{name}.sqfs"
        subprocess.run(["mksquashfs", str(t), str(out), "-noappend", "-all-root", "-quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        (d / f"{name}.json").write_text(
            json.dumps({"config": {"Env": ["PATH=/usr/bin:/bin", *env]}}))
        os.chmod(out, 0o644)
        images[name] = str(out)
    hooks = d / "hooks.d"
    hooks.mkdir(mode=0o755)
    cfg = d / "hpcc.toml"
    cfg.write_text(f'[launcher]\nhooks_dir = "{hooks}"\nbinds = []\nmount_home = false\nmount_cwd '
                   '= false\n')
    h = json.loads((REPO / "etc/hooks.d/nvidia.json").read_text())
    h["hook"]["path"] = tool("hpcc-hook")
    h["hook"]["env"] = [f"HPCC_CONFIG={cfg}"]
    (hooks / "nvidia.json").write_text(json.dumps(h))
    yield {"images": images, "config": str(cfg)}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["root", "user"])
def who(request, test_user):
    return None if request.param == "root" else test_user.pw_name


def host_gpu_count():
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.startswith("GPU ")])


def test_gpu_nvidia_smi_inside_sees_the_selected_gpus(gpu_env, who):
    n = host_gpu_count()
    p = run_hpcc(["run", "--gpus", "all", gpu_env["images"]["plain"], "--", "nvidia-smi", "-L"],
                 user=who, config=gpu_env["config"])
    assert p.returncode == 0, p.stderr
    assert len([x for x in p.stdout.splitlines() if x.startswith("GPU ")]) == n
    p = run_hpcc(["run", "--gpus", "0", gpu_env["images"]["plain"], "--", "ls", "/dev"],
                 user=who, config=gpu_env["config"])
    devs = [x for x in p.stdout.split() if x.startswith("nvidia") and x[6:].isdigit()]
    assert len(devs) == 1, p.stdout


def test_gpu_driver_api_program_runs_with_gpus_and_not_without(gpu_env, who):
    p = run_hpcc(["run", "--gpus", "all", gpu_env["images"]["plain"], "--", "/app/cudaprobe"],
                 user=who, config=gpu_env["config"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "init 0" in p.stdout and f"devices {host_gpu_count()}" in p.stdout
    p = run_hpcc(["run", gpu_env["images"]["plain"], "--", "/app/cudaprobe"],
                 user=who, config=gpu_env["config"])
    assert p.returncode == 3 and "no libcuda" in p.stdout


def test_gpu_image_requiring_a_newer_cuda_is_refused(gpu_env, who):
    p = run_hpcc(["run", "--gpus", "all", gpu_env["images"]["toonew"], "--", "/app/cudaprobe"],
                 user=who, config=gpu_env["config"])
    assert p.returncode == 125
    assert "the image requires CUDA >= 99.0" in p.stderr and "supports CUDA" in p.stderr
