"""Images on first use: an image named by srun, salloc or sbatch that is in no store is pulled
once, on the submit host, as the user (`hpcc pull`), before the step's tasks start; compute
nodes never pull. On the real cluster, from a real registry, as an unprivileged user."""
import itertools
import os
import shutil
import time

import pytest

from tests.test_slurm_sbatch import wait_job

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"
_tags = itertools.count()


@pytest.fixture(scope="module")
def slurm_cluster(slurm_site):
    """A cluster of its own whose plugin pulls on first use (the default; the shared
    clusters of the other tests turn it off with pull=no)."""
    import tempfile
    from pathlib import Path

    from hpcc.testkit.slurmcluster import SlurmCluster
    d = Path(tempfile.mkdtemp(prefix="slurm-pull-", dir=slurm_site.root))
    c = SlurmCluster(d, nodes=1, plugstack_lines=[slurm_site.plugstack_line(pull=True)])
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pushed(registry):
    from hpcc.testkit.busybox import busybox_image
    # an image of this module's own: the site store may hold the plain busybox image
    # (another test's pull), and a pull of an image the site has only tags it
    image = busybox_image(labels={"org.hpcc.test": f"firstuse-{os.getpid()}-{time.time_ns()}"})

    def push():
        tag = f"t{os.getpid()}-{next(_tags)}-{time.monotonic_ns()}"
        registry.push("firstuse/busybox", tag, image)
        return registry.ref("firstuse/busybox", tag)
    return push


def run(cluster, *argv, **kw):
    """As slurmuser1 from their home, with their HOME (where `hpcc pull` puts images)."""
    import pwd
    env = dict(kw.pop("env", {}), HOME=pwd.getpwnam(U1).pw_dir)
    return cluster.run(*argv, user=U1, env=env, **kw)


def submit(cluster, script, out):
    p = run(cluster, "sbatch", "--parsable", "-o", str(out), input=script)
    assert p.returncode == 0, p.stderr
    wait_job(cluster, int(p.stdout.strip().split(";")[0]))
    for _ in range(50):
        if os.path.exists(out):
            break
        time.sleep(0.1)
    return p, open(out).read()


@pytest.fixture
def user_store(slurm_users):
    """slurmuser1's own store (and first-use markers), emptied before and after."""
    u = slurm_users[U1]
    d = os.path.join(u.pw_dir, ".local", "share", "hpcc")
    seen = os.path.join(u.pw_dir, ".cache", "hpcc", "seen")
    for x in (d, seen):
        shutil.rmtree(x, ignore_errors=True)
    yield os.path.join(d, "images")
    for x in (d, seen):
        shutil.rmtree(x, ignore_errors=True)


def _in_store(store):
    return [f for f in os.listdir(store) if f.endswith(".sqfs")] if os.path.isdir(store) else []


def test_srun_pulls_a_missing_image_once_before_the_step(slurm_cluster, pushed, user_store):
    ref = pushed()
    p = run(slurm_cluster, "srun", "-n2", f"--container-image={ref}", "grep", "-c",
                          "hpcc busybox", "/etc/os-release")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1"]
    assert f"hpcc: image '{ref}' is in no store: pulling it" in p.stderr, p.stderr
    assert len(_in_store(user_store)) == 1          # into the user's own store, as the user
    assert all(os.stat(os.path.join(user_store, f)).st_uid != 0 for f in _in_store(user_store))
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "true")
    assert p.returncode == 0 and "pulling" not in p.stderr, p.stderr


def test_salloc_pulls_for_the_allocations_steps(slurm_cluster, pushed, user_store):
    ref = pushed()
    p = run(slurm_cluster, "salloc", "-n2", f"--container-image={ref}", "sh", "-c",
                          "srun -n2 grep -c 'hpcc busybox' /etc/os-release")
    assert p.returncode == 0, p.stderr
    assert "pulling it" in p.stderr and p.stdout.split() == ["1", "1"], p.stdout + p.stderr


def test_sbatch_returns_at_once_and_the_first_step_waits(slurm_cluster, pushed, user_store,
                                                         outdir):
    ref = pushed()
    script = f"""#!/bin/sh
#SBATCH --container-image={ref}
#SBATCH -n2
grep -c 'hpcc busybox' /etc/os-release
srun -n2 grep -c 'hpcc busybox' /etc/os-release
"""
    p, text = submit(slurm_cluster, script, outdir / "o.txt")
    assert "pulling it for this job in the background" in p.stderr, p.stderr
    assert text.split()[-3:] == ["1", "1", "1"], text
    assert not os.listdir(os.path.join(user_store, ".pending")), "the marker is gone"


def test_failed_pull_stops_srun_before_anything_is_submitted(slurm_cluster, registry,
                                                              user_store):
    ref = registry.ref("firstuse/nothere", "1")
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "echo", "RAN")
    assert p.returncode != 0 and "RAN" not in p.stdout
    assert "queued" not in p.stderr and "allocated" not in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert any(ln.startswith("hpcc: ") or ln.startswith("error: ") for ln in
               p.stderr.splitlines()), p.stderr


def test_sbatch_pull_that_fails_fails_the_first_step_with_its_reason(slurm_cluster, registry,
                                                                     user_store, outdir):
    ref = registry.ref("firstuse/nothere", "2")
    _, text = submit(slurm_cluster, f"#!/bin/sh\n#SBATCH --container-image={ref}\necho RAN\n",
                     outdir / "o.txt")
    assert "RAN" not in text, text
    assert f"the pull of '{ref}' started by sbatch failed" in text, text


def test_compute_nodes_never_pull(slurm_cluster, pushed, user_store, outdir):
    # a step started inside a job (on a compute node) names an image in no store
    ref = pushed()
    _, text = submit(slurm_cluster, f"#!/bin/sh\nsrun -n1 --container-image={ref} echo RAN\n",
                     outdir / "o.txt")
    assert "RAN" not in text, text
    assert "not found in the store" in text, text
    assert _in_store(user_store) == []


def test_an_image_the_store_has_but_the_user_may_not_read_is_not_pulled(slurm_cluster,
                                                                        user_store):
    p = run(slurm_cluster, "srun", "-n1", "--container=hpcctest/secret:1", "echo", "RAN")
    assert p.returncode == 125 and "RAN" not in p.stdout
    assert "pulling" not in p.stderr and "may not read it" in p.stderr, p.stderr


def test_an_image_found_recently_costs_srun_one_stat(slurm_cluster, pushed, user_store,
                                                     slurm_users):
    # after a lookup found the image, the plugin skips the Python check for an hour: its
    # marker (named by the same hash in C and Python) is all it reads
    from hpcc.slurm.firstuse import seen_path

    u = slurm_users[U1]
    ref = pushed()
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "true")
    assert p.returncode == 0, p.stderr
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "true")
    assert p.returncode == 0, p.stderr
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = u.pw_dir
    try:
        marker = seen_path(ref)
    finally:
        os.environ["HOME"] = old_home
    assert os.path.exists(marker)
    # proof that srun trusted the marker: with the image gone, nothing is pulled and the
    # step says the image is in no store
    shutil.rmtree(user_store)
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "echo", "RAN")
    assert p.returncode == 125 and "pulling" not in p.stderr, p.stderr
    assert "not found in the store" in p.stderr
    os.unlink(marker)
    p = run(slurm_cluster, "srun", "-n1", f"--container-image={ref}", "echo", "RAN")
    assert p.returncode == 0 and "pulling" in p.stderr, p.stderr


def test_the_first_step_says_it_waits_for_a_slow_pull(slurm_cluster, registry, fault_proxy,
                                                      user_store, outdir):
    # a slow registry (blob bodies at 256 KB/s): the job starts before the pull ends, and
    # its output says what it waits for
    from hpcc.testkit.busybox import busybox_image

    tag = f"slow{os.getpid()}-{time.monotonic_ns()}"
    registry.push("firstuse/slow", tag, busybox_image(labels={"org.hpcc.test": tag}))
    ref = fault_proxy.ref("firstuse/slow", tag)
    fault_proxy.throttle = 256 * 1024
    script = (f"#!/bin/sh\n#SBATCH --container-image={ref}\n"
              "grep -c 'hpcc busybox' /etc/os-release\n")
    p, text = submit(slurm_cluster, script, outdir / "o.txt")
    assert "in the background" in p.stderr, p.stderr
    assert f"hpcc: waiting for image '{ref}'" in text, text
    assert text.split()[-1] == "1", text


def test_sbatch_container_directive_in_a_script_file_is_pulled_too(slurm_cluster, pushed,
                                                                   user_store, outdir,
                                                                   slurm_users):
    # Slurm's own --container in an #SBATCH line: the plugin reads the script file
    u = slurm_users[U1]
    ref = pushed()
    script = outdir / "job.sh"
    script.write_text(f"#!/bin/sh\n# a comment\n#SBATCH -n1\n#SBATCH --container={ref}\n"
                      "grep -c 'hpcc busybox' /etc/os-release\n")
    os.chown(script, u.pw_uid, u.pw_gid)
    out = outdir / "o.txt"
    p = run(slurm_cluster, "sbatch", "--parsable", "-o", str(out), str(script))
    assert p.returncode == 0, p.stderr
    assert "in the background" in p.stderr, p.stderr
    wait_job(slurm_cluster, int(p.stdout.strip().split(";")[0]))
    for _ in range(50):
        if out.exists():
            break
        time.sleep(0.1)
    assert out.read_text().split()[-1] == "1", out.read_text()


def test_the_check_and_the_pull_share_one_process_without_the_cli(slurm_site, pushed,
                                                                   user_store):
    """What the plugin runs for an image in no store pulls it in that process and loads
    neither click nor the other image commands (bench/srun.sh part 4: its cost beside
    `gateway pull`); the pull's progress and the image are those of `hpcc pull`."""
    import pwd
    import subprocess
    import sys
    ref = pushed()
    home = pwd.getpwnam(U1).pw_dir
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "HPCC_CONFIG": str(slurm_site.config)}
    argv = [sys.executable, "-I", "-X", "importtime", "-m", "hpcc.slurm.firstuse", "wait", ref]
    p = subprocess.run(argv, env=env, user=U1, cwd=home, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"hpcc: image '{ref}' is in no store: pulling it" in p.stderr, p.stderr
    assert f"pulled {ref} -> " in p.stderr or f"up to date: {ref}" in p.stderr, p.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "hpcc.store" in imported and "hpcc.gateway.pull" in imported  # importtime works
    assert not [m for m in imported if m.split(".")[0] == "click"
                or m in ("hpcc.gateway.cli", "hpcc.gateway.imagecmds", "hpcc.cli")], imported
    p = subprocess.run(argv[:2] + argv[4:], env=env, user=U1, cwd=home, capture_output=True,
                       text=True)  # found now: nothing pulled again
    assert p.returncode == 0 and "pulling" not in p.stderr, p.stderr


def test_a_failed_first_use_pull_says_why_in_one_line(slurm_site, registry, user_store):
    import pwd
    import subprocess
    import sys
    ref = registry.ref("firstuse/absent", "nope")
    home = pwd.getpwnam(U1).pw_dir
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "HPCC_CONFIG": str(slurm_site.config)}
    p = subprocess.run([sys.executable, "-I", "-m", "hpcc.slurm.firstuse", "wait", ref],
                       env=env, user=U1, cwd=home, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("hpcc: ") and "not found" in last, p.stderr
    assert _in_store(user_store) == []
