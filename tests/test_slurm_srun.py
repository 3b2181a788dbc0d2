"""srun steps in hpcc containers through spank_hpcc.so, on a real Slurm cluster."""
import os

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

IMG = "hpcctest/busybox:1"
U1 = "slurmuser1"


def test_srun_container_runs_every_task_in_the_image(slurm_cluster):
    p = slurm_cluster.run("srun", "-n4", f"--container={IMG}", "cat", "/etc/os-release",
                          user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('NAME="hpcc test image"') == 4


def test_srun_container_tasks_run_as_the_user_without_privileges(slurm_cluster, slurm_users):
    u = slurm_users[U1]
    p = slurm_cluster.run("srun", "-n2", f"--container={IMG}", "sh", "-c",
                          "id -u; id -g; grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd):' "
                          "/proc/self/status", user=U1)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines.count(str(u.pw_uid)) == 2 and lines.count(str(u.pw_gid)) == 2
    assert p.stdout.count("NoNewPrivs:\t1") == 2
    assert p.stdout.count("CapEff:\t0000000000000000") == 2
    assert p.stdout.count("CapPrm:\t0000000000000000") == 2


def test_plain_srun_is_not_containerized(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "cat", "/etc/os-release", user=U1)
    assert p.returncode == 0
    assert "hpcc test image" not in p.stdout


def test_container_image_option_is_the_same_as_container(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "cat", "/etc/os-release",
                          user=U1)
    assert p.returncode == 0, p.stderr
    assert 'NAME="hpcc test image"' in p.stdout


def test_hpcc_container_image_variable(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "cat", "/etc/os-release", user=U1,
                          env={"HPCC_CONTAINER_IMAGE": "hpcctest/other:1"})
    assert p.returncode == 0, p.stderr
    assert 'NAME="hpcc other image"' in p.stdout


def test_working_directory_is_the_images_unless_container_workdir(slurm_cluster):
    # as pyxis: the image's WorkingDir (/work here), not the job's directory
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "pwd", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "/work"
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-workdir=/etc",
                          "pwd", user=U1)
    assert p.stdout.strip() == "/etc", p.stderr
    # relative: from the container's /, and '..' cannot climb above it (as pyxis)
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-workdir=etc",
                          "pwd", user=U1)
    assert p.stdout.strip() == "/etc", p.stderr
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-workdir=../",
                          "pwd", user=U1)
    assert p.stdout.strip() == "/", p.stderr


def test_command_is_looked_up_inside_the_container(slurm_cluster):
    # /bin/busybox exists only in the image; 'ash' only through the image's PATH.
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "ash", "-c",
                          "readlink /proc/self/exe", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "/bin/busybox"


def test_environment_precedence(slurm_cluster):
    env = {"SHARED_VAR": "job-value", "JOB_ONLY": "job", "KEEP_ME": "job-keep",
           "PATH": "/job/bin:/usr/bin:/bin"}
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "/bin/sh", "-c",
                          "echo $SHARED_VAR $JOB_ONLY $IMAGE_ONLY $PATH $SLURM_PROCID "
                          "$HPCC_CONTAINER", user=U1, env=env)
    assert p.returncode == 0, p.stderr
    # image wins for what it defines, the job's own variables pass, Slurm's always pass
    assert p.stdout.split() == ["image-value", "job", "from-image",
                                "/usr/local/bin:/usr/bin:/bin", "0", "1"]
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-env=SHARED_VAR",
                          "/bin/sh", "-c", "echo $SHARED_VAR", user=U1, env=env)
    assert p.stdout.strip() == "job-value", p.stderr


def test_container_mounts(slurm_cluster, slurm_site, tmp_path_factory):
    d = slurm_site.root / "mnt-src"
    d.mkdir(exist_ok=True)
    (d / "data.txt").write_text("hello from the host\n")
    os.chmod(d, 0o755)
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}",
                          f"--container-mounts={d}:/data:ro,{d}:/data2", "sh", "-c",
                          "cat /data/data.txt; touch /data/x 2>&1 || echo ro-ok", user=U1)
    assert p.returncode == 0, p.stderr
    assert "hello from the host" in p.stdout and "ro-ok" in p.stdout


def test_container_writable(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "sh", "-c",
                          "touch /etc/x 2>/dev/null && echo wrote || echo ro", user=U1)
    assert p.stdout.strip() == "ro"
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-writable", "sh",
                          "-c", "grep ' / ' /proc/self/mounts", user=U1)
    assert p.returncode == 0, p.stderr
    assert " rw," in p.stdout and " ro," not in p.stdout, p.stdout
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "sh", "-c",
                          "grep ' / ' /proc/self/mounts", user=U1)
    assert " ro," in p.stdout, p.stdout
    # as root (job user root), --container-writable lets the job change the image's files,
    # in the tmpfs upper layer only
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "--container-writable", "sh",
                          "-c", "echo changed > /etc/os-release && cat /etc/os-release")
    assert p.stdout.strip() == "changed", p.stderr
    p = slurm_cluster.run("srun", "-n1", f"--container={IMG}", "cat", "/etc/os-release")
    assert "hpcc test image" in p.stdout


def test_missing_image_is_one_clear_line_and_fails_the_step(slurm_cluster):
    p = slurm_cluster.run("srun", "-n2", "--container=hpcctest/nothere:1", "echo", "RAN",
                          user=U1)
    print(p.stderr)
    assert p.returncode != 0
    assert "RAN" not in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("hpcc: ")]
    assert lines, p.stderr
    assert "image 'hpcctest/nothere:1' not found in the store" in lines[0]
    assert "pull it with" in lines[0]
    assert "Traceback" not in p.stderr


def test_image_the_user_may_not_read_is_refused(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/secret:1", "echo", "RAN",
                          user=U1)
    assert p.returncode != 0
    assert "RAN" not in p.stdout
    assert "may not read it" in p.stderr, p.stderr
    # root may
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/secret:1", "cat",
                          "/etc/os-release")
    assert 'NAME="secret"' in p.stdout, p.stderr


def test_bad_image_reference_is_one_clear_line(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "--container=UPPER CASE!!", "true", user=U1)
    assert p.returncode != 0
    assert any(ln.startswith("hpcc: ") for ln in p.stderr.splitlines()), p.stderr
    assert "Traceback" not in p.stderr
