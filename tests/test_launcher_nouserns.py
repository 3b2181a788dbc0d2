"""A host without unprivileged user namespaces: `hpcc run` says so in one line, with the
choices, and exits 125 (a real one: see tests/fixtures/nouserns.py)."""
import errno

import pytest

from hpcc.runtime import userns
from tests.fixtures.launcher_images import _hpcc_path
from tests.fixtures.nouserns import run_without_userns

pytestmark = pytest.mark.root


def test_run_without_user_namespaces_says_why_and_what_to_do(images, launcher_env, test_user):
    env = {"PATH": "/usr/bin:/bin", "HOME": test_user.pw_dir,
           "HPCC_CONFIG": launcher_env["HPCC_CONFIG"]}
    p = run_without_userns([_hpcc_path(), "run", images["base"], "echo", "ran"],
                           test_user.pw_uid, test_user.pw_gid, env=env, cwd="/",
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 125, p.stderr
    assert "ran" not in p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert line.startswith("hpcc: cannot create a user namespace (No space left on device)")
    assert "user.max_user_namespaces = 0" in line
    assert "sysctl -w user.max_user_namespaces=" in line       # choice 1: enable them
    assert "srun --container-image=" in line                   # choice 2: through Slurm
    assert "Traceback" not in p.stderr


def test_the_same_host_runs_with_user_namespaces(images, launcher_env, test_user):
    """The control: outside the restricted namespace the same launch works."""
    from tests.fixtures.launcher_images import run_hpcc
    p = run_hpcc(["run", images["base"], "echo", "ran"], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ran"


@pytest.mark.parametrize("values,err,expect", [
    ({"user.max_user_namespaces": 0}, errno.ENOSPC, "user.max_user_namespaces = 0"),
    ({"user.max_user_namespaces": 10}, errno.ENOSPC, "limit of 10 user namespaces"),
    ({"user.max_user_namespaces": 100, "kernel.unprivileged_userns_clone": 0}, errno.EPERM,
     "kernel.unprivileged_userns_clone=1"),
    ({"user.max_user_namespaces": 100, "kernel.apparmor_restrict_unprivileged_userns": 1},
     errno.EPERM, "installs that profile"),
    ({"user.max_user_namespaces": 100}, errno.EPERM, "seccomp filter or security module"),
])
def test_each_sysctl_gets_its_own_cause_and_fix(values, err, expect):
    """The settings this machine cannot take (the kernel.* sysctls are global, and absent
    here) are checked on the explanation alone."""
    cause, fix = userns.explain(err, values)
    assert expect in f"{cause}; {fix}"
