"""Rule E (docs/launcher.md): root takes nothing from the job's environment except the
documented --container-* / HPCC_CONTAINER_* / PYXIS_CONTAINER_* values, each validated.

The attack: an unprivileged user submits a step whose environment carries every lever a
Python program or the dynamic linker of a root process would honour: LD_PRELOAD and
LD_LIBRARY_PATH naming a library of theirs, PYTHONPATH with a sitecustomize and a package
shadowing `hpcc`, PYTHONSTARTUP, PYTHONHOME, PYTHONINSPECT, HPCC_CONFIG naming a config of
theirs that binds a host directory into the container, HPCC_STORE naming a store of theirs, and
SLURM_CONF (also checked, with Slurm's own binds, in tests/test_slurm_job_input.py). Each
planted piece writes a marker when it runs with euid 0. The step must run in the image
from the site store, without /root, and no marker may appear.
"""
import os
import shutil
import subprocess
import tempfile

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1 = "slurmuser1"
IMG = "hpcctest/busybox:1"

EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void)
{
    char p[512];
    if (geteuid() != 0)
        return;
    snprintf(p, sizeof(p), "%s/root-ran-ld-preload-%d", MARKDIR, (int)getpid());
    int fd = open(p, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0)
        close(fd);
}
"""

EVIL_PY = """import os
if os.geteuid() == 0:
    open(os.path.join({markdir!r}, "root-ran-{what}-%d" % os.getpid()), "w").close()
"""


@pytest.fixture
def planted(slurm_users):
    """A directory of the user's with every planted piece, and a 0777 marker directory."""
    u = slurm_users[U1]
    top = tempfile.mkdtemp(prefix="hpcc-jobenv-", dir="/tmp")
    os.chmod(top, 0o755)
    marks = os.path.join(top, "marks")
    os.mkdir(marks)
    os.chmod(marks, 0o777)
    mine = os.path.join(top, "user")
    os.mkdir(mine)
    lib = os.path.join(mine, "libplanted.so")
    src = os.path.join(mine, "planted.c")
    with open(src, "w") as f:
        f.write(EVIL_C)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKDIR="{marks}"', "-o", lib, src],
                   check=True, capture_output=True)
    pypath = os.path.join(mine, "py")
    os.makedirs(os.path.join(pypath, "hpcc"))
    for rel, what in (("sitecustomize.py", "sitecustomize"), ("usercustomize.py", "usercustomize"),
                      ("hpcc/__init__.py", "shadow-hpcc"), ("startup.py", "pythonstartup")):
        with open(os.path.join(pypath, rel), "w") as f:
            f.write(EVIL_PY.format(markdir=marks, what=what))
    hostonly = os.path.join(top, "hostonly")
    os.mkdir(hostonly)
    open(os.path.join(hostonly, "probe"), "w").close()
    conf = os.path.join(mine, "hpcc.toml")
    with open(conf, "w") as f:
        f.write(f'[store]\npath = "{mine}/store"\n'
                f'[launcher]\nbinds = ["{hostonly}"]\n')
    os.makedirs(os.path.join(mine, "store"))
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}", mine], check=True)
    env = {
        "LD_PRELOAD": lib,
        "LD_LIBRARY_PATH": mine,
        "PYTHONPATH": pypath,
        "PYTHONSTARTUP": os.path.join(pypath, "startup.py"),
        "PYTHONHOME": mine,
        "PYTHONINSPECT": "1",
        "PYTHONUSERBASE": mine,
        "HPCC_CONFIG": conf,
        "HPCC_STORE": os.path.join(mine, "store"),
        "SLURM_CONF": conf,   # not a slurm.conf at all: root must not read it
    }
    yield env, marks, hostonly
    shutil.rmtree(top, ignore_errors=True)


def test_the_job_environment_reaches_no_root_code(slurm_cluster, planted):
    env, marks, hostonly = planted
    # SLURM_CONF is the cluster's for the client itself (srun must reach the controller);
    # the planted one travels in the job's environment through --export.
    client_env = {k: v for k, v in env.items() if k != "SLURM_CONF"}
    p = slurm_cluster.run(
        "srun", "-n2", f"--container-image={IMG}",
        f"--export=ALL,SLURM_CONF={env['SLURM_CONF']}",
        "sh", "-c",
        "grep -c 'hpcc test image' /etc/os-release; "
        f"test -e {hostonly}/probe && echo hostdir-bound; "
        "echo uid=$(id -u)",
        user=U1, env=client_env, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout.split()
    assert out.count("1") == 2, p.stdout + p.stderr        # both tasks in the site image
    assert "hostdir-bound" not in out, p.stdout           # the user's HPCC_CONFIG was ignored
    uid = str(__import__("pwd").getpwnam(U1).pw_uid)
    assert out.count(f"uid={uid}") == 2, p.stdout
    assert os.listdir(marks) == [], f"root ran a planted piece: {os.listdir(marks)}"


def test_the_planted_pieces_do_run_in_a_root_process_that_honours_them(planted):
    """The control: the same environment given to root programs that honour it does leave
    markers, so an empty marker directory above means root ignored it."""
    env, marks, _ = planted
    full = dict(os.environ)
    full.update({k: env[k] for k in ("LD_PRELOAD", "PYTHONPATH")})
    subprocess.run(["/bin/true"], env=full, check=True)
    subprocess.run(["/usr/bin/python3", "-c", "import hpcc"], env=full, check=True, cwd="/")
    found = sorted(n.rsplit("-", 1)[0] for n in os.listdir(marks))
    assert "root-ran-ld-preload" in found
    assert "root-ran-sitecustomize" in found
    assert "root-ran-shadow-hpcc" in found
