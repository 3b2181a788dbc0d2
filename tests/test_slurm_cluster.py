"""The embedded Slurm cluster itself, and the plugin's options as users see them."""
import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]


def test_single_node_cluster_runs_steps_as_the_user(slurm_cluster):
    p = slurm_cluster.run("srun", "-n2", "id", "-un", user="slurmuser1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["slurmuser1", "slurmuser1"]


def test_two_node_cluster_has_two_hosts(slurm_cluster2):
    p = slurm_cluster2.run("srun", "-N2", "-n4", "-l", "hostname", user="slurmuser1")
    assert p.returncode == 0, p.stderr
    hosts = {line.split(": ", 1)[1] for line in p.stdout.splitlines()}
    assert hosts == {"n1", "n2"}


def test_srun_help_lists_the_plugin_options_but_not_container(slurm_cluster):
    p = slurm_cluster.run("srun", "--help", user="slurmuser1")
    out = p.stdout + p.stderr
    for name in ("--container-image", "--container-mounts", "--container-workdir",
                 "--container-env", "--container-writable", "--container-mpi",
                 "--container-gpus"):
        assert name in out
    assert "Ignoring conflicting option" not in out
    # sbatch knows them too (allocator context)
    p = slurm_cluster.run("sbatch", "--help", user="slurmuser1")
    assert "--container-mounts" in p.stdout + p.stderr


def test_cluster_stop_leaves_no_processes(slurm_site):
    import tempfile

    from hpcc.testkit.slurmcluster import SlurmCluster

    c = SlurmCluster(tempfile.mkdtemp(dir=slurm_site.root), nodes=1,
                     plugstack_lines=[slurm_site.plugstack_line()])
    c.start()
    pids = [p.pid for p in c.procs.values()]
    assert c.run("srun", "true").returncode == 0
    c.stop()
    import os
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert c.stepd_pids() == []
