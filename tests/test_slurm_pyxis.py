"""srun as pyxis users know it: pyxis' options, environment variables, reference forms,
mount syntax, defaults and errors, on the real cluster as an unprivileged user."""
import os
import re
import shutil
import subprocess

import pytest

from tests.test_slurm_sbatch import submit

pytestmark = [pytest.mark.root, pytest.mark.slurm]

IMG = "hpcctest/busybox:1"
U1 = "slurmuser1"

PYXIS_OPTIONS = ["container-image", "container-mounts", "container-workdir", "container-env",
                 "container-name", "container-save", "container-remap-root",
                 "no-container-remap-root", "container-mount-home", "no-container-mount-home",
                 "container-entrypoint", "no-container-entrypoint", "container-entrypoint-log",
                 "container-writable", "container-readonly", "container-unshare"]


def hpcc_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("hpcc: ")]


def test_srun_help_shows_every_pyxis_option_once_with_its_variable(slurm_cluster):
    p = slurm_cluster.run("srun", "--help", user=U1)
    text = p.stdout + p.stderr
    for opt in PYXIS_OPTIONS:
        assert len(re.findall(rf"--{opt}\b(?!-)", text)) == 1, opt
    # each positive option names its environment variables
    block = text[text.index("--container-image"):]
    for opt in PYXIS_OPTIONS:
        if opt.startswith("no-"):
            continue
        var = opt.upper().replace("-", "_")
        assert f"HPCC_{var}" in block, opt


def test_pyxis_container_image_variable_runs_in_the_image(slurm_cluster):
    # today's pyxis job scripts export PYXIS_CONTAINER_IMAGE
    p = slurm_cluster.run("srun", "-n2", "grep", "-c", "hpcc test image", "/etc/os-release",
                          user=U1, env={"PYXIS_CONTAINER_IMAGE": IMG})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1"]


def test_pyxis_variables_in_an_allocation(slurm_cluster):
    # salloc, then steps inside the allocation: the variables reach every step
    script = ("srun -n2 sh -c 'pwd; grep -c \"hpcc test image\" /etc/os-release' | sort -u")
    p = slurm_cluster.run("salloc", "-n2", "sh", "-c", script, user=U1,
                          env={"PYXIS_CONTAINER_IMAGE": IMG, "PYXIS_CONTAINER_WORKDIR": "/etc"})
    assert p.stdout.split() == ["/etc", "1"], p.stdout + p.stderr


@pytest.mark.parametrize("ref", ["docker://hpcctest/busybox:1", "docker.io#hpcctest/busybox:1",
                                 "someone@docker.io#hpcctest/busybox:1"])
def test_enroot_reference_forms(slurm_cluster, ref):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={ref}", "grep", "-c",
                          "hpcc test image", "/etc/os-release", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1"


def test_local_daemon_images_are_refused_in_one_line(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "--container-image=dockerd://ubuntu", "echo", "RAN",
                          user=U1)
    assert p.returncode == 125 and "RAN" not in p.stdout
    lines = hpcc_lines(p.stderr)
    assert len(lines) == 1 and "dockerd://" in lines[0] and "not supported" in lines[0]


def test_relative_image_path_is_the_jobs_working_directorys(slurm_cluster, slurm_site,
                                                            slurm_users):
    u = slurm_users[U1]
    work = os.path.join(u.pw_dir, f"imgdir-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    shutil.copy(slurm_site.images["other"].sqfs_path, os.path.join(work, "ubuntu.sqsh"))
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}", work], check=True)
    try:
        for image in ("ubuntu.sqsh", "./ubuntu.sqsh"):
            p = slurm_cluster.run("srun", "-n2", f"--chdir={work}", f"--container-image={image}",
                                  "grep", "-c", "hpcc other image", "/etc/os-release", user=U1)
            assert p.returncode == 0, (image, p.stderr)
            assert p.stdout.split() == ["1", "1"]
        p = slurm_cluster.run("srun", "-n1", f"--chdir={u.pw_dir}",
                              "--container-image=./nothere.sqsh", "true", user=U1)
        assert p.returncode == 125
        assert "nothere.sqsh does not exist in " + u.pw_dir in p.stderr, p.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_relative_mounts_are_the_steps_directorys_whatever_pwd_says(slurm_cluster,
                                                                    slurm_users):
    # The helper builds the spec early for the job's PWD; a step run elsewhere (--chdir)
    # must still get its own directory's files, and where PWD is right, the same ones.
    u = slurm_users[U1]
    work = os.path.join(u.pw_dir, f"pwd-{os.getpid()}")
    for d, text in (("a", "from a\n"), ("b", "from b\n")):
        os.makedirs(os.path.join(work, d, "sub"), exist_ok=True)
        with open(os.path.join(work, d, "sub", "f"), "w") as f:
            f.write(text)
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}", work], check=True)
    try:
        run = "--container-image=hpcctest/busybox:1 --container-mounts=./sub:/m cat /m/f"
        p = slurm_cluster.run("sh", "-c", f"cd {work}/a && srun -n1 {run} && "
                              f"srun -n1 --chdir={work}/b {run}", user=U1)
        assert (p.returncode, p.stdout) == (0, "from a\nfrom b\n"), p.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("args,opt", [
    (["--container-workdir="], "--container-workdir"),
    (["--container-env="], "--container-env"),
    (["--container-env=FOO,"], "--container-env"),
    (["--container-mounts="], "--container-mounts"),
    (["--container-name=bad:mode"], "--container-name"),
    (["--container-unshare=pid"], "--container-unshare"),
])
def test_bad_values_are_refused_by_srun_before_anything_runs(slurm_cluster, args, opt):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", *args, "echo", "RAN",
                          user=U1)
    assert p.returncode == 2 and "RAN" not in p.stdout   # a usage error
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr                     # one line, refused by srun itself
    assert lines[0].startswith(f"hpcc: {opt}"), lines


def test_bad_values_in_a_batch_script_are_refused_by_sbatch(slurm_cluster):
    p = slurm_cluster.run("sbatch", input="#!/bin/sh\n#SBATCH --container-env=A,,B\ntrue\n",
                          user=U1)
    assert p.returncode == 2 and "Submitted" not in p.stdout
    assert p.stderr.splitlines() == ["hpcc: --container-env=A,,B: an empty item (a stray "
                                     "comma); give NAME,NAME... without empty items"]


def test_bad_variable_values_fail_the_step_naming_the_variable(slurm_cluster):
    for var, value in (("PYXIS_CONTAINER_WORKDIR", ""), ("HPCC_CONTAINER_ENV", "A,,B"),
                       ("PYXIS_CONTAINER_REMAP_ROOT", "maybe")):
        p = slurm_cluster.run("srun", "-n2", f"--container-image={IMG}", "echo", "RAN",
                              user=U1, env={var: value})
        assert p.returncode == 125 and "RAN" not in p.stdout, var
        lines = hpcc_lines(p.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"hpcc: {var}"), (var, p.stderr)


def test_writable_and_readonly_contradict(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "--container-writable",
                          "--container-readonly", "echo", "RAN", user=U1)
    assert p.returncode == 125 and "RAN" not in p.stdout
    assert "--container-writable and --container-readonly" in p.stderr, p.stderr


def test_mount_flags_tmpfs_and_umount(slurm_cluster, slurm_site):
    d = slurm_site.root / "pyxis-mnt"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    (d / "f.txt").write_text("host file\n")
    shutil.copy("/usr/bin/busybox", d / "tool")
    os.chmod(d / "tool", 0o755)
    mounts = f"{d}:/ro:ro+rprivate,{d}:/nx:rw+noexec,{d}:/same,tmpfs:/scratch,umount:/tmp"
    script = ("cat /ro/f.txt; touch /ro/x 2>/dev/null || echo ro-ok; "
              "/nx/tool true 2>/dev/null || echo noexec-ok; /same/tool true && echo exec-ok; "
              "touch /scratch/y && echo tmpfs-ok; touch /tmp/z 2>/dev/null || echo no-tmp-ok")
    p = slurm_cluster.run("srun", "-n2", f"--container-image={IMG}",
                          f"--container-mounts={mounts}", "sh", "-c", script, user=U1)
    assert p.returncode == 0, p.stderr
    for word in ("host file", "ro-ok", "noexec-ok", "exec-ok", "tmpfs-ok", "no-tmp-ok"):
        assert p.stdout.count(word) == 2, (word, p.stdout)


@pytest.mark.parametrize("mounts,words", [
    ("{d}:/x:rshared", ["--container-mounts", "propagation 'rshared'", "refused",
                        "show on the host"]),
    ("{d}:/x:ro+bogus", ["--container-mounts", "unknown flag 'bogus'"]),
    ("umount:/nothing-here", ["--container-mounts", "nothing is mounted on /nothing-here"]),
    ("/nonexistent-src:/x", ["--container-mounts", "/nonexistent-src does not exist"]),
])
def test_bad_mounts_name_the_option(slurm_cluster, slurm_site, mounts, words):
    d = slurm_site.root
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}",
                          "--container-mounts=" + mounts.format(d=d), "echo", "RAN", user=U1)
    assert p.returncode == 125 and "RAN" not in p.stdout
    lines = hpcc_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines


def _wait_for(cond, timeout=30):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("flag", ["slave", "rslave+ro", "rprivate"])
def test_slave_bind_shows_what_the_host_mounts_below_it_later(slurm_cluster, slurm_site,
                                                             slurm_users, flag):
    """pyxis' `slave` propagation: a filesystem the host mounts below a bound directory
    while the step runs (an automounted project directory) shows inside; with the default
    (private) it does not, and nothing the container mounts shows on the host."""
    d = slurm_site.root / f"prop-{flag.replace('+', '-')}"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "prop", str(d)], check=True)
    out = slurm_site.root / f"prop-out-{flag.replace('+', '-')}"
    proc = None
    try:
        subprocess.run(["mount", "--make-shared", str(d)], check=True)
        (d / "sub").mkdir()
        out.mkdir(exist_ok=True)
        os.chown(out, slurm_users[U1].pw_uid, slurm_users[U1].pw_gid)
        # the task says it is ready, then waits (20 s at most) for the host's new mount
        script = (f"touch {out}/ready; i=0; while [ $i -lt 200 ]; do "
                  "[ -e /data/sub/marker ] && { echo seen; exit 0; }; "
                  "sleep 0.1; i=$((i+1)); done; echo not-seen")
        proc = subprocess.Popen(
            ["srun", "-n1", f"--container-image={IMG}",
             f"--container-mounts={d}:/data:{flag},{out}:{out}", "sh", "-c", script],
            env=slurm_cluster.env, user=U1, cwd="/tmp", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert _wait_for(lambda: (out / "ready").exists() or proc.poll() is not None)
        subprocess.run(["mount", "-t", "tmpfs", "later", str(d / "sub")], check=True)
        (d / "sub" / "marker").write_text("x\n")
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert stdout == ("not-seen\n" if flag == "rprivate" else "seen\n"), stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run(["umount", "-R", str(d)], capture_output=True)
        shutil.rmtree(out, ignore_errors=True)


def test_mount_source_the_user_cannot_read_is_refused(slurm_cluster, slurm_site):
    d = slurm_site.root / "root-only-src"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o700)
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}",
                          f"--container-mounts={d}:/x", "echo", "RAN", user=U1)
    assert p.returncode == 125 and "RAN" not in p.stdout
    assert hpcc_lines(p.stderr) == [f"hpcc: --container-mounts: you cannot read {d}"], p.stderr
    # the variable's name when the mounts came from it
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "echo", "RAN", user=U1,
                          env={"PYXIS_CONTAINER_MOUNTS": f"{d}:/x"})
    assert hpcc_lines(p.stderr) == [f"hpcc: PYXIS_CONTAINER_MOUNTS: you cannot read {d}"]


def test_locale_reaches_the_container_only_when_named(slurm_cluster, outdir):
    env = {"LANG": "xx_YY.UTF-8", "LC_ALL": "xx_YY.UTF-8", "LANGUAGE": "xx"}
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "sh", "-c",
                          "echo L=${LANG-unset} A=${LC_ALL-unset} G=${LANGUAGE-unset}",
                          user=U1, env=env)
    assert p.stdout.split() == ["L=unset", "A=unset", "G=unset"], p.stderr
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "--container-env=LANG",
                          "sh", "-c", "echo L=${LANG-unset} A=${LC_ALL-unset}",
                          user=U1, env=env)
    assert p.stdout.split() == ["L=xx_YY.UTF-8", "A=unset"], p.stderr
    # the same for a batch script
    script = f"#!/bin/sh\n#SBATCH --container-image={IMG}\necho L=${{LANG-unset}}\n"
    _, text = submit(slurm_cluster, script, outdir / "o.txt", "--export=ALL,LANG=xx_YY.UTF-8")
    assert "L=unset" in text, text


def test_no_container_mount_home(slurm_cluster, slurm_users):
    home = slurm_users[U1].pw_dir
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "sh", "-c",
                          f"test -d {home} && echo home || echo nohome", user=U1)
    assert p.stdout.strip() == "home", p.stderr
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "--no-container-mount-home",
                          "--chdir=/tmp", "sh", "-c",
                          f"test -d {home} && echo home || echo nohome", user=U1)
    assert p.stdout.strip() == "nohome", p.stderr


def test_remap_root_is_uid_0_inside_and_the_user_outside(slurm_cluster, slurm_users):
    u = slurm_users[U1]
    mark = os.path.join(u.pw_dir, f"remapped-{os.getpid()}")
    try:
        p = slurm_cluster.run("srun", "-n2", f"--container-image={IMG}",
                              "--container-remap-root", "sh", "-c",
                              f"id -u; id -g; touch {mark}", user=U1)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["0", "0", "0", "0"], p.stdout
        # what root inside made is the user's outside (uid; the gid is the job's)
        assert os.stat(mark).st_uid == u.pw_uid
        # and nothing more: the host's root-owned files stay out of reach
        p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}",
                              "--container-remap-root", "sh", "-c",
                              "cat /proc/1/environ >/dev/null 2>&1 && echo LEAK; "
                              "grep -E '^(NoNewPrivs|CapEff)' /proc/self/status", user=U1)
        assert "LEAK" not in p.stdout and "NoNewPrivs:\t1" in p.stdout, p.stdout + p.stderr
        p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}",
                              "--no-container-remap-root", "id", "-u", user=U1)
        assert p.stdout.strip() == str(u.pw_uid)
    finally:
        if os.path.exists(mark):
            os.unlink(mark)


def test_unshare_gives_the_step_its_own_namespaces(slurm_cluster):
    probe = "for n in net ipc uts; do readlink /proc/self/ns/$n; done"
    host = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "sh", "-c", probe,
                             user=U1)
    assert host.returncode == 0, host.stderr
    p = slurm_cluster.run("srun", "-n2", f"--container-image={IMG}",
                          "--container-unshare=net,uts", "sh", "-c", probe, user=U1)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    net, ipc, uts = host.stdout.split()
    assert lines.count(net) == 0 and lines.count(uts) == 0, (host.stdout, p.stdout)
    assert lines.count(ipc) == 2          # not asked for: the host's
    # both tasks of the node share the step's namespaces
    assert len(set(lines)) == 3, p.stdout


def test_negative_options_are_accepted_as_the_defaults(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}",
                          "--no-container-remap-root", "--no-container-entrypoint",
                          "--container-readonly", "id", "-u", user=U1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() != "0"


def test_relative_container_save_is_the_jobs_directorys_and_runs_again(slurm_cluster,
                                                                        slurm_site,
                                                                        slurm_users):
    import tempfile
    import time

    u = slurm_users[U1]
    # the image where root kernel-mounts it (a root-only chain): writable for the user
    d = tempfile.mkdtemp(prefix="hpcc-pyxis-site-", dir="/run")
    os.chmod(d, 0o755)
    image = os.path.join(d, "busybox.sqfs")
    shutil.copy(slurm_site.images["busybox"].sqfs_path, image)
    os.chmod(image, 0o644)
    work = os.path.join(u.pw_dir, f"savedir-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    os.chown(work, u.pw_uid, u.pw_gid)
    saved = os.path.join(work, "saved.sqsh")
    try:
        p = slurm_cluster.run("srun", "-n1", f"--chdir={work}", f"--container-image={image}",
                              "--container-writable", "--container-save=saved.sqsh", "sh", "-c",
                              "echo kept > /kept", user=U1)
        assert p.returncode == 0, p.stderr
        for _ in range(100):  # written by the helper once the step has ended
            if os.path.exists(saved):
                break
            time.sleep(0.1)
        assert os.stat(saved).st_uid == u.pw_uid
        p = slurm_cluster.run("srun", "-n1", f"--chdir={work}",
                              "--container-image=./saved.sqsh", "cat", "/kept", user=U1)
        assert p.stdout.strip() == "kept", p.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


def test_hook_messages_name_the_srun_option(slurm_cluster):
    # the MPI hook speaks of hpcc run's --mpi; under srun the user typed --container-mpi
    p = slurm_cluster.run("srun", "-n1", f"--container-image={IMG}", "--container-mpi", "true",
                          user=U1)
    assert p.returncode == 125
    lines = hpcc_lines(p.stderr)
    assert len(lines) == 1 and "--container-mpi:" in lines[0], p.stderr
    assert " --mpi" not in lines[0]


def test_an_image_from_the_environment_names_its_variable(slurm_cluster):
    p = slurm_cluster.run("srun", "-n1", "echo", "RAN", user=U1,
                          env={"PYXIS_CONTAINER_IMAGE": "hpcctest/left-over:1"})
    assert p.returncode == 125 and "RAN" not in p.stdout
    lines = hpcc_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hpcc: PYXIS_CONTAINER_IMAGE=hpcctest/left-over:1: image "), lines


ENTRY_SH = """#!/bin/sh
echo "entrypoint ran as $(id -u) with $*"
echo "uid=$(id -u) args=$*" >> /tmp/entrypoint-ran
[ -e /etc/fail-entrypoint ] && { echo "entrypoint refuses"; exit 7; }
exec "$@"
"""


@pytest.fixture(scope="module")
def entrypoint_images(slurm_site):
    """Site images whose ENTRYPOINT leaves a mark in the container's /tmp and prints a line;
    "entry-fail:1" has one that fails (status 7)."""
    from tests.fixtures.slurm import busybox_tree, publish_tree

    config = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Entrypoint": ["/entry.sh"],
              "Cmd": ["sh"]}
    for name, extra in (("entry", {}), ("entry-fail", {"etc/fail-entrypoint": "1\n"})):
        tree = busybox_tree(slurm_site.root / f"tree-{name}", files={"entry.sh": ENTRY_SH,
                                                                    **extra})
        os.chmod(tree / "entry.sh", 0o755)
        publish_tree(slurm_site.store, tree, [f"hpcctest/{name}:1"], config=config)
    return "hpcctest/entry:1", "hpcctest/entry-fail:1"


def test_container_entrypoint_runs_once_per_node_before_the_tasks(slurm_cluster,
                                                                  entrypoint_images,
                                                                  slurm_users):
    img = entrypoint_images[0]
    uid = slurm_users[U1].pw_uid
    # pyxis' default: the ENTRYPOINT does not run, the command runs as given
    p = slurm_cluster.run("srun", "-n1", f"--container-image={img}", "sh", "-c",
                          "cat /tmp/entrypoint-ran 2>/dev/null || echo no-entrypoint",
                          user=U1)
    assert (p.returncode, p.stdout) == (0, "no-entrypoint\n"), p.stderr
    assert "entrypoint ran" not in p.stderr
    # asked for: it ran once on the node, as the job user, with `true` as its command, in the
    # container the two tasks then share; its output is dropped without -log
    for env in ({}, {"PYXIS_CONTAINER_ENTRYPOINT": "1"}):
        opts = ["--container-entrypoint"] if not env else []
        p = slurm_cluster.run("srun", "-n2", f"--container-image={img}", *opts, "sh", "-c",
                              "cat /tmp/entrypoint-ran", user=U1, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [f"uid={uid} args=true"] * 2, p.stdout + p.stderr
        assert "entrypoint ran" not in p.stdout + p.stderr
    # --no-container-entrypoint wins over the variable
    p = slurm_cluster.run("srun", "-n1", f"--container-image={img}",
                          "--no-container-entrypoint", "sh", "-c",
                          "test -e /tmp/entrypoint-ran && echo ran || echo not-run", user=U1,
                          env={"HPCC_CONTAINER_ENTRYPOINT": "1"})
    assert p.stdout == "not-run\n", p.stderr


def test_container_entrypoint_log_shows_its_output_to_the_user(slurm_cluster,
                                                               entrypoint_images,
                                                               slurm_users):
    img = entrypoint_images[0]
    uid = slurm_users[U1].pw_uid
    p = slurm_cluster.run("srun", "-n1", f"--container-image={img}", "--container-entrypoint",
                          "--container-entrypoint-log", "echo", "task-ran", user=U1)
    assert (p.returncode, p.stdout) == (0, "task-ran\n"), p.stderr
    assert f"entrypoint ran as {uid} with true" in p.stderr.splitlines()
    # the same through the environment, in an allocation's step
    p = slurm_cluster.run("salloc", "-n1", "srun", "-n1", f"--container-image={img}", "true",
                          user=U1, env={"PYXIS_CONTAINER_ENTRYPOINT": "1",
                                        "PYXIS_CONTAINER_ENTRYPOINT_LOG": "1"})
    assert p.returncode == 0, p.stderr
    assert f"entrypoint ran as {uid} with true" in p.stderr.splitlines()


def test_a_failing_entrypoint_fails_the_step_in_one_line(slurm_cluster, entrypoint_images):
    p = slurm_cluster.run("srun", "-n1", f"--container-image={entrypoint_images[1]}",
                          "--container-entrypoint", "echo", "TASK-RAN", user=U1)
    assert p.returncode != 0 and "TASK-RAN" not in p.stdout
    lines = hpcc_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    assert "entrypoint failed (status 7)" in lines[0] and "entrypoint refuses" in lines[0]
    assert "--no-container-entrypoint" in p.stderr


PYXIS_ARGS = ("runtime_path=/run/pyxis execute_entrypoint=1 container_scope=global "
              "sbatch_support=0 use_enroot_load=0 importer=/usr/share/pyxis/importer.sh "
              "use_squashfuse=0")


@pytest.fixture(scope="module")
def pyxis_line_cluster(slurm_site):
    """A cluster whose plugstack line keeps pyxis' own arguments, as a site that swapped
    spank_pyxis.so for spank_hpcc.so and left the rest of the line as it was."""
    import tempfile
    from pathlib import Path

    from hpcc.testkit.slurmcluster import SlurmCluster
    d = Path(tempfile.mkdtemp(prefix="slurm-pyxisline-", dir=slurm_site.root))
    c = SlurmCluster(d, nodes=1,
                     plugstack_lines=[slurm_site.plugstack_line() + " " + PYXIS_ARGS])
    c.start()
    yield c
    c.stop()


def test_pyxis_plugstack_arguments_are_taken_as_site_defaults(pyxis_line_cluster,
                                                               entrypoint_images,
                                                               slurm_users):
    """execute_entrypoint=1: the ENTRYPOINT runs unless the user says no; container_scope=
    global: a named container outlives its job (kept per user on the node);
    sbatch_support=0: the options are srun's only; runtime_path=, use_enroot_load=,
    importer=, use_squashfuse= mean nothing with hpcc and are accepted without a word."""
    c = pyxis_line_cluster
    uid = slurm_users[U1].pw_uid
    img = entrypoint_images[0]
    p = c.run("srun", "-n1", f"--container-image={img}", "cat", "/tmp/entrypoint-ran",
              user=U1)
    assert (p.returncode, p.stdout) == (0, f"uid={uid} args=true\n"), p.stderr
    assert "plugstack" not in p.stderr and "error" not in p.stderr, p.stderr
    p = c.run("srun", "-n1", f"--container-image={img}", "--no-container-entrypoint", "sh",
              "-c", "test -e /tmp/entrypoint-ran && echo ran || echo not-run", user=U1)
    assert p.stdout == "not-run\n", p.stderr
    try:
        p = c.run("srun", "-n1", "--container-image=hpcctest/busybox:1",
                  "--container-name=kept", "sh", "-c", "echo from-job-1 > /kept", user=U1)
        assert p.returncode == 0, p.stderr
        p = c.run("srun", "-n1", "--container-image=hpcctest/busybox:1",
                  "--container-name=kept", "cat", "/kept", user=U1)
        assert (p.returncode, p.stdout) == (0, "from-job-1\n"), p.stderr
    finally:
        shutil.rmtree(f"/run/hpcc-containers/user-{uid}", ignore_errors=True)
    p = c.run("sbatch", "--container-image=hpcctest/busybox:1", "--wrap", "true", user=U1)
    assert p.returncode != 0 and "unrecognized option" in p.stderr, p.stderr


def test_bad_pyxis_plugstack_argument_is_one_line_and_the_rest_works(slurm_site):
    """A value pyxis would refuse (container_scope=sometimes) is one error line naming the
    argument; the plugin still loads and runs containers with hpcc's defaults."""
    import tempfile
    from pathlib import Path

    from hpcc.testkit.slurmcluster import SlurmCluster
    d = Path(tempfile.mkdtemp(prefix="slurm-badline-", dir=slurm_site.root))
    c = SlurmCluster(d, nodes=1, plugstack_lines=[
        slurm_site.plugstack_line() + " container_scope=sometimes"])
    c.start()
    try:
        p = c.run("srun", "-n1", "--container-image=hpcctest/busybox:1", "echo", "ran",
                  user=U1)
        assert (p.returncode, p.stdout) == (0, "ran\n"), p.stderr
        bad = [ln for ln in p.stderr.splitlines() if "container_scope=sometimes" in ln]
        assert bad and "expected job or global" in bad[0], p.stderr
    finally:
        c.stop()
