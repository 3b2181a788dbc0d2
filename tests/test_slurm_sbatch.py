"""sbatch with #SBATCH --container: the batch script and its steps run in the image."""
import os
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"


def wait_job(cluster, job_id, timeout=60):
    """Poll the job until it leaves PENDING/RUNNING (sbatch --wait polls far too slowly)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        p = cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T")
        state = p.stdout.strip()
        if p.returncode == 0 and state in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            if state == "":
                return
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {state} after {timeout}s")


def submit(cluster, script, out, *args, user=U1):
    p = cluster.run("sbatch", "--parsable", "-o", str(out), *args, user=user, input=script)
    assert p.returncode == 0, p.stderr
    job = int(p.stdout.strip().split(";")[0])
    wait_job(cluster, job)
    for _ in range(50):
        if os.path.exists(out):
            break
        time.sleep(0.1)
    return job, open(out).read()


def test_batch_script_and_its_steps_run_in_the_container(slurm_cluster, outdir):
    script = """#!/bin/sh
#SBATCH --container=hpcctest/busybox:1
#SBATCH -n2
echo "batch: $(grep ^NAME= /etc/os-release)"
srun -n2 grep ^NAME= /etc/os-release | sed 's/^/step: /'
srun -n1 --container=hpcctest/other:1 grep ^NAME= /etc/os-release | sed 's/^/other: /'
echo "inherit: $SLURM_CONTAINER"
"""
    job, out = submit(slurm_cluster, script, outdir / "o.txt")
    assert 'batch: NAME="hpcc test image"' in out, out
    assert out.count('step: NAME="hpcc test image"') == 2, out
    assert 'other: NAME="hpcc other image"' in out, out
    assert "inherit: hpcctest/busybox:1" in out, out


def test_batch_with_missing_image_fails_with_a_clear_line(slurm_cluster, outdir):
    script = "#!/bin/sh\n#SBATCH --container=hpcctest/nothere:1\necho RAN\n"
    job, out = submit(slurm_cluster, script, outdir / "o.txt")
    assert "RAN" not in out
    assert "hpcc: image 'hpcctest/nothere:1' not found in the store" in out, out
    p = slurm_cluster.run("scontrol", "show", "job", str(job))
    assert "ExitCode=125:0" in p.stdout or "JobState=FAILED" in p.stdout, p.stdout


def test_sbatch_plugin_options_reach_inner_steps(slurm_cluster, outdir, slurm_site):
    src = slurm_site.root / "sbatch-mnt"
    src.mkdir(exist_ok=True)
    (src / "f").write_text("mounted\n")
    script = f"""#!/bin/sh
#SBATCH --container-image=hpcctest/other:1
#SBATCH --container-mounts={src}:/m:ro
cat /m/f
srun -n1 cat /m/f
srun -n1 grep ^NAME= /etc/os-release
"""
    job, out = submit(slurm_cluster, script, outdir / "o.txt")
    assert out.count("mounted") == 2, out
    assert 'NAME="hpcc other image"' in out, out
