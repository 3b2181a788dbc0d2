"""Steps across two nodes (each slurmd in its own mount+UTS namespace), cancellation and
leaks: nothing of a container step may outlive it."""
import glob
import os
import subprocess
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

IMG = "hpcctest/busybox:1"
U1 = "slurmuser1"


def loop_backing(store):
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(f) as fh:
                b = fh.read().strip()
        except OSError:
            continue
        if b.startswith(str(store)):
            out.append(b)
    return sorted(out)


def mount_namespaces():
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out.add(os.readlink(f"/proc/{d}/ns/mnt"))
            except OSError:
                pass
    return out


def user_processes(uid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        out.append(int(d))
        except OSError:
            pass
    return out


def helper_processes():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                # the per-node helper server stays (idle timeout); its per-step children not
                if b"hpcc.stepd" in cmd and b"--serve" not in cmd:
                    out.append(int(d))
            except OSError:
                pass
    return out


def snapshot(uid):
    """What is there before a step: mount namespaces and the user's processes (a process
    of the shared test user that another session left running is not this test's leak)."""
    return mount_namespaces(), set(user_processes(uid))


def wait_clean(site, uid, baseline, timeout=15):
    baseline_ns, baseline_pids = baseline
    deadline = time.monotonic() + timeout
    while True:
        state = (loop_backing(site.store),
                 sorted(set(user_processes(uid)) - baseline_pids), helper_processes(),
                 sorted(mount_namespaces() - baseline_ns))
        if state == ([], [], [], []):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left over after the step: loops={state[0]} "
                                 f"user pids={state[1]} helpers={state[2]} mnt ns={state[3]}")
        time.sleep(0.2)


def test_two_nodes_every_task_in_the_image(slurm_cluster2):
    p = slurm_cluster2.run("srun", "-N2", "-n4", "-l", f"--container={IMG}", "sh", "-c",
                           "echo $(hostname) $(grep ^NAME= /etc/os-release)", user=U1)
    assert p.returncode == 0, p.stderr
    lines = sorted(p.stdout.splitlines())
    assert len(lines) == 4
    assert all('NAME="hpcc test image"' in ln for ln in lines)
    assert {ln.split()[1] for ln in lines} == {"n1", "n2"}


def test_one_helper_per_node_not_per_task(slurm_cluster2, slurm_site):
    # Every task of a node shares one mount namespace; the two nodes have one each.
    p = slurm_cluster2.run("srun", "-N2", "-n8", f"--container={IMG}", "sh", "-c",
                           "echo $(hostname) $(readlink /proc/self/ns/mnt)", user=U1)
    assert p.returncode == 0, p.stderr
    per_node = {}
    for line in p.stdout.splitlines():
        host, ns = line.split()
        per_node.setdefault(host, set()).add(ns)
    assert set(per_node) == {"n1", "n2"}
    assert all(len(v) == 1 for v in per_node.values()), per_node
    # (not compared across nodes: a namespace's number is reused once it is gone, and one
    # node's tasks may end before the other's start)


def test_missing_image_on_two_nodes_fails_before_tasks_run(slurm_cluster2):
    p = slurm_cluster2.run("srun", "-N2", "-n2", "--container=hpcctest/nothere:1", "echo",
                           "RAN", user=U1)
    assert p.returncode == 125, p.stderr
    assert "RAN" not in p.stdout
    assert "hpcc: image 'hpcctest/nothere:1' not found in the store" in p.stderr


def test_cancelled_step_leaves_nothing_behind(slurm_cluster2, slurm_site, slurm_users):
    uid = slurm_users[U1].pw_uid
    baseline = snapshot(uid)
    proc = subprocess.Popen(["srun", "-N2", "-n4", f"--container={IMG}", "sleep", "300"],
                            env=slurm_cluster2.env, user=U1, cwd="/tmp",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90     # the step's start, on a loaded machine
        while time.monotonic() < deadline and proc.poll() is None and not (
                len(loop_backing(slurm_site.store)) >= 2 and len(user_processes(uid)) >= 5):
            time.sleep(0.1)
        if not loop_backing(slurm_site.store):
            why = proc.communicate(timeout=5)[1] if proc.poll() is not None else "still running"
            pytest.fail(f"the image is not mounted while the step runs ({why})")
        jobs = slurm_cluster2.run("squeue", "-h", "-u", U1, "-o", "%i").stdout.split()
        assert jobs
        slurm_cluster2.run("scancel", *jobs, check=True)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_clean(slurm_site, uid, baseline)


def test_killed_task_ends_the_step_cleanly(slurm_cluster2, slurm_site, slurm_users):
    uid = slurm_users[U1].pw_uid
    baseline = snapshot(uid)
    p = slurm_cluster2.run("srun", "-N2", "-n4", "--kill-on-bad-exit=1", f"--container={IMG}",
                           "sh", "-c", 'if [ "$SLURM_PROCID" = 3 ]; then kill -9 $$; fi; '
                           "sleep 300", user=U1, timeout=60)
    assert p.returncode != 0
    wait_clean(slurm_site, uid, baseline)


@pytest.mark.slow
def test_100_consecutive_steps_leak_nothing(slurm_cluster2, slurm_site, slurm_users):
    uid = slurm_users[U1].pw_uid
    baseline = snapshot(uid)
    slurmd_fds = {n: len(os.listdir(f"/proc/{slurm_cluster2.slurmd_pid(n)}/fd"))
                  for n in slurm_cluster2.nodes}
    # One allocation, 100 steps in it (as a user does in a batch script).
    script = (f"for i in $(seq 100); do srun -N2 -n2 --container={IMG} true || "
              "echo FAIL $i; done; echo done")
    p = slurm_cluster2.run("salloc", "-N2", "-n2", "sh", "-c", script, user=U1, timeout=400)
    assert p.returncode == 0, p.stderr
    assert "FAIL" not in p.stdout and "done" in p.stdout, p.stdout + p.stderr
    wait_clean(slurm_site, uid, baseline)
    for n, before in slurmd_fds.items():
        after = len(os.listdir(f"/proc/{slurm_cluster2.slurmd_pid(n)}/fd"))
        assert after <= before + 2, f"slurmd on {n}: {before} fds before, {after} after"
