"""A launch leaves nothing behind: no mount, FUSE daemon, loop device or temp dir, also after
200 launches in a row and after kill -9 of hpcc or of the command."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.fixtures.launcher_images import run_hpcc

pytestmark = pytest.mark.root
HPCC = os.path.join(os.path.dirname(sys.executable), "hpcc")


def _children(pid):
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _squashfuse_of(uid, image_dir=None):
    """hpcc's squashfuse_ll daemons running as uid (serving an image under image_dir: other
    tests' daemons on a shared machine do not count)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _comm(d) == "squashfuse_ll":
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    ours = f.read().split(b"\0")[2:4] == [b"/dev/fd/4", b"/dev/fd/3"]
                if ours and image_dir is not None:
                    ours = os.readlink(f"/proc/{d}/fd/4").startswith(image_dir + "/")
                if ours and os.stat(f"/proc/{d}").st_uid == uid:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _loops_of(image_dir):
    out = []
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(bf) as f:
                if f.read().startswith(image_dir):
                    out.append(bf)
        except OSError:
            pass
    return out


def _wait_until(cond, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _our_mounts(image_dir, stage):
    """Host mounts of this test's images or staging dir (other tests may mount meanwhile)."""
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if image_dir in ln or stage in ln]


def _stage_of(who, uid):
    return "/run/hpcc" if who is None else f"/tmp/hpcc-{uid}"


def test_no_leftovers_after_200_sequential_launches(images, launcher_env, who, test_user):
    uid = 0 if who is None else test_user.pw_uid
    image_dir = os.path.dirname(images["base"])
    mounts_before = _our_mounts(image_dir, _stage_of(who, uid))
    fuse_before = _squashfuse_of(uid, image_dir)
    script = "\n".join(
        [f"for i in $(seq 200); do {HPCC} exec {images['base']} true || exit 1; done"])
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = launcher_env["HPCC_CONFIG"]
    t = time.monotonic()
    p = subprocess.run(["sh", "-c", script], user=who, env=env, cwd="/", capture_output=True,
                       text=True, timeout=600)
    elapsed = time.monotonic() - t
    assert p.returncode == 0, p.stderr
    assert _our_mounts(image_dir, _stage_of(who, uid)) == mounts_before == []
    # as root the daemon lives in the host's mount namespace and exits when the kernel
    # drops its mount with the container's namespace: just after the launch, not before
    assert _wait_until(lambda: _squashfuse_of(uid, image_dir) == fuse_before)
    assert _wait_until(lambda: not _loops_of(image_dir))
    stage = _stage_of(who, uid)
    # the fixed staging dir holds only the launch cache; mounts on it live in the namespaces
    assert set(os.listdir(stage)) <= {"launch-cache"}
    print(f"200 launches ({who or 'root'}): {elapsed:.1f} s")


POSTSTOP = """#!/bin/sh
cat > /dev/null
"""


@pytest.fixture(params=["plain", "poststop-hook"])
def launch_mode(request, launcher_env):
    """plain: no hooks; poststop-hook: a poststop hook that must run on the host after the
    command (and must not keep anything alive)."""
    if request.param == "plain":
        yield launcher_env["HPCC_CONFIG"]
        return
    d = tempfile.mkdtemp(prefix="hpcc-supervised-")
    os.chmod(d, 0o755)
    os.mkdir(os.path.join(d, "hooks.d"), 0o755)
    hook = os.path.join(d, "poststop.sh")
    with open(hook, "w") as f:
        f.write(POSTSTOP)
    os.chmod(hook, 0o755)
    with open(os.path.join(d, "hooks.d", "poststop.json"), "w") as f:
        json.dump({"version": "1.0.0", "hook": {"path": hook}, "when": {"always": True},
                   "stages": ["poststop"]}, f)
    cfg = os.path.join(d, "hpcc.toml")
    with open(cfg, "w") as f:
        f.write(f'[launcher]\nhooks_dir = "{d}/hooks.d"\n')
    yield cfg
    shutil.rmtree(d, ignore_errors=True)


def _start_sleeper(images, config, who):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = config
    proc = subprocess.Popen([HPCC, "exec", images["base"], "sh", "-c",
                             "echo ready; exec sleep 1000"], env=env, user=who,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline() == "ready\n"

    def sleeper():
        if _comm(proc.pid) == "sleep":  # hpcc became the command
            return proc.pid
        kids = [k for k in _children(proc.pid) if _comm(k) == "sleep"]
        return kids[0] if kids else None
    assert _wait_until(lambda: sleeper() is not None)
    cmd = sleeper()
    fuse = sorted({k for k in _children(proc.pid) + _children(cmd)
                   if _comm(k) == "squashfuse_ll"})
    return proc, cmd, fuse


def test_kill_9_of_hpcc_tears_everything_down(images, launch_mode, who):
    proc, cmd, fuse = _start_sleeper(images, launch_mode, who)
    if who:
        assert len(fuse) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _wait_until(lambda: not _alive(cmd) and not any(_alive(f) for f in fuse))
    assert _wait_until(lambda: not _loops_of(os.path.dirname(images["base"])))


def test_kill_9_of_the_command_tears_everything_down(images, launch_mode, who):
    proc, cmd, fuse = _start_sleeper(images, launch_mode, who)
    if who:
        assert len(fuse) == 1
    os.kill(cmd, signal.SIGKILL)
    assert proc.wait(timeout=10) in (-signal.SIGKILL, 128 + signal.SIGKILL)
    assert _wait_until(lambda: not any(_alive(f) for f in fuse))
    assert _wait_until(lambda: not _loops_of(os.path.dirname(images["base"])))


def test_kill_9_of_hpcc_as_root_with_a_fuse_mounted_image(images, launcher_env, test_user,
                                                         shared_dir):
    """As root, a user's image is served by squashfuse_ll living outside the container's
    namespace; it must exit by itself when the namespace goes."""
    mine = os.path.join(shared_dir, "mine.sqfs")
    shutil.copy(images["base"], mine)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    proc, cmd, fuse = _start_sleeper({"base": mine}, launcher_env["HPCC_CONFIG"], None)
    assert len(fuse) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _wait_until(lambda: not _alive(cmd) and not _alive(fuse[0]))


def test_background_processes_of_the_command_end_with_it(images, launcher_env, who):
    p = run_hpcc(["exec", images["base"], "sh", "-c", "sleep 300 & echo $!"], user=who,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout.strip())
    assert _wait_until(lambda: not _alive(pid), timeout=5)
