"""The NVIDIA hook's logic on a prepared host tree (runs everywhere, no GPU needed).

The prepared tree is test data, not a mock of hpcc's logic: real ELF shared objects built
here with the driver's file and soname conventions (libcuda.so.<version> with soname
libcuda.so.1 and a working cuDriverGetVersion), procfs-shaped GPU information files, and
placeholder device files. Tests with a real GPU are in test_hooks_gpu.py.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcc.errors import HookError
from hpcc.hooks import nvidia
from hpcc.hooks.oci import Container
from hpcc.hooks.root import Root
from tests.conftest import tool

VER = "535.104.05"
LIB = "usr/lib/x86_64-linux-gnu"

# (bus, minor, uuid): PCI order differs from minor order on purpose.
GPUS = [("0000:1b:00.0", 2, "GPU-aaaaaaaa-0000-0000-0000-000000000002"),
        ("0000:3b:00.0", 0, "GPU-bbbbbbbb-0000-0000-0000-000000000000"),
        ("0000:5e:00.0", 1, "GPU-cccccccc-0000-0000-0000-000000000001"),
        ("0000:86:00.0", 3, "GPU-dddddddd-0000-0000-0000-000000000003")]


def build_so(path, soname, src="int hpcc_test_symbol(void) { return 1; }\n", defines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    c = path.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", *defines, "-o", str(path),
                    str(c)],
                   check=True)
    c.unlink()


def make_driver_tree(base, *, cuda=12020, version=VER, libdir=LIB):
    """A host tree with a driver's user-space files, GPU procfs info and device files."""
    base = Path(base)
    lib = base / libdir
    build_so(lib / f"libcuda.so.{version}", "libcuda.so.1",
             "int cuDriverGetVersion(int *v) { *v = CUDA_VERSION_VALUE; return 0; }\n",
             [f"-DCUDA_VERSION_VALUE={cuda}"])
    for name, soname in (("libnvidia-ml", "libnvidia-ml.so.1"),
                         ("libnvidia-ptxjitcompiler", "libnvidia-ptxjitcompiler.so.1"),
                         ("libnvidia-nvvm", "libnvidia-nvvm.so.4"),
                         ("libnvidia-brandnew", "libnvidia-brandnew.so.1"),   # one no list knows
                         ("libGLX_nvidia", "libGLX_nvidia.so.0")):            # graphics
        build_so(lib / f"{name}.so.{version}", soname)
    (lib / "libcuda.so.1").symlink_to(f"libcuda.so.{version}")
    build_so(lib / "libz.so.1.2.13", "libz.so.1")                       # not the driver's
    (base / "usr/bin").mkdir(parents=True)
    for b in ("nvidia-smi", "nvidia-debugdump"):
        (base / "usr/bin" / b).write_text("#!/bin/sh\necho fake\n")
        (base / "usr/bin" / b).chmod(0o755)
    (base / "dev").mkdir()
    for d in (("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
              + tuple(f"nvidia{m}" for _, m, _ in GPUS)):
        (base / "dev" / d).write_text("")
    for bus, minor, uuid in GPUS:
        d = base / "proc/driver/nvidia/gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            f"Model: \t\t NVIDIA Test GPU\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nBus Type: \t "
            f"PCIe\nBus Location: \t {bus}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n")
    (base / "proc/driver/nvidia/version").write_text(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Tue Aug 22 2023\n")
    return base


@pytest.fixture
def host_tree(tmp_path):
    return make_driver_tree(tmp_path / "host")


@pytest.fixture
def croot(tmp_path):
    """A container root with a glibc where the dynamic linker expects it."""
    c = tmp_path / "c"
    (c / LIB).mkdir(parents=True)
    (c / "lib").symlink_to("usr/lib")
    shutil.copy2("/lib/x86_64-linux-gnu/libc.so.6", c / LIB / "libc.so.6")
    (c / "etc").mkdir()
    return c


def container(croot, annotations=None, env=()):
    config = {"root": {"path": str(croot)}, "process": {"env": list(env)},
              "annotations": {}}
    return Container({"annotations": annotations or {}}, config, "/nonexistent", str(croot))


def plan(croot, host_tree, annotations, env=(), config=None, henv=None):
    return nvidia.plan_nvidia(container(croot, annotations, env), Root(str(croot)),
                              config or {"gpu": {}}, sysroot=str(host_tree), henv=henv or {})


# -- discovery ---------------------------------------------------------------------------------

def test_nvidia_driver_libraries_found_by_version_suffix_including_new_ones(host_tree):
    d = nvidia.find_driver({"gpu": {}}, sysroot=str(host_tree))
    assert d.version == VER
    assert sorted((s, r) for _, s, r in d.libraries) == [
        ("libGLX_nvidia.so.0", f"libGLX_nvidia.so.{VER}"),
        ("libcuda.so.1", f"libcuda.so.{VER}"),
        ("libnvidia-brandnew.so.1", f"libnvidia-brandnew.so.{VER}"),
        ("libnvidia-ml.so.1", f"libnvidia-ml.so.{VER}"),
        ("libnvidia-nvvm.so.4", f"libnvidia-nvvm.so.{VER}"),
        ("libnvidia-ptxjitcompiler.so.1", f"libnvidia-ptxjitcompiler.so.{VER}")]
    assert d.cuda == (12, 2)          # from the library's own cuDriverGetVersion
    assert [os.path.basename(b) for b in d.binaries] == ["nvidia-smi", "nvidia-debugdump"]


def test_nvidia_configured_library_path_is_searched(tmp_path):
    host = make_driver_tree(tmp_path / "h", libdir="opt/nvidia/driver/lib")
    assert nvidia.find_driver({"gpu": {}}, sysroot=str(host)) is None
    d = nvidia.find_driver({"gpu": {"library_paths": ["/opt/nvidia/driver/lib"]}},
                           sysroot=str(host))
    assert d.version == VER and len(d.libraries) == 6


def test_nvidia_gpus_numbered_in_pci_order_with_their_device_minors(host_tree):
    gpus = nvidia.host_gpus(str(host_tree))
    assert [(g.index, g.minor, g.bus) for g in gpus] == [
        (0, 2, "0000:1b:00.0"), (1, 0, "0000:3b:00.0"), (2, 1, "0000:5e:00.0"),
        (3, 3, "0000:86:00.0")]


def test_nvidia_gpus_from_device_nodes_when_procfs_has_none(tmp_path):
    (tmp_path / "dev").mkdir()
    for n in ("nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / n).write_text("")
    assert [(g.index, g.minor) for g in nvidia.host_gpus(str(tmp_path))] == [(0, 0), (1, 1)]


# -- selection ---------------------------------------------------------------------------------

def sel(host_tree, ann, cenv=None, henv=None, allowed=()):
    r = nvidia.select_gpus(ann, cenv or {}, henv or {}, nvidia.host_gpus(str(host_tree)), allowed)
    return r if r == "void" else [g.index for g in r]


def test_nvidia_select_all_list_and_uuid(host_tree):
    assert sel(host_tree, "all") == [0, 1, 2, 3]
    assert sel(host_tree, "2,0") == [2, 0]
    assert sel(host_tree, "GPU-dddddddd-0000-0000-0000-000000000003") == [3]
    assert sel(host_tree, "none") == []


def test_nvidia_visible_devices_of_the_image_narrow_all_and_apply_without_gpus_flag(host_tree):
    assert sel(host_tree, "all", {"NVIDIA_VISIBLE_DEVICES": "1"}) == [1]
    assert sel(host_tree, "all", {"NVIDIA_VISIBLE_DEVICES": "all"}) == [0, 1, 2, 3]
    assert sel(host_tree, "0", {"NVIDIA_VISIBLE_DEVICES": "1"}) == [0]   # explicit --gpus wins
    assert sel(host_tree, None, {"NVIDIA_VISIBLE_DEVICES": "3"}) == [3]
    assert sel(host_tree, None, {"NVIDIA_VISIBLE_DEVICES": "void"}) == "void"
    assert sel(host_tree, None, {}) == "void"


def test_nvidia_slurm_allocation_limits_the_selection(host_tree):
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert sel(host_tree, "all", henv=step) == [1, 3]
    assert sel(host_tree, "3", cenv=step) == [3]
    with pytest.raises(HookError, match=r"GPU 2 \(--gpus\) is not allocated to this Slurm job "
                                        r"\(SLURM_STEP_GPUS=1,3\)"):
        sel(host_tree, "2", henv=step)
    assert sel(host_tree, "all", henv={"SLURM_JOB_ID": "8", "CUDA_VISIBLE_DEVICES": "2"}) == [2]
    # CUDA_VISIBLE_DEVICES outside Slurm is CUDA's business, not an allocation
    assert sel(host_tree, "all", henv={"CUDA_VISIBLE_DEVICES": "2"}) == [0, 1, 2, 3]


def test_nvidia_site_allowed_devices_and_bad_requests(host_tree):
    assert sel(host_tree, "1", allowed=["1", "GPU-cccccccc-0000-0000-0000-000000000001"]) == [1]
    assert sel(host_tree, "2", allowed=["1", "GPU-cccccccc-0000-0000-0000-000000000001"]) == [2]
    with pytest.raises(HookError, match="GPU 3 is not in gpu.allowed_devices"):
        sel(host_tree, "3", allowed=["1"])
    with pytest.raises(HookError,
                       match=r"GPU 7 \(--gpus\) does not exist on this node \(GPUs: 0, 1, 2, 3\)"):
        sel(host_tree, "7")
    with pytest.raises(HookError, match="bad GPU selection 'first'"):
        sel(host_tree, "first")


# -- NVIDIA_REQUIRE_* --------------------------------------------------------------------------

REQ_122 = ("cuda>=12.2 brand=tesla,driver>=470,driver<471 brand=unknown,driver>=470,driver<471 "
           "brand=nvidia,driver>=525,driver<526")


def drv(cuda=(12, 2), version=VER):
    return nvidia.Driver(version, "/x/libcuda.so.1", [], [], cuda)


def test_nvidia_require_cuda_met_and_refused_with_a_clear_message():
    nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": REQ_122}, drv((12, 2)))
    nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": REQ_122}, drv((12, 4)))
    with pytest.raises(HookError) as e:
        nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": REQ_122.replace("12.2", "12.4")},
                                  drv((12, 2)))
    msg = str(e.value)
    assert msg.startswith("the image requires CUDA >= 12.4 (NVIDIA_REQUIRE_CUDA=cuda>=12.4 "
                          "brand=tesla")
    assert f"the host's driver {VER} supports CUDA 12.2 at most" in msg


def test_nvidia_require_alternatives_driver_ranges_and_unknown_brand():
    # forward-compatible branch: an old datacenter driver in the listed range satisfies it
    nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda>=12.4 driver>=535,driver<536"},
                              drv((12, 2)))
    # a brand-only alternative cannot be met without knowing the brand (needs NVML/GPU)
    with pytest.raises(HookError):
        nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda>=13.0 brand=tesla"}, drv((12, 2)))
    # several NVIDIA_REQUIRE_* variables must all hold
    with pytest.raises(HookError, match="NVIDIA_REQUIRE_DRIVER=driver>=550"):
        nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda>=12.0",
                                   "NVIDIA_REQUIRE_DRIVER": "driver>=550"}, drv((12, 2)))
    nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda>=99.0", "NVIDIA_DISABLE_REQUIRE": "1"},
                              drv((12, 2)))
    with pytest.raises(HookError, match="bad NVIDIA_REQUIRE constraint 'cuda~12'"):
        nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda~12"}, drv())
    with pytest.raises(HookError, match="driver's CUDA version could not be read"):
        nvidia.check_requirements({"NVIDIA_REQUIRE_CUDA": "cuda>=11.0"}, drv(None))


# -- the whole plan ------------------------------------------------------------------------------

def test_nvidia_plan_injects_driver_files_and_only_the_selected_gpus(croot, host_tree):
    p = plan(croot, host_tree, {"org.hpcc.gpu": "1,2"}, env=[f"NVIDIA_REQUIRE_CUDA={REQ_122}"])
    binds = {a["dst"]: a for a in p.actions if a["op"] == "bind"}
    links = {a["dst"]: a["target"] for a in p.actions if a["op"] == "symlink"}
    h = str(host_tree)
    # GPU index 1 is /dev/nvidia0 and index 2 is /dev/nvidia1 (PCI order vs minors)
    assert {d for d, a in binds.items() if a["device"]} == {
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0",
        "/dev/nvidia1"}
    assert binds["/dev/nvidia0"]["src"] == f"{h}/dev/nvidia0"
    assert binds[f"/{LIB}/libcuda.so.{VER}"]["src"] == f"{h}/{LIB}/libcuda.so.{VER}"
    assert links[f"/{LIB}/libcuda.so.1"] == f"libcuda.so.{VER}"
    assert links[f"/{LIB}/libnvidia-nvvm.so.4"] == f"libnvidia-nvvm.so.{VER}"
    assert links[f"/{LIB}/libcuda.so"] == "libcuda.so.1"
    assert f"/{LIB}/libz.so.1.2.13" not in binds
    assert binds["/usr/bin/nvidia-smi"]["src"] == f"{h}/usr/bin/nvidia-smi"
    assert any("driver 535.104.05, CUDA 12.2; GPUs 1,2" in n for n in p.notes)


def test_nvidia_driver_capabilities_select_library_families(croot, host_tree):
    def libs(env=()):
        p = plan(croot, host_tree, {"org.hpcc.gpu": "0"}, env=env)
        return {os.path.basename(a["src"]).split(".so")[0] for a in p.actions
                if a["op"] == "bind" and ".so." in a["src"]}
    default = libs()
    assert {"libcuda", "libnvidia-ml", "libnvidia-brandnew"} <= default   # unknown: always in
    assert "libGLX_nvidia" not in default
    assert "libGLX_nvidia" in libs(["NVIDIA_DRIVER_CAPABILITIES=all"])
    only_util = libs(["NVIDIA_DRIVER_CAPABILITIES=utility"])
    assert "libnvidia-ml" in only_util and "libcuda" not in only_util
    p = plan(croot, host_tree, {"org.hpcc.gpu": "0"}, env=["NVIDIA_DRIVER_CAPABILITIES=utility"])
    assert not any(a["op"] == "symlink" and a["dst"].endswith("/libcuda.so") for a in p.actions)


def test_nvidia_other_gpus_proc_entries_are_masked(croot, host_tree):
    shutil.copytree(host_tree / "proc", croot / "proc")     # the container's /proc, mounted
    p = plan(croot, host_tree, {"org.hpcc.gpu": "0"})
    masks = sorted(a["dst"] for a in p.actions if a["op"] == "mask")
    assert masks == [f"/proc/driver/nvidia/gpus/{bus}" for bus, _, _ in GPUS[1:]]


def test_nvidia_container_copy_of_a_driver_library_is_covered(croot, host_tree):
    """A CUDA 'compat' libcuda baked into the image must not shadow the host driver's."""
    (croot / LIB / "libcuda.so.1").write_text("stale")
    p = plan(croot, host_tree, {"org.hpcc.gpu": "all"})
    binds = {a["dst"]: a["src"] for a in p.actions if a["op"] == "bind"}
    assert binds[f"/{LIB}/libcuda.so.1"].endswith(f"libcuda.so.{VER}")


def test_nvidia_no_gpu_requested_injects_nothing(croot, host_tree):
    p = plan(croot, host_tree, {})
    assert p.actions == []


def test_nvidia_refuses_when_the_node_has_no_driver(croot, tmp_path):
    with pytest.raises(HookError, match="GPUs requested but this node has no NVIDIA driver: "
                                        "libcuda.so.1"):
        plan(croot, tmp_path, {"org.hpcc.gpu": "all"})


def test_nvidia_cli_on_this_gpu_less_machine_says_why_in_one_line(croot, tmp_path):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA GPU")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"root": {"path": str(croot)}, "process": {"env": []}}))
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text("[gpu]\nlibrary_paths = []\n")
    state = json.dumps({"ociVersion": "1.0.2", "id": "t", "status": "creating", "pid": os.getpid(),
                        "bundle": str(bundle), "annotations": {"org.hpcc.gpu": "all"}})
    p = subprocess.run([tool("hpcc-hook"), "nvidia"], input=state, capture_output=True, text=True,
                       env={**os.environ, "HPCC_CONFIG": str(cfg)})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "hpcc-hook nvidia: GPUs requested but this node has no NVIDIA driver"), p.stderr


@pytest.mark.root
def test_nvidia_prepared_driver_is_loadable_inside_the_container(tmp_path, host_tree):
    """Apply the plan for real (private mount namespace) and dlopen libcuda.so.1 inside."""
    from tests.hooks_images import base_tree
    c = base_tree(tmp_path / "croot")
    shutil.copytree(host_tree / "proc/driver", c / "proc/driver")
    src = tmp_path / "cudaver.c"
    src.write_text('#include <dlfcn.h>\n#include <stdio.h>\n'
                   'int main(void){void *h=dlopen("libcuda.so.1",RTLD_NOW);'
                   'if(!h){printf("dlopen failed: %s\\n",dlerror());return 1;}'
                   'int (*f)(int*)=(int(*)(int*))dlsym(h,"cuDriverGetVersion");int v=0;f(&v);'
                   'printf("cuda driver version %d\\n",v);return 0;}\n')
    subprocess.run(["gcc", "-o", str(c / "app/cudaver"), str(src)], check=True)
    subprocess.run(["ldconfig", "-r", str(c)], check=True)
    script = f"""
import json, subprocess, sys
from hpcc.hooks import nvidia
from hpcc.hooks.oci import Container
from hpcc.hooks.root import Root
cont = Container({{"annotations": {{"org.hpcc.gpu": "3"}}}},
                        {{"root": {{"path": "{c}"}}, "process": {{"env": []}}}}, "/x", "{c}")
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "{c}/dev"], check=True)
# the writable layer as hpcc names it in config.json: the root and its /dev tmpfs
root = Root("{c}", [__import__("os").stat(p).st_dev for p in ("{c}", "{c}/dev")])
p = nvidia.plan_nvidia(cont, root, {{"gpu": {{}}}}, sysroot="{host_tree}", henv={{}})
p.apply(root)
out = subprocess.run(["chroot", "{c}", "/app/cudaver"], capture_output=True, text=True)
print(out.stdout, out.stderr)
print(sorted(__import__("os").listdir("{c}/dev")))
print(open("{c}/usr/bin/nvidia-smi").read().strip())
import os
print("gpus", sorted((b, os.listdir("{c}/proc/driver/nvidia/gpus/" + b))
                     for b in os.listdir("{c}/proc/driver/nvidia/gpus")))
"""
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys_python(), "-c",
                        script],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "cuda driver version 12020" in p.stdout
    assert "['nvidia-uvm', 'nvidia-uvm-tools', 'nvidia3', 'nvidiactl']" in p.stdout
    assert "echo fake" in p.stdout
    # GPU 3 is 0000:86:00.0; the others' entries are hidden
    assert ("gpus [('0000:1b:00.0', []), ('0000:3b:00.0', []), ('0000:5e:00.0', []), "
            "('0000:86:00.0', ['information'])]") in p.stdout
    # nothing was left in the container tree outside the namespace: binds were private
    assert not (c / "dev" / "nvidia3").exists()
    assert (c / "usr/bin/nvidia-smi").read_text() == ""   # the empty bind target in the tree


def sys_python():
    import sys
    return sys.executable
