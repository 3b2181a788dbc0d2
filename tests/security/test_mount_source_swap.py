"""Rule U (docs/launcher.md): a user's bind source is opened by path once, with the user's own
rights (under Slurm, root switches to the user's uid, gid and groups for it), and everything
after uses that file descriptor. A symlink on the source path that the user swaps back and
forth while containers start can only ever bind what the user could open themselves.

The attack: for 10 s the user flips ~/link between their own directory and a directory
root can reach but the user cannot (its parent is 0700 root), while steps bind ~/link."""
import os
import shutil
import subprocess
import tempfile

import pytest

pytestmark = [pytest.mark.root]

IMG = "hpcctest/busybox:1"
U1 = "slurmuser1"
SECRET = "TOPSECRET-hpcc-probe"
SWAP_SECONDS = 10


@pytest.fixture
def swap_setup(slurm_users):
    u = slurm_users[U1]
    hidden = tempfile.mkdtemp(prefix="hpcc-swap-", dir="/var/lib")  # 0700, root
    inner = os.path.join(hidden, "inner")
    os.mkdir(inner, 0o755)
    with open(os.path.join(inner, "secret.txt"), "w") as f:
        f.write(SECRET + "\n")
    os.chmod(os.path.join(inner, "secret.txt"), 0o644)
    home = u.pw_dir
    mine = os.path.join(home, "swap-mine")
    os.makedirs(mine, exist_ok=True)
    with open(os.path.join(mine, "mine.txt"), "w") as f:
        f.write("mine\n")
    link = os.path.join(home, "swap-link")
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}", mine], check=True)
    # the user's swapper: atomic renames of a fresh symlink over ~/swap-link, for 10 s
    script = (f'end=$(( $(date +%s) + {SWAP_SECONDS} )); '
              f'while [ $(date +%s) -lt $end ]; do '
              f'ln -sfn {mine} {link}.a && mv -T {link}.a {link}; '
              f'ln -sfn {inner} {link}.b && mv -T {link}.b {link}; done')
    swapper = subprocess.Popen(["sh", "-c", script], user=u.pw_uid, group=u.pw_gid,
                               extra_groups=[], cwd=home)
    yield u, link, swapper
    swapper.kill()
    swapper.wait()
    shutil.rmtree(hidden)
    shutil.rmtree(mine, ignore_errors=True)
    for p in (link, link + ".a", link + ".b"):
        if os.path.lexists(p):
            os.unlink(p)


def _runs_until_swapper_ends(swapper, run):
    outs = []
    while swapper.poll() is None or not outs:
        outs.append(run())
    return outs


@pytest.mark.slurm
@pytest.mark.parametrize("flags", ["", ":slave"])
def test_swapped_symlink_on_a_bind_source_under_srun(slurm_cluster, swap_setup, flags):
    """Also with `slave`, where root clones the source again, by path, from the host's mount
    namespace: the clone must be the object the user opened, or the step fails."""
    u, link, swapper = swap_setup
    outs = _runs_until_swapper_ends(swapper, lambda: slurm_cluster.run(
        "srun", "-n1", f"--container={IMG}", f"--container-mounts={link}:/b{flags}",
        "sh", "-c", "cat /b/* 2>&1", user=U1, timeout=60))
    assert len(outs) >= 3
    for p in outs:
        assert SECRET not in p.stdout + p.stderr, "rule U: root bound what the user cannot open"
        assert "Traceback" not in p.stderr
        assert p.returncode == 0 and "mine" in p.stdout or p.returncode != 0 and \
            "hpcc:" in p.stderr, (p.returncode, p.stdout, p.stderr)


def test_swapped_symlink_on_a_bind_source_rootless(swap_setup, images, launcher_env):
    from tests.fixtures.launcher_images import run_hpcc
    u, link, swapper = swap_setup
    outs = _runs_until_swapper_ends(swapper, lambda: run_hpcc(
        ["exec", "--no-home", "--no-cwd", "--mount", f"{link}:/b", images["base"], "sh", "-c",
         "cat /b/* 2>&1"], user=u.pw_name, config=launcher_env["HPCC_CONFIG"]))
    assert len(outs) >= 3
    for p in outs:
        assert SECRET not in p.stdout + p.stderr, "rule U: a bind reached what the user cannot"
        assert "Traceback" not in p.stderr
