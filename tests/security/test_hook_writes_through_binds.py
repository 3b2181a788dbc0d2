"""Rule W (docs/launcher.md, "What root does"): hpcc and its hooks, as root, create, replace or
remove entries inside a container only on the container's own writable layer (the overlay's
tmpfs upper, tmpfs mounts hpcc made), never in a host directory bound into it.

The attack (issue 10, §1): a user binds a root-owned directory they cannot write over the
container's library directory and asks for the MPI hook, which runs as root under Slurm and
used to plant its libraries, symlinks and a ucx/ directory there, and to delete a dangling
symlink it found there."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

U1 = "slurmuser1"
LIBDIR = "/usr/lib/x86_64-linux-gnu"


def _listing(d):
    out = {}
    for dirpath, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, d)] = (st.st_mode, st.st_uid, st.st_size, st.st_ino)
    return out


@pytest.fixture
def root_libdir():
    """A root-owned 0755 copy of the host's library directory (hard links: same files),
    plus a dangling symlink, in a directory the job user can reach but not write."""
    # hard links need the copy on the library directory's filesystem: /tmp is often a
    # tmpfs of its own (then /var/tmp usually is on the root filesystem); else a real copy
    dev = os.stat(LIBDIR).st_dev
    near = [t for t in (tempfile.gettempdir(), "/var/tmp") if os.stat(t).st_dev == dev]
    base = Path(tempfile.mkdtemp(prefix="hpcc-rootlibs-", dir=(near or [None])[0]))
    os.chmod(base, 0o755)
    d = base / "lib"
    subprocess.run(["cp", "-al" if near else "-a", LIBDIR, str(d)], check=True)
    os.chmod(d, 0o755)
    os.unlink(d / "libucp.so.0.0.0")
    os.symlink("/nonexistent", d / "libucp.so.0.0.0")
    yield d
    shutil.rmtree(base)


@pytest.mark.slurm
def test_mpi_hook_never_writes_into_a_bound_host_directory(slurm_cluster2, slurm_mpi_images,
                                                           root_libdir):
    """Rule W under srun as an unprivileged user: the hook covers the bound directory with an
    overlay whose upper layer is a tmpfs of the container's own, so the step runs with the
    host's MPI placed there, and the bound host directory is unchanged (no new entry, the
    dangling symlink still there)."""
    before = _listing(root_libdir)
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N1", "-n1", "--container=hpcctest/nompi:1",
                           "--container-mpi", f"--container-mounts={root_libdir}:{LIBDIR}",
                           "sh", "-c", f"ls {LIBDIR}/libmpi.so.12 && touch {LIBDIR}/x",
                           user=U1, timeout=120)
    after = _listing(root_libdir)
    assert after == before, (sorted(set(after) ^ set(before)), p.stderr)
    assert os.readlink(root_libdir / "libucp.so.0.0.0") == "/nonexistent"
    # the hook's files are visible in the container; the user still cannot write there
    assert f"{LIBDIR}/libmpi.so.12" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert p.returncode != 0 and ("Read-only" in p.stderr or "denied" in p.stderr), p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def launch_mpi(tmp_path_factory):
    """`hpcc run` with the shipped MPI hook config and the MPI-less test image."""
    from tests.fixtures.launcher_images import hook_test_site
    d = tempfile.mkdtemp(prefix="hpcc-sec-mpi-")
    os.chmod(d, 0o755)
    images, cfg = hook_test_site(Path(d), ("mpi.json",))
    yield images["nompi"], cfg
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("who", ["root", "user"])
def test_mpi_hook_under_hpcc_run_never_writes_into_a_bound_host_directory(launch_mpi,
                                                                         root_libdir,
                                                                         test_user, who):
    """Rule W with `hpcc run --mpi`: as root (the hook is root) and as an unprivileged user
    (the hook runs in the user's namespaces): the step runs, the bound directory is
    unchanged."""
    from tests.fixtures.launcher_images import run_hpcc
    image, cfg = launch_mpi
    before = _listing(root_libdir)
    p = run_hpcc(["run", "--mpi", "--mount", f"{root_libdir}:{LIBDIR}", image, "--", "sh",
                  "-c", f"ls {LIBDIR}/libmpi.so.12"],
                 user=None if who == "root" else test_user.pw_name, config=cfg)
    assert _listing(root_libdir) == before, p.stderr
    assert os.readlink(root_libdir / "libucp.so.0.0.0") == "/nonexistent"
    assert "Traceback" not in p.stderr
    # the hook placed the host's MPI on a tmpfs overlay over the bound directory
    assert p.returncode == 0 and f"{LIBDIR}/libmpi.so.12" in p.stdout, (p.returncode, p.stderr)
