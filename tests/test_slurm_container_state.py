"""srun's writable, named and saved containers on the real cluster, as an unprivileged user:
--container-writable (the user writes anywhere in a site image's container),
--container-name (the layer kept across the steps of a job; attach; refusals) and
--container-save (an image written as the user when the step ends)."""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"


@pytest.fixture(scope="module")
def site_image(slurm_site):
    """The busybox image where root kernel-mounts it (a root-only directory chain), so
    that writable containers show its files as the job user's (idmapped)."""
    d = tempfile.mkdtemp(prefix="hpcc-slurm-site-", dir="/run")
    os.chmod(d, 0o755)
    path = os.path.join(d, "busybox.sqfs")
    shutil.copy(slurm_site.images["busybox"].sqfs_path, path)
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def _salloc(cluster, script, timeout=120):
    """Run `script` (which ends with `echo job=$SLURM_JOB_ID`) in an allocation as U1:
    (the result, [the job id] or [] when the script did not get that far)."""
    p = cluster.run("salloc", "-n1", "sh", "-c", script, user=U1, timeout=timeout)
    return p, [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("job=")]


def _remove_jobs_containers(job_ids):
    for job in job_ids:
        subprocess.run([sys.executable, "-I", "-m", "hpcc.runtime.named", "remove-job",
                        str(job)], capture_output=True)


def test_writable_container_lets_the_job_user_write_anywhere(slurm_cluster, site_image,
                                                             slurm_users):
    uid = slurm_users[U1].pw_uid
    p = slurm_cluster.run("srun", "-n1", f"--container-image={site_image}",
                          "--container-writable", "sh", "-c",
                          "touch /newfile && mkdir -p /usr/local/x && echo y > /bin/tool && "
                          "id -u && stat -c %u /newfile /bin/busybox", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(uid)] * 3


@pytest.fixture
def users_own_image(slurm_site, slurm_users):
    """The busybox image in a directory of the job user's: the helper may not give it to
    the kernel, so squashfuse_ll serves it, running as the user."""
    u = slurm_users[U1]
    d = tempfile.mkdtemp(prefix="hpcc-own-", dir=slurm_site.root)
    os.chmod(d, 0o755)
    os.chown(d, u.pw_uid, u.pw_gid)
    path = os.path.join(d, "own.sqfs")
    shutil.copy(slurm_site.images["busybox"].sqfs_path, path)
    os.chown(path, u.pw_uid, u.pw_gid)
    yield path
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("remap", [False, True], ids=["user", "remap-root"])
def test_writable_container_of_the_users_own_image(slurm_cluster, users_own_image,
                                                   slurm_users, remap):
    """--container-writable on an image served by FUSE: the job user (or root, remapped)
    writes anywhere in it too, whatever the step's group (this cluster's srun runs with
    group 0, which the FUSE connection's user namespace must map as well)."""
    uid = slurm_users[U1].pw_uid
    inside = "0" if remap else str(uid)
    p = slurm_cluster.run("srun", "-n2", f"--container-image={users_own_image}",
                          "--container-writable",
                          "--container-remap-root" if remap else "--no-container-remap-root",
                          "sh", "-c",
                          "touch /newfile && mkdir -p /usr/local/x && echo y > /bin/tool && "
                          "echo z >> /etc/passwd && "
                          "{ [ $SLURM_PROCID != 0 ] || rm /etc/os-release; } && "
                          "id -u && stat -c %u / /newfile /bin/busybox", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [inside] * 8, p.stdout
    # the image itself is unchanged
    out = subprocess.run(["unsquashfs", "-l", users_own_image], capture_output=True,
                         text=True).stdout
    assert "/etc/os-release" in out and "/newfile" not in out


@pytest.mark.parametrize("kind", ["site", "own"])
def test_named_container_keeps_its_layer_across_the_steps_of_a_job(slurm_cluster, request,
                                                                   kind):
    site_image = request.getfixturevalue("site_image" if kind == "site" else
                                         "users_own_image")
    script = (f"srun -n1 --container-image={site_image} --container-name=build "
              "sh -c 'echo installed > /opt-tool'; "
              f"srun -n1 --container-image={site_image} --container-name=build "
              "cat /opt-tool; "
              f"srun -n1 --container-image={site_image} --container-name=build:create true "
              "|| echo create-refused; "
              f"srun -n1 --container-image={site_image} sh -c "
              "'test -e /opt-tool || echo unnamed-clean'; echo job=$SLURM_JOB_ID")
    p, job = _salloc(slurm_cluster, script)
    try:
        assert "installed\n" in p.stdout, p.stdout + p.stderr
        assert "create-refused" in p.stdout and "unnamed-clean" in p.stdout
        assert "already exists" in p.stderr
        # the layer lives in a root-only place, per job and user
        assert job and os.path.isdir("/run/hpcc-containers")
        # the plugin's job epilog removes the job's named containers when the job ends
        deadline = time.monotonic() + 20
        while any(e.startswith(f"job-{job[0]}-u") for e in os.listdir("/run/hpcc-containers")):
            assert time.monotonic() < deadline, "the job's named containers were not removed"
            time.sleep(0.2)
    finally:
        _remove_jobs_containers(job)


def _keepers_in(namespace):
    """Helper processes (hpcc.stepd) whose mount namespace is `namespace`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") != namespace:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"hpcc.stepd" in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def test_later_steps_run_in_the_named_containers_kept_namespace(slurm_cluster, site_image):
    """The namespace assembled by a job's named container is kept between its steps (by an
    idle root process) and joined by the next step with the same settings (its /tmp, a
    tmpfs of the assembly, is still there); a step with other settings gets a new assembly on
    the same layer; the job's end ends the keeper."""
    c = f"srun -n1 --container-image={site_image} --container-name=keep"
    ns = "readlink /proc/self/ns/mnt | sed s/^/NS=/"
    script = (f"{c} sh -c 'echo kept > /kept; echo one > /tmp/mark; {ns}' && "
              f"{c} sh -c 'cat /kept /tmp/mark' && "
              f"{c} --container-workdir=/tmp sh -c 'cat /kept; pwd; "
              "test -e /tmp/mark || echo fresh-tmp; echo three > /tmp/mark' && "
              f"{c} --container-workdir=/tmp sh -c 'cat /tmp/mark; {ns}'; "
              "echo job=$SLURM_JOB_ID")
    p, job = _salloc(slurm_cluster, script, timeout=180)
    try:
        spaces = [ln[3:] for ln in p.stdout.splitlines() if ln.startswith("NS=")]
        assert len(spaces) == 2, p.stdout + p.stderr
        # the second step ran in the first one's namespace; the third, with other
        # settings, in a new assembly on the same layer, kept in turn for the fourth
        assert [ln for ln in p.stdout.splitlines() if ln[:3] not in ("NS=", "job")] == \
            ["kept", "one", "kept", "/tmp", "fresh-tmp", "three"], p.stdout + p.stderr
        assert os.readlink("/proc/self/ns/mnt") not in spaces
        # at the end of the job its keeper is ended: no helper process holds the namespace
        deadline = time.monotonic() + 30
        while _keepers_in(spaces[1]):
            assert time.monotonic() < deadline, "the named container's keeper outlived the job"
            time.sleep(0.2)
    finally:
        _remove_jobs_containers(job)


def test_job_scope_named_containers_are_removed_when_the_job_ends(slurm_cluster, site_image):
    """The plugin's job epilog removes the job's named containers (scope "job")."""
    script = (f"srun -n1 --container-image={site_image} --container-name=tmp "
              "sh -c 'echo x > /x' || exit 1; echo job=$SLURM_JOB_ID; sleep 3")
    proc = subprocess.Popen(["salloc", "-n1", "sh", "-c", script], env=slurm_cluster.env,
                            user=U1, cwd="/tmp", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job = None
    try:
        for line in proc.stdout:
            if line.startswith("job="):
                job = line.strip()[4:]
                break
        assert job, proc.stderr.read() if proc.poll() is not None else "no job id"
        mine = [e for e in os.listdir("/run/hpcc-containers") if e.startswith(f"job-{job}-u")]
        assert len(mine) == 1  # while the job runs, its container is there
        assert os.listdir(f"/run/hpcc-containers/{mine[0]}") == ["tmp"]
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/run/hpcc-containers/{mine[0]}"):
            assert time.monotonic() < deadline, "the job's named containers were not removed"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _remove_jobs_containers([job] if job else [])


def test_a_step_attaches_to_the_running_named_container(slurm_cluster, site_image):
    script = (f"srun -n1 --container-image={site_image} --container-name=svc "
              "sh -c 'echo live > /tmp/only-here; sleep 6' & sleep 3; "
              f"srun -n1 --overlap --container-image={site_image} --container-name=svc:exec "
              "cat /tmp/only-here; "
              f"srun -n1 --overlap --container-image={site_image} --container-name=svc:no_exec "
              "true || echo no-exec-refused; wait; echo job=$SLURM_JOB_ID")
    p, job = _salloc(slurm_cluster, script, timeout=120)
    try:
        assert "live\n" in p.stdout, p.stdout + p.stderr
        assert "no-exec-refused" in p.stdout and "in use" in p.stderr
    finally:
        _remove_jobs_containers(job)


@pytest.mark.parametrize("kind", ["site", "own"])
def test_save_writes_an_image_as_the_user_at_the_end_of_the_step(slurm_cluster, slurm_users,
                                                                 request, kind):
    """For a site image (kernel, idmapped) and for the user's own (FUSE in the user's
    namespace): the saved image has the step's changes, written as the user."""
    image = request.getfixturevalue("site_image" if kind == "site" else "users_own_image")
    u = slurm_users[U1]
    out = os.path.join(u.pw_dir, f"saved-{os.getpid()}-{kind}.sqfs")
    try:
        p = slurm_cluster.run("srun", "-n1", f"--container-image={image}",
                              "--container-writable", f"--container-save={out}", "sh", "-c",
                              "echo kept > /kept", user=U1)
        assert p.returncode == 0, p.stderr
        for _ in range(100):  # written by the helper's keeper once the step has ended
            if os.path.exists(out):
                break
            time.sleep(0.1)
        assert os.stat(out).st_uid == u.pw_uid
        p = slurm_cluster.run("srun", "-n1", f"--container-image={out}", "cat", "/kept",
                              user=U1)
        assert (p.returncode, p.stdout) == (0, "kept\n"), p.stderr
    finally:
        if os.path.exists(out):
            os.unlink(out)


def test_remap_root_is_root_inside_and_the_user_outside(slurm_cluster, site_image,
                                                         slurm_users):
    """--container-remap-root: uid 0 with capabilities in the task's own user namespace,
    which maps 0 to the job user; a file written on a bound host directory is the user's;
    no mount, no hostname change; with --container-writable root may change any file."""
    u = slurm_users[U1]
    work = os.path.join(u.pw_dir, f"remap-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    os.chown(work, u.pw_uid, u.pw_gid)
    try:
        p = slurm_cluster.run(
            "srun", "-n2", f"--container-image={site_image}", "--container-remap-root",
            "--container-writable", f"--container-mounts={work}:/work", "sh", "-c",
            "id -u; cat /proc/self/uid_map; stat -c %u /bin/busybox; "
            "chown 0:0 /bin/busybox && echo /bin/x > /bin/x && echo changed; "
            "touch /work/made-$SLURM_PROCID; "
            "mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; "
            "hostname evil 2>/dev/null && echo RENAMED; true", user=U1)
        assert p.returncode == 0, p.stderr
        out = p.stdout.split()
        assert out.count("0") >= 6 and out.count(str(u.pw_uid)) == 2, p.stdout
        assert out.count("changed") == 2
        assert "MOUNTED" not in out and "RENAMED" not in out
        for r in (0, 1):
            assert os.stat(os.path.join(work, f"made-{r}")).st_uid == u.pw_uid
        p = slurm_cluster.run("srun", "-n1", f"--container-image={site_image}",
                              "--no-container-remap-root", "id", "-u", user=U1)
        assert p.stdout.strip() == str(u.pw_uid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fd_holders(link):
    """Helper processes (hpcc.stepd) holding an fd whose link is `link` ("user:[N]")."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"hpcc.stepd" not in f.read():
                    continue
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == link
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                out.append(int(pid))
        except OSError:
            pass
    return out


def test_remap_root_steps_in_a_kept_named_container_share_its_user_namespace(
        slurm_cluster, site_image, slurm_users):
    """The idle keeper of a remap-root named container also holds the user namespace its
    tasks joined (0 mapped to the job user), and the next steps of the same settings join
    that one instead of a new one: still root inside and the user outside."""
    u = slurm_users[U1]
    c = (f"srun -n1 --container-image={site_image} --container-name=rr "
         "--container-remap-root --container-writable")
    show = "sh -c 'echo NS=$(readlink /proc/self/ns/user) $(id -u) $(cat /proc/self/uid_map)'"
    script = (f"{c} {show} || exit 1; sleep 3; {c} {show} && {c} {show}; "
              "echo job=$SLURM_JOB_ID")
    proc = subprocess.Popen(["salloc", "-n1", "sh", "-c", script], env=slurm_cluster.env,
                            user=U1, cwd="/tmp", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, held = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("NS=") and held is None:
                # between the steps: the named container's idle keeper holds it
                deadline = time.monotonic() + 2
                while not (held := _fd_holders(line.split()[0][3:])) and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _remove_jobs_containers([ln.strip()[4:] for ln in lines if ln.startswith("job=")])
    rows = [ln[3:].split() for ln in lines if ln.startswith("NS=")]
    assert len(rows) == 3, "".join(lines) + err
    assert all(r[1:] == ["0", "0", str(u.pw_uid), "1"] for r in rows), rows
    assert held, "no idle keeper holds the remap-root user namespace between the steps"
    assert rows[0][0] == rows[1][0] == rows[2][0], rows
    assert os.readlink("/proc/self/ns/user") != rows[0][0]


def test_unshare_gives_the_step_its_own_namespaces(slurm_cluster, site_image):
    host = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("net", "ipc")}
    p = slurm_cluster.run("srun", "-n2", f"--container-image={site_image}",
                          "--container-unshare=net,ipc", "sh", "-c",
                          "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc; "
                          "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '", user=U1)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    nets = {ln for ln in lines if ln.startswith("net:")}
    ipcs = {ln for ln in lines if ln.startswith("ipc:")}
    # both tasks share the step's namespaces, which are not the host's
    assert len(nets) == 1 and len(ipcs) == 1
    assert nets != {host["net"]} and ipcs != {host["ipc"]}
    assert [ln for ln in lines if ":" not in ln] == ["lo", "lo"]
