"""The runtime API on its own, as the Slurm helper uses it: a root process enters a fresh
mount namespace, calls setup_root, and another process joins that namespace (setns) and
sees only the container."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from hpcc.runtime import build_spec
from hpcc.runtime.spec import command_args, parse_mount

SETUP = textwrap.dedent("""
    import json, os, sys
    from hpcc.runtime import build_spec, enter_namespaces, setup_root
    class Img:
        sqfs_path = sys.argv[1]; digest = ""; meta = {}
    cfg = {"launcher": {"binds": [], "mount_home": False, "mount_cwd": False,
                        "devices": [], "env_passthrough": [], "hooks_dir": ""}}
    spec = build_spec(Img(), mode="exec", command=["true"], config=cfg,
                      user=sys.argv[2], privileged=True)
    enter_namespaces(True)
    handle = setup_root(spec, True)
    print(json.dumps({"pid": os.getpid(), "fuse": handle.fuse_pid}), flush=True)
    sys.stdin.read()  # keep the namespace until the test is done
""")


@pytest.mark.root
def test_setup_root_namespace_can_be_joined_by_another_process(images, test_user):
    proc = subprocess.Popen([sys.executable, "-c", SETUP, images["base"], test_user.pw_name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        ns = f"/proc/{info['pid']}/ns/mnt"
        # what slurmstepd does for each task: setns into the namespace, then drop to the user
        p = subprocess.run(["nsenter", f"--mount={ns}", f"--setuid={test_user.pw_uid}",
                            f"--setgid={test_user.pw_gid}", "--", "/bin/sh", "-c",
                            "cd /; ls /; grep hpcctest /etc/passwd; id -u; touch /x 2>&1"],
                           capture_output=True, text=True, timeout=30)
        top = p.stdout.split("\n")
        assert "bin" in top and "work" not in top
        assert any(line.startswith("hpcctest:x:") for line in top)
        assert str(test_user.pw_uid) in top
        assert "Read-only file system" in p.stdout + p.stderr
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert proc.returncode == 0


class _Img:
    sqfs_path = "/images/x.sqfs"
    digest = "sha256:" + "0" * 64
    meta = {"config": {"Env": ["A=1", "PATH=/opt/bin"], "Entrypoint": ["/ep"],
                       "Cmd": ["c1"], "WorkingDir": "/wd"}}


CFG = {"launcher": {"binds": [], "mount_home": False, "mount_cwd": False, "devices": [],
                    "env_passthrough": ["TERM"], "hooks_dir": ""}}


def test_build_spec_is_oci_shaped():
    spec = build_spec(_Img(), config=CFG, privileged=False, host_env={"TERM": "xterm"},
                      annotations={"k": "v"}, cwd="/")
    assert spec["ociVersion"].startswith("1.")
    pr = spec["process"]
    assert pr["args"] == ["/ep", "c1"] and pr["cwd"] == "/wd"
    assert pr["noNewPrivileges"] is True
    assert all(v == [] for v in pr["capabilities"].values())
    assert pr["user"]["uid"] == os.getuid()
    assert "A=1" in pr["env"] and "PATH=/opt/bin" in pr["env"] and "TERM=xterm" in pr["env"]
    assert spec["root"] == {"path": "", "readonly": True}
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests[:3] == ["/proc", "/sys", "/dev"] and "/tmp" in dests and "/dev/shm" in dests
    assert spec["annotations"]["k"] == "v"
    assert spec["annotations"]["org.hpcc.image"] == "/images/x.sqfs"
    assert {"type": "user"} in spec["linux"]["namespaces"]
    json.dumps(spec)  # serialisable as config.json


def test_entrypoint_cmd_rules():
    c = _Img.meta["config"]
    assert command_args("run", c, [], None) == ["/ep", "c1"]
    assert command_args("run", c, ["x"], None) == ["/ep", "x"]
    assert command_args("run", c, [], "/other") == ["/other"]
    assert command_args("run", c, ["y"], "") == ["y"]
    assert command_args("exec", c, ["z"], None) == ["z"]


def test_mount_option_parsing():
    assert parse_mount("/a:/b:ro", cwd="/") == ("/a", "/b", True)
    assert parse_mount("/a:/b", cwd="/") == ("/a", "/b", False)
    assert parse_mount("/a", cwd="/") == ("/a", "/a", False)
    assert parse_mount("rel:/b/../c", cwd="/w") == ("/w/rel", "/c", False)
    assert parse_mount("/a:/../../x", cwd="/") == ("/a", "/x", False)


@pytest.mark.root
def test_privileged_fuse_mount_outlives_the_setup_process(images, test_user, shared_dir):
    """A user's own image is FUSE-mounted even as root; the daemon must serve the namespace
    after the helper that called setup_root has exited, and go when the namespace goes."""
    import shutil
    import time
    mine = os.path.join(shared_dir, "mine.sqfs")
    shutil.copy(images["base"], mine)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    proc = subprocess.Popen([sys.executable, "-c", SETUP, mine, test_user.pw_name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    info = json.loads(proc.stdout.readline())
    assert info["fuse"], "a user's image must not be kernel-mounted"
    # a task joins the namespace and keeps it alive; then the helper exits
    holder = subprocess.Popen(["nsenter", f"--mount=/proc/{info['pid']}/ns/mnt", "--",
                               "/bin/sh", "-c", "read x; cat /etc/passwd >/dev/null && "
                               "/bin/busybox echo still-served"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.stdin.close()
    proc.wait(timeout=10)
    out, _ = holder.communicate("go\n", timeout=20)
    assert out == "still-served\n"
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{info['fuse']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with open(f"/proc/{info['fuse']}/stat") as f:
            state = f.read().split(") ")[1][0]
    except OSError:
        state = "gone"
    assert state in ("gone", "Z")
