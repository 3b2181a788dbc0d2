"""MPI under srun --mpi=pmi2 in hpcc containers: ranks reach slurmstepd's PMI server (PMI_FD
kept), and --container-mpi injects the host's MPICH through the MPI hook."""
import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"
HOST_LIBDIR = "/usr/lib/x86_64-linux-gnu/"


def test_pmi2_ranks_in_containers_on_two_nodes(slurm_cluster2, slurm_mpi_images):
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N2", "-n2", "--container=hpcctest/mpich:1",
                           "/app/pingpong", "20", "65536", user=U1, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout, p.stdout + p.stderr


def test_container_mpi_injects_the_host_mpich(slurm_cluster2, slurm_mpi_images):
    # The image has no MPI at all: only the hook can make this program start.
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N2", "-n2", "--container=hpcctest/nompi:1",
                           "--container-mpi", "pingpong-abi", "--maps", "20", "65536",
                           user=U1, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 2" in p.stdout, p.stdout + p.stderr
    maps = [ln for ln in p.stdout.splitlines() if ln.startswith("maps ")]
    assert maps and all("libmpich.so.12" in ln or "libmpi.so.12" in ln for ln in maps)


def test_without_container_mpi_the_mpi_less_image_cannot_run(slurm_cluster2, slurm_mpi_images):
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N1", "-n1", "--container=hpcctest/nompi:1",
                           "pingpong-abi", user=U1, timeout=60)
    assert p.returncode != 0
    assert "libmpi.so.12" in p.stderr


def test_hpcc_container_mpi_variable(slurm_cluster2, slurm_mpi_images):
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N2", "-n4", "--container=hpcctest/nompi:1",
                           "pingpong-abi", "5", "1024", user=U1, timeout=120,
                           env={"HPCC_CONTAINER_MPI": "1"})
    assert p.returncode == 0, p.stderr
    assert "pingpong ok ranks 4" in p.stdout


ALLREDUCE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('allreduce', c.Get_size(), c.allreduce(c.Get_rank() + 1), "
             "MPI.Get_library_version().split()[0])")


@pytest.mark.slow
def test_mpi4py_allreduce_on_two_nodes_with_the_host_mpich(slurm_cluster2, slurm_mpi4py_image):
    p = slurm_cluster2.run("srun", "--mpi=pmi2", "-N2", "-n4", "-l",
                           "--container=hpcctest/mpi4py:1", "--container-mpi",
                           "python3", "-c", ALLREDUCE, user=U1, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = sorted(p.stdout.splitlines())
    assert len(lines) == 4, p.stdout + p.stderr
    assert all(ln.split(": ", 1)[1] == "allreduce 4 10 MPICH" for ln in lines), lines
    hosts = slurm_cluster2.run("srun", "-N2", "-n4", "hostname", user=U1).stdout.split()
    assert set(hosts) == {"n1", "n2"}
