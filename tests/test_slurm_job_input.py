"""Root takes nothing from the job it should not (issue 10, 4): Slurm's configuration only
from slurmd, long settings read whole, an empty --container refused. Each performed by an
unprivileged user on the real cluster."""
import os
import shutil
import subprocess

import pytest

from tests.test_slurm_sbatch import submit

pytestmark = [pytest.mark.root, pytest.mark.slurm]

IMG = "hpcctest/busybox:1"
U1 = "slurmuser1"


def test_root_takes_slurms_configuration_from_slurmd_not_the_job(slurm_cluster, slurm_users):
    # The job's SLURM_CONF names a file the user wrote. Root used to read it and bind the
    # directories it names (PluginDir, PlugStackConfig, the munge socket's, its own) into
    # the interactive/batch container as Slurm's own files, without the user's rights.
    # Here the file is a copy of the real one in the user's home: the container must still
    # get the real configuration's directory (slurmd's), not the one the job named.
    # `srun --interactive` is the step salloc starts with use_interactive_step.
    u = slurm_users[U1]
    real = slurm_cluster.env["SLURM_CONF"]
    fake_dir = os.path.join(u.pw_dir, f"fake-slurm-{os.getpid()}")
    os.makedirs(fake_dir, exist_ok=True)
    fake = os.path.join(fake_dir, "slurm.conf")
    shutil.copy(real, fake)
    shutil.copy(os.path.join(os.path.dirname(real), "plugstack.conf"), fake_dir)
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}", fake_dir], check=True)
    try:
        p = slurm_cluster.run("salloc", "-n1", "srun", "--interactive", "-n1",
                              f"--container={IMG}", "sh", "-c",
                              f"grep -c 'hpcc test image' /etc/os-release; "
                              f"test -f {real} && echo slurmd-conf-bound",
                              user=U1, env={"SLURM_CONF": fake})
    finally:
        shutil.rmtree(fake_dir, ignore_errors=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines[:1] == ["1"], p.stdout + p.stderr   # in the container
    assert "slurmd-conf-bound" in lines, p.stdout + p.stderr


def _long_names(n_bytes):
    names, size, i = [], 0, 0
    while size < n_bytes:
        name = f"PAD_{i:05d}"
        names.append(name)
        size += len(name) + 1
        i += 1
    return names


def test_container_env_longer_than_8191_bytes_is_read_whole(slurm_cluster):
    names = _long_names(9000) + ["SHARED_VAR"]
    value = ",".join(names)
    assert len(value) > 8191
    env = {"SHARED_VAR": "job-value"}
    # as an option
    p = slurm_cluster.run("srun", "-n2", f"--container={IMG}", f"--container-env={value}",
                          "sh", "-c", "echo $SHARED_VAR", user=U1, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["job-value", "job-value"], p.stderr[-2000:]
    # as HPCC_CONTAINER_ENV and as pyxis' PYXIS_CONTAINER_ENV
    for var in ("HPCC_CONTAINER_ENV", "PYXIS_CONTAINER_ENV"):
        p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "sh", "-c",
                              "echo $SHARED_VAR", user=U1, env=dict(env, **{var: value}))
        assert p.stdout.strip() == "job-value", (var, p.stderr[-2000:])


def test_long_container_mounts_variable_is_read_whole(slurm_cluster, slurm_site):
    d = slurm_site.root / "long-mnt"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    (d / "f.txt").write_text("found\n")
    # one real bind after 9 KB of the same bind repeated on one destination
    pad = ",".join([f"{d}:/pad"] * (9000 // (len(str(d)) + 6)))
    value = f"{pad},{d}:/last:ro"
    assert len(value) > 8191
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "cat", "/last/f.txt", user=U1,
                          env={"HPCC_CONTAINER_MOUNTS": value})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "found"


def test_empty_container_option_is_an_error_not_a_host_run(slurm_cluster):
    p = slurm_cluster.run("srun", "-n2", "--container=", "sh", "-c",
                          "echo RAN-$(grep -c 'hpcc test image' /etc/os-release)", user=U1)
    assert "RAN" not in p.stdout, p.stdout
    assert p.returncode == 125, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("hpcc: ")]
    assert len(lines) == 1, p.stderr
    assert "--container=" in lines[0] and "empty" in lines[0]


def test_empty_container_in_a_batch_script_fails_the_script(slurm_cluster, outdir):
    _, text = submit(slurm_cluster, "#!/bin/sh\n#SBATCH --container=\necho RAN\n",
                     outdir / "o.txt")
    assert "RAN" not in text, text
    assert "hpcc: --container= (SLURM_CONTAINER) is empty" in text, text
