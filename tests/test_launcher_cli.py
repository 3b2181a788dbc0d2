"""The hpcc command line: help, usage errors, config check, and a launch path that imports
none of the heavy libraries."""
import os
import subprocess
import sys
import tempfile

import pytest

from tests.fixtures.launcher_images import run_hpcc

HPCC = os.path.join(os.path.dirname(sys.executable), "hpcc")
HEAVY = ("click", "jsonschema", "cffi", "rich", "requests", "argparse", "subprocess")


def test_help_lists_the_commands_and_options():
    p = subprocess.run([HPCC, "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for cmd in ("run", "exec", "shell", "pull", "images", "inspect", "rm", "config check"):
        assert cmd in p.stdout
    p = subprocess.run([HPCC, "run", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for opt in ("--mount SRC:DST[:ro]", "--workdir", "--env", "--env-file", "--entrypoint",
                "--writable", "--no-home", "--mpi", "--gpus", "125", "126", "127"):
        assert opt in p.stdout, opt
    p = subprocess.run([HPCC, "exec", "--help"], capture_output=True, text=True)
    assert "--entrypoint" not in p.stdout


def test_usage_errors_are_one_line_and_exit_2():
    for args, msg in ((["frobnicate"], "unknown command 'frobnicate'"),
                      (["run"], "missing IMAGE"),
                      (["run", "--env"], "option --env needs a value"),
                      (["run", "--annotation", "novalue", "x.sqfs"], "expected KEY=VALUE")):
        p = subprocess.run([HPCC, *args], capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and msg in p.stderr, p.stderr
    p = subprocess.run([HPCC], capture_output=True, text=True)
    assert p.returncode == 2


def test_version():
    p = subprocess.run([HPCC, "version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("hpcc ")


def test_config_check_validates_with_the_schema(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[launcher]\nmount_home = false\n")
    p = subprocess.run([HPCC, "config", "check", str(good)], capture_output=True, text=True)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[launcher]\nmount_home = 3\n")
    p = subprocess.run([HPCC, "config", "check", str(bad)], capture_output=True, text=True)
    assert p.returncode == 1 and "launcher.mount_home" in p.stderr


def test_missing_image_reference_says_how_to_pull_it(tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/site"\nuser_path = "{tmp_path}/user"\n')
    p = run_hpcc(["run", "example.org/no/such:tag", "true"], config=str(cfg))
    assert p.returncode == 125
    assert "hpcc pull example.org/no/such:tag" in p.stderr
    assert p.stderr.count("\n") == 1


@pytest.mark.root
def test_launch_path_imports_no_heavy_library(images, launcher_env):
    env = dict(os.environ, HPCC_CONFIG=launcher_env["HPCC_CONFIG"])
    for warm in (False, True):
        p = subprocess.run([sys.executable, "-X", "importtime", HPCC, "exec", images["base"],
                            "true"], capture_output=True, text=True, env=env, cwd="/")
        assert p.returncode == 0, p.stderr
        imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines()
                    if line.startswith("import time:")}
        for mod in HEAVY:
            assert mod not in imported, mod
        if warm:  # config and image metadata come from the launch cache
            for mod in ("json", "tomllib", "re", "enum", "typing"):
                assert mod not in imported, mod


def test_shipped_hook_configs_cost_a_plain_launch_no_json_or_re(images, tmp_path):
    """With the MPI and GPU hook configs installed (as `make install` does), a warm launch
    without --mpi/--gpus still imports neither json nor re: the parsed configs come from
    the launch cache and annotation keys are matched without regular expressions."""
    import shutil

    from tests.conftest import REPO

    d = tempfile.mkdtemp(prefix="hpcc-hooks-cost-")
    try:
        os.chmod(d, 0o755)
        hooks = os.path.join(d, "hooks.d")
        os.mkdir(hooks, 0o755)
        for name in ("mpi.json", "nvidia.json"):
            shutil.copy(REPO / "etc" / "hooks.d" / name, os.path.join(hooks, name))
        cfg = os.path.join(d, "hpcc.toml")
        with open(cfg, "w") as f:
            f.write(f'[launcher]\nhooks_dir = "{hooks}"\nbinds = []\n')
        env = dict(os.environ, HPCC_CONFIG=cfg)
        for warm in (False, True):
            p = subprocess.run([sys.executable, "-X", "importtime", HPCC, "exec",
                                images["base"], "true"], capture_output=True, text=True,
                               env=env, cwd="/")
            assert p.returncode == 0, p.stderr
            imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines()
                        if line.startswith("import time:")}
            if warm:
                assert "json" not in imported and "re" not in imported
    finally:
        shutil.rmtree(d, ignore_errors=True)
