"""Hostile images and mount requests: nothing may land outside the container root, nothing is
created on the host, and a bind source the user cannot read is refused."""
import hashlib
import os
import subprocess

import pytest

from tests.fixtures.launcher_images import run_hpcc

pytestmark = pytest.mark.root


def hpcc(launcher_env, who, *args, **kw):
    return run_hpcc(args, user=who, config=launcher_env["HPCC_CONFIG"], **kw)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _host_mounts():
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_tmp_symlink_to_etc_mounts_inside_the_root(images, launcher_env, who):
    before = os.listdir("/etc")
    mounts = _host_mounts()
    p = hpcc(launcher_env, who, "exec", images["tmp_to_etc"], "sh", "-c",
             "echo probe > /tmp/probe && cat /tmp/probe && ls -d /etc/probe")
    # the tmpfs for /tmp landed on the container's own /etc (inside the root)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "probe\n/etc/probe\n"
    assert os.listdir("/etc") == before and not os.path.exists("/etc/probe")
    assert _host_mounts() == mounts


def test_tmp_symlink_climbing_out_stays_inside(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["tmp_dotdot"], "sh", "-c",
             "echo x > /tmp/f && echo ok")
    assert not os.path.exists("/opt/hpcc-escape")
    # the dangling link resolves inside the root; the mount point there is created in tmpfs
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ok\n"


def test_passwd_symlink_to_host_shadow_is_replaced_not_followed(images, launcher_env, who):
    shadow = _digest("/etc/shadow")
    p = hpcc(launcher_env, who, "exec", images["passwd_link"], "sh", "-c",
             "cat /etc/passwd")
    assert p.returncode == 0, p.stderr
    assert f"{who or 'root'}:x:" in p.stdout
    assert _digest("/etc/shadow") == shadow


def test_symlinked_workdir_resolves_inside_the_container(images, launcher_env, who):
    p = hpcc(launcher_env, who, "run", "--no-cwd", images["workdir_link"])
    assert p.returncode == 0, p.stderr
    # /work -> ../../../etc resolves to the container's /etc, never the host's
    assert p.stdout == "/etc\n"
    p = hpcc(launcher_env, who, "exec", "--no-cwd", images["workdir_link"], "sh", "-c",
             "ls /work/passwd && grep -c hpcctest /work/group >/dev/null; echo $?")
    assert p.stdout.startswith("/work/passwd")


def test_dev_symlink_to_host_etc_stays_inside(images, launcher_env, who):
    before = os.listdir("/etc")
    p = hpcc(launcher_env, who, "exec", images["dev_link"], "sh", "-c",
             "test -c /dev/null && echo null-ok")
    assert os.listdir("/etc") == before
    assert not os.path.exists("/etc/null") and not os.path.exists("/etc/pts")
    assert p.returncode == 0 and p.stdout == "null-ok\n", p.stderr


def test_bind_target_with_dotdot_lands_inside(images, launcher_env, who, shared_dir):
    src = os.path.join(shared_dir, "src")
    os.mkdir(src)
    os.chmod(src, 0o755)
    p = hpcc(launcher_env, who, "exec", "--mount", f"{src}:../../x", images["base"], "true")
    assert p.returncode == 2 and "absolute path" in p.stderr
    p = hpcc(launcher_env, who, "exec", "--mount", f"{src}:/../../x", images["base"], "sh",
             "-c", "ls -d /x")
    assert p.returncode == 0 and p.stdout == "/x\n", p.stderr
    assert not os.path.exists("/x")


def test_missing_mount_point_is_never_created_on_the_host(images, launcher_env, who,
                                                         shared_dir):
    src = os.path.join(shared_dir, "src")
    os.mkdir(src)
    os.chmod(src, 0o755)
    host_dir = os.path.join(shared_dir, "bound")
    os.mkdir(host_dir)
    os.chmod(host_dir, 0o777)
    p = hpcc(launcher_env, who, "exec", "--mount", f"{host_dir}:/b",
             "--mount", f"{src}:/b/sub/dir", images["base"], "true")
    assert p.returncode == 125
    assert "would have to be created on a host directory" in p.stderr
    assert os.listdir(host_dir) == []


def test_bind_source_the_user_cannot_read_is_refused(images, launcher_env, test_user,
                                                    shared_dir):
    secret = os.path.join(shared_dir, "secret")
    os.mkdir(secret, 0o700)  # owned by root
    for who in (test_user.pw_name, None):
        args = ["exec", "--mount", f"{secret}:/s", images["base"], "ls", "/s"]
        if who is None:  # root launching for the user
            args[1:1] = ["--user", test_user.pw_name]
        p = run_hpcc(args, user=who, config=launcher_env["HPCC_CONFIG"])
        assert p.returncode == 125, (who, p.stderr)
        assert "secret" in p.stderr and ("cannot read" in p.stderr
                                         or "Permission denied" in p.stderr)


def test_unusable_dev_fuse_is_explained_in_one_line(images, launcher_env, test_user):
    # In a private mount namespace, /dev/fuse is replaced by a root-only file.
    hp = os.path.join(os.path.dirname(__import__("sys").executable), "hpcc")
    script = (f"touch /run/hpcc-fake-fuse-$$ && chmod 600 /run/hpcc-fake-fuse-$$ && "
              f"mount --bind /run/hpcc-fake-fuse-$$ /dev/fuse && rm /run/hpcc-fake-fuse-$$ && "
              f"HPCC_CONFIG={launcher_env['HPCC_CONFIG']} "
              f"setpriv --reuid={test_user.pw_uid} --regid={test_user.pw_gid} --clear-groups "
              f"{hp} exec {images['base']} true")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert p.returncode == 125
    assert p.stderr.count("\n") == 1
    assert "cannot open /dev/fuse (permission denied)" in p.stderr
    assert "chmod 0666 /dev/fuse" in p.stderr


def test_staging_name_taken_by_another_user_does_not_block_launches(images, launcher_env,
                                                                    test_user):
    stage = f"/tmp/hpcc-{test_user.pw_uid}"
    moved = None
    if os.path.lexists(stage):
        moved = stage + ".saved-by-test"
        os.rename(stage, moved)
    try:
        os.symlink("/etc", stage)  # another user's trap: a symlink where the dir would be
        p = run_hpcc(["exec", images["base"], "echo", "ok"], user=test_user.pw_name,
                     config=launcher_env["HPCC_CONFIG"])
        assert p.returncode == 0 and p.stdout == "ok\n", p.stderr
        assert os.path.isdir(os.path.join(test_user.pw_dir, ".cache", "hpcc", "stage"))
    finally:
        os.unlink(stage)
        if moved:
            os.rename(moved, stage)
