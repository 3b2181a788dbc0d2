"""The idle keeper of a job's named container (hpcc.runtime.named, `idle`): root signals the
process recorded there only while it is the very process that wrote it (pid and start time),
so a keeper that died and whose pid went to another process (a user's, say) is never
signalled; remove-job ends a live keeper before it removes the layer."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from hpcc.runtime import named, named_admin

pytestmark = [pytest.mark.root]


@pytest.fixture
def named_dir():
    d = tempfile.mkdtemp(prefix="hpcc-keeper-", dir="/run")
    fd = os.open(d, named.O_DIR)
    yield d, fd
    os.close(fd)
    subprocess.run(["rm", "-rf", d])


def _record(fd, pid, start, key="k"):
    with open(os.open("idle", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=fd),
              "w") as f:
        f.write(f"{pid} {start} {key}\n")


def test_a_recycled_pid_is_not_signalled(named_dir):
    _, fd = named_dir
    # a process that got the dead keeper's pid: same pid, another start time
    other = subprocess.Popen(["sleep", "30"], user="nobody")
    try:
        start = named._start_time(other.pid)
        _record(fd, other.pid, start - 1)
        assert named._idle_keeper(fd) is None
        named.stop_idle_keeper(fd)
        time.sleep(0.2)
        assert other.poll() is None, "root signalled a process that is not the keeper"
        assert not os.path.exists(f"/proc/self/fd/{fd}/idle")  # the stale record is gone
        # the recorded process itself is ended (and waited for)
        _record(fd, other.pid, start)
        assert named._idle_keeper(fd) == (other.pid, "k")
        named.stop_idle_keeper(fd)
        assert other.wait(timeout=5) == -signal.SIGTERM
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


@pytest.mark.parametrize("content", ["", "garbage", "1 0 k", "-5 0 k", "12 34"])
def test_a_malformed_record_is_ignored(named_dir, content):
    _, fd = named_dir
    with open(os.open("idle", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
        f.write(content)
    assert named._idle_keeper(fd) is None
    named.stop_idle_keeper(fd)  # signals nothing, removes the record


def test_remove_job_ends_the_keeper_before_removing_the_layer(tmp_path):
    base = tempfile.mkdtemp(prefix="hpcc-containers-", dir="/run")
    config = {"launcher": {"containers_dir": base}}
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        os.makedirs(f"{base}/job-77-u1000-n0/build/upper", 0o700)
        dfd = os.open(f"{base}/job-77-u1000-n0/build", named.O_DIR)
        try:
            _record(dfd, keeper.pid, named._start_time(keeper.pid))
        finally:
            os.close(dfd)
        assert named_admin.remove_job(77, config) == 1
        assert keeper.poll() == -signal.SIGTERM
        assert not os.path.exists(f"{base}/job-77-u1000-n0")
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
        subprocess.run(["rm", "-rf", base])
