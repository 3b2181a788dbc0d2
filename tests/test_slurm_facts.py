"""hpcc.slurm: job and node facts from the running cluster through squeue/sinfo --json."""
import os
import time

import pytest

from hpcc.errors import SlurmError
from hpcc.slurm import jobs as slurm

pytestmark = [pytest.mark.root, pytest.mark.slurm]


def _env(cluster):
    env = cluster.env
    env["HPCC_SLURM_BACKEND"] = "json"
    return env


def test_backend_is_json_without_a_matching_pyslurm(slurm_cluster):
    env = slurm_cluster.env
    env.pop("HPCC_SLURM_BACKEND", None)
    # No pyslurm build for 22.05 exists on the package registries (see docs/slurm.md).
    assert slurm.backend(env) == "json"
    assert slurm.slurm_version(env).startswith("22.05")


def test_nodes_reports_every_node_idle(slurm_cluster2):
    nodes = {n.name: n for n in slurm.nodes(env=_env(slurm_cluster2))}
    assert set(nodes) == {"n1", "n2"}
    assert nodes["n2"].address == "127.0.1.2"
    assert nodes["n1"].cpus == 8
    assert all(n.state == "idle" for n in nodes.values())


def test_pending_jobs_and_their_images(slurm_cluster):
    env = _env(slurm_cluster)
    ids = []
    for image in ("hpcctest/prefetch-a:1", "hpcctest/prefetch-a:1", "hpcctest/prefetch-b:2",
                  "/path/to/bundle"):
        p = slurm_cluster.run("sbatch", "--hold", "--parsable", f"--container={image}",
                              "--wrap", "true", user="slurmuser1")
        assert p.returncode == 0, p.stderr
        ids.append(int(p.stdout.strip().split(";")[0]))
    p = slurm_cluster.run("sbatch", "--hold", "--parsable", "--wrap", "true",
                          user="slurmuser2")
    ids.append(int(p.stdout.strip()))
    # the SPANK option is not in the job record: it is read from the batch script
    p = slurm_cluster.run("sbatch", "--hold", "--parsable", user="slurmuser2",
                          input="#!/bin/sh\n#SBATCH --container-image=hpcctest/prefetch-c:3\n"
                                "true\n#SBATCH --container-image=hpcctest/not-a-directive:1\n")
    assert p.returncode == 0, p.stderr
    ids.append(int(p.stdout.strip().split(";")[0]))
    try:
        pending = {j.job_id: j for j in slurm.jobs(states={"PENDING"}, env=env)}
        assert set(ids) <= set(pending)
        assert pending[ids[0]].user == "slurmuser1"
        assert pending[ids[0]].container == "hpcctest/prefetch-a:1"
        assert pending[ids[0]].reason == "JobHeldUser"
        assert pending[ids[4]].container == ""
        assert slurm.pending_job_images(env=env) == ["hpcctest/prefetch-a:1",
                                                     "hpcctest/prefetch-b:2",
                                                     "hpcctest/prefetch-c:3"]
    finally:
        slurm_cluster.run("scancel", *ids)


@pytest.mark.parametrize("script, image", [
    ("#!/bin/bash\n#SBATCH -N1\n#SBATCH --container-image=repo/img:1\nsrun hostname\n",
     "repo/img:1"),
    ("#!/bin/sh\n\n# a comment\n#SBATCH --time=5 --container-image reg:5000/a/b@sha256:"
     + "0" * 64 + "\n", "reg:5000/a/b@sha256:" + "0" * 64),
    ('#SBATCH --container-image="quoted/img:2" # trailing comment\n', "quoted/img:2"),
    ("#!/bin/sh\n#SBATCH --container-image=first:1\n#SBATCH --container-image=last:2\n",
     "last:2"),
    ("#!/bin/sh\necho hi\n#SBATCH --container-image=after/a-command:1\n", None),
    ("#!/bin/sh\n# SBATCH --container-image=spaced/out:1\n#SBATCH --container=other\n", None),
    ("#!/bin/sh\n#SBATCH --container-image\n", None),
    ('#!/bin/sh\n#SBATCH --container-image="unterminated\n', None),
    ("", None),
])
def test_container_image_directive_of_a_batch_script(script, image):
    assert slurm.script_container_image(script) == image


def test_running_job_is_not_pending(slurm_cluster):
    env = _env(slurm_cluster)
    p = slurm_cluster.run("sbatch", "--parsable", "--wrap", "sleep 30", user="slurmuser1")
    jid = int(p.stdout.strip())
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = {j.job_id: j.state for j in slurm.jobs(env=env)}
            if states.get(jid) == "RUNNING":
                break
            time.sleep(0.2)
        assert states.get(jid) == "RUNNING"
        assert jid not in {j.job_id for j in slurm.jobs(states={"PENDING"}, env=env)}
    finally:
        slurm_cluster.run("scancel", jid)


def test_unreachable_controller_is_one_clear_error(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
                    "NodeName=x CPUs=1\nPartitionName=p Nodes=x\n")
    env = dict(os.environ, SLURM_CONF=str(conf), HPCC_SLURM_BACKEND="json")
    with pytest.raises(SlurmError) as e:
        slurm.jobs(env=env)
    assert "squeue --json" in str(e.value)
    assert "\n" not in str(e.value)
