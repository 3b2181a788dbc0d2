"""The MPI hook with real MPICH: host library injected, 2-rank exchange, refusals.

Containers are set up by tests/hooks_harness.sh (a test harness doing what the launcher
contract says: private mount namespace, squashfs loop mount, overlay with a tmpfs upper, OCI
state on the hook's stdin, chroot). The end-to-end tests through `hpcc run --mpi` live in
test_hooks_e2e.py.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tool
from tests.hooks_images import HOST_MPICH, build_images

pytestmark = pytest.mark.root

HARNESS = str(Path(__file__).resolve().parent / "hooks_harness.sh")
MPI_ANN = json.dumps({"org.hpcc.mpi": "1"})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return build_images(tmp_path_factory.mktemp("hook-images"))


@pytest.fixture
def hook_env(tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text("[mpi]\nlibraries = []\n")
    return {"HPCC_CONFIG": str(cfg)}


def harness(image, hooks, *cmd, ann=MPI_ANN, env=None, mpiexec=0, timeout=120):
    full = [HARNESS, str(image), hooks, ann, "--", *cmd]
    if mpiexec:
        full = ["mpiexec", "-n", str(mpiexec), *full]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=e)


def hook(name="mpi", *args):
    return " ".join([tool("hpcc-hook"), name, *args])


def plan_of(image, env, ann=MPI_ANN):
    p = harness(image, hook("mpi", "--dry-run"), "/bin/true", ann=ann, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def mapped_files(stdout, rank):
    """{(dev, ino)} of the libmpi* files mapped by `rank` (from pingpong --maps)."""
    out = set()
    for line in stdout.splitlines():
        m = re.match(rf"maps {rank} \S+ \S+ \S+ ([0-9a-f]+):([0-9a-f]+) (\d+)\s+(\S+)", line)
        if m:
            dev = os.makedev(int(m.group(1), 16), int(m.group(2), 16))
            out.add((dev, int(m.group(3)), m.group(4)))
    return out


def host_id(path):
    st = os.stat(os.path.realpath(path))
    return st.st_dev, st.st_ino


def test_mpi_two_ranks_exchange_with_the_hosts_library_mapped(images, hook_env):
    p = harness(images["mpich"], hook("mpi"), "/app/pingpong", "--maps", "50", "65536",
                env=hook_env, mpiexec=2)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout
    want = host_id(HOST_MPICH)
    for rank in (0, 1):
        maps = mapped_files(p.stdout, rank)
        assert maps, p.stdout
        # the path is the container's own, but the file mapped is the host's (device + inode)
        assert {(d, i) for d, i, _ in maps} == {want}, (maps, want)


def test_mpi_without_the_hook_the_containers_own_mpich_runs(images, hook_env):
    """Control for the test above: the image's MPICH works alone and is a different file."""
    p = harness(images["mpich"], "", "/app/pingpong", "--maps", "20", "1024", env=hook_env,
                mpiexec=2)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout
    maps = mapped_files(p.stdout, 0)
    assert maps and host_id(HOST_MPICH) not in {(d, i) for d, i, _ in maps}


def test_mpi_program_linked_against_the_abi_name_libmpi_so_12(images, hook_env):
    p = harness(images["mpich"], hook("mpi"), "/app/pingpong-abi", "--maps", "20", "4096",
                env=hook_env, mpiexec=2)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout
    assert {(d, i) for d, i, _ in mapped_files(p.stdout, 1)} == {host_id(HOST_MPICH)}


def test_mpi_compatible_container_dependencies_are_kept(images, hook_env):
    plan = plan_of(images["mpich"], hook_env)
    binds = [a for a in plan["actions"] if a["op"] == "bind"]
    assert [os.path.realpath(a["src"]) for a in binds] == [os.path.realpath(HOST_MPICH)]
    assert binds[0]["dst"] == "/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.2"
    assert any("kept" in n and "libucp.so.0" in n for n in plan["notes"])


def test_mpi_image_without_mpi_gets_the_host_library_closure_and_ucx_modules(images, hook_env):
    plan = plan_of(images["nompi"], hook_env)
    srcs = {os.path.basename(os.path.realpath(a["src"]))
            for a in plan["actions"] if a["op"] == "bind"}
    for lib in ("libmpich.so.12.2.2", "libucp.so.0.0.0", "libucs.so.0.0.0", "libuct.so.0.0.0",
                "libhwloc.so.15.6.1", "libnuma.so.1.0.0"):
        assert lib in srcs, srcs
    assert "ucx" in srcs                                   # run-time loaded transports
    assert not any(s.startswith(("libc.so", "libm.so", "ld-linux")) for s in srcs)  # glibc stays
    links = {a["dst"]: a["target"] for a in plan["actions"] if a["op"] == "symlink"}
    assert links["/usr/lib/x86_64-linux-gnu/libmpi.so.12"].endswith("libmpich.so.12.2.2")
    p = harness(images["nompi"], hook("mpi"), "/app/pingpong-abi", "--maps", "20", "65536",
                env=hook_env, mpiexec=2)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout
    assert {(d, i) for d, i, _ in mapped_files(p.stdout, 0)} == {host_id(HOST_MPICH)}


def test_mpi_open_mpi_image_is_refused_with_the_reason(images, hook_env):
    if "openmpi" not in images:
        pytest.skip("Debian's libopenmpi3 is not installed (apt-get install libopenmpi3)")
    p = harness(images["openmpi"], hook("mpi"), "/bin/true", env=hook_env)
    assert p.returncode == 125
    line = [x for x in p.stderr.splitlines() if x.startswith("hpcc-hook mpi:")]
    assert len(line) == 1, p.stderr
    assert "--mpi requested but the container has Open MPI (libmpi.so.40" in line[0]
    assert "run without --mpi" in line[0]
    assert "Traceback" not in p.stderr


def test_mpi_container_built_with_a_newer_mpich_abi_is_refused(images, hook_env):
    p = harness(images["newabi"], hook("mpi"), "/bin/true", env=hook_env)
    assert p.returncode == 125
    assert "libmpich.so.12.9.0, ABI 12.9) is newer than the host's (libmpich.so.12.2.2, ABI 12.2)" \
        in p.stderr
    assert "Traceback" not in p.stderr


def test_mpi_injected_library_is_read_only_inside_the_container(images, hook_env):
    lib = "/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.2"
    before = os.stat(os.path.realpath(HOST_MPICH))
    p = harness(images["mpich"], hook("mpi"), "/bin/sh", "-c",
                f"echo x >> {lib} && echo WROTE; grep -c ' {lib} ' /proc/self/mountinfo; "
                f"grep ' {lib} ' /proc/self/mountinfo", env=hook_env)
    assert "WROTE" not in p.stdout, p.stdout
    assert "Read-only file system" in p.stderr
    assert " ro," in p.stdout and "nosuid" in p.stdout and "nodev" in p.stdout
    after = os.stat(os.path.realpath(HOST_MPICH))
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_mpi_extra_files_and_devices_from_the_site_config(images, tmp_path):
    extra = tmp_path / "fabric.conf"
    extra.write_text("provider=test\n")
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[mpi]\nextra_files = ["{extra}"]\ndevices = ["/dev/full", '
                   '"/dev/no-such-hca"]\n')
    env = {"HPCC_CONFIG": str(cfg)}
    plan = plan_of(images["mpich"], env)
    assert {"op": "bind", "src": str(extra), "dst": str(extra), "device": False,
            "why": "mpi.extra_files"} in plan["actions"]
    assert any(a["dst"] == "/dev/full" and a["device"] for a in plan["actions"])
    assert any("/dev/no-such-hca does not exist" in n for n in plan["notes"])
    p = harness(images["mpich"], hook("mpi"), "/bin/cat", str(extra), env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "provider=test\n"


def test_mpi_configured_library_that_is_not_mpich_abi_is_a_config_error(images, tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text('[mpi]\nlibraries = ["/usr/lib/x86_64-linux-gnu/libnuma.so.1"]\n')
    p = harness(images["mpich"], hook("mpi"), "/bin/true", env={"HPCC_CONFIG": str(cfg)})
    assert p.returncode == 125
    assert ("mpi.libraries: /usr/lib/x86_64-linux-gnu/libnuma.so.1 has soname libnuma.so.1, "
            "which is not an MPICH-ABI library") in p.stderr


def test_mpi_hook_started_by_a_third_party_runtime_joins_the_container_namespace(
        images, hook_env, tmp_path):
    """crun/runc run createRuntime hooks in the runtime's mount namespace with the container's
    pid in the state: the hook must join that namespace and bind there, not on the host."""
    script = tmp_path / "outer.sh"
    # The "container" is a process in its own mount namespace that mounts the image and
    # waits; the hook is started from the host namespace with that process's pid.
    script.write_text(f"""set -e
w={tmp_path}/c; mkdir -p $w/lower $w/up $w/root $w/bundle
unshare --mount --propagation private -- sh -c '
  mount -t squashfs -o loop,ro {images["mpich"]} {tmp_path}/c/lower
  mount -t tmpfs tmpfs {tmp_path}/c/up; mkdir {tmp_path}/c/up/u {tmp_path}/c/up/w
  mount -t overlay overlay \\
    -o lowerdir={tmp_path}/c/lower,upperdir={tmp_path}/c/up/u,workdir={tmp_path}/c/up/w \\
    {tmp_path}/c/root
  echo ready > {tmp_path}/c/ready; exec sleep 60' &
pid=$!
for i in $(seq 100); do [ -e $w/ready ] && break; sleep 0.05; done
config='{{"ociVersion":"1.0.2","root":{{"path":"../root"}},"process":{{"env":[]}}}}'
echo "$config" > $w/bundle/config.json
state='{{"ociVersion":"1.0.2","id":"x","status":"created","pid":'$pid',"bundle":"'$w/bundle'",'
state=$state'"annotations":{{"org.hpcc.mpi":"1"}}}}'
echo "$state" | {tool("hpcc-hook")} mpi
# what the container sees vs what the host sees at the same path
nsenter -t $pid -m stat -L -c '%d %i' $w/root/usr/lib/x86_64-linux-gnu/libmpich.so.12
echo host; grep -c "$w/root" /proc/self/mountinfo || true
kill $pid
""")
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **hook_env})
    assert p.returncode == 0, p.stderr
    first, _, rest = p.stdout.partition("host")
    dev, ino = map(int, first.split())
    assert (dev, ino) == host_id(HOST_MPICH)
    assert rest.split() == ["0"]          # nothing was mounted in the host's namespace
