"""The OCI hook engine: hooks.d 1.0.0 configs, `when` matching, stages, state on stdin,
timeouts, failures, and the root-only ownership checks. Real hook executables (Python
scripts) run by real launches."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from hpcc.errors import HookError
from hpcc.runtime.ocihooks import load_hooks, matches, select_hooks
from tests.fixtures.launcher_images import run_hpcc

RECORD_HOOK = """#!/usr/bin/python3
import json, os, sys
state = json.load(sys.stdin)
with open(os.path.join(state["bundle"], "config.json")) as f:
    config = json.load(f)
root = config["root"]["path"]
with open(os.path.join(root, "injected.txt"), "w") as f:
    f.write("from the prestart hook\\n")
with open(sys.argv[1], "w") as f:
    json.dump({"state": state, "root": root, "args": sys.argv[1:],
               "env": dict(os.environ)}, f)
"""

FAIL_HOOK = """#!/usr/bin/python3
import sys
sys.stdin.read()
print("some detail", file=sys.stderr)
print("boom: the host MPI is not ABI-compatible", file=sys.stderr)
sys.exit(3)
"""

SLOW_HOOK = """#!/usr/bin/python3
import time
time.sleep(30)
"""

POSTSTOP_HOOK = """#!/usr/bin/python3
import json, sys
state = json.load(sys.stdin)
with open(sys.argv[1], "w") as f:
    f.write(state["status"])
"""


@pytest.fixture
def hooks_env(test_user):
    """make(hooks) -> HPCC_CONFIG path; hooks: [(name, script, when, stages, extra)]."""
    d = tempfile.mkdtemp(prefix="hpcc-hooks-")
    os.chmod(d, 0o755)
    out = os.path.join(d, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)

    def make(hooks):
        hdir = os.path.join(d, "hooks.d")
        os.makedirs(hdir, exist_ok=True)
        bindir = os.path.join(d, "bin")
        os.makedirs(bindir, exist_ok=True)
        for name, script, when, stages, extra in hooks:
            exe = os.path.join(bindir, name + ".py")
            with open(exe, "w") as f:
                f.write(script)
            os.chmod(exe, 0o755)
            hook = {"path": exe, "args": [name, *extra.get("args", [])]}
            if "timeout" in extra:
                hook["timeout"] = extra["timeout"]
            with open(os.path.join(hdir, name + ".json"), "w") as f:
                json.dump({"version": "1.0.0", "hook": hook, "when": when, "stages": stages},
                          f)
        cfg = os.path.join(d, "hpcc.toml")
        with open(cfg, "w") as f:
            f.write(f'[launcher]\nhooks_dir = "{hdir}"\n')
        return cfg

    make.out = out
    make.dir = d
    yield make
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_prestart_hook_gets_the_oci_state_and_adds_files_to_the_root(images, hooks_env, who):
    rec = os.path.join(hooks_env.out, f"state-{who}.json")
    cfg = hooks_env([("record", RECORD_HOOK, {"annotations": {r"^org\.hpcc\.mpi$": "^1$"}},
                      ["prestart"], {"args": [rec]})])
    p = run_hpcc(["exec", "--mpi", "--annotation", "site.x=y", images["base"], "cat",
                  "/injected.txt"], user=who, config=cfg)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "from the prestart hook\n"
    with open(rec) as f:
        got = json.load(f)
    st = got["state"]
    assert st["ociVersion"] and st["status"] == "created" and isinstance(st["pid"], int)
    assert st["id"].startswith("hpcc-")
    assert st["annotations"]["org.hpcc.mpi"] == "1"
    assert st["annotations"]["site.x"] == "y"
    assert st["annotations"]["org.hpcc.image"] == images["base"]
    assert got["root"].endswith("/root")
    assert got["args"] == [rec]
    assert "HPCC_CONFIG" not in got["env"]  # a hook gets only its own env
    # the hook's file lives in the container's tmpfs overlay, not in the image
    p = run_hpcc(["exec", images["base"], "ls", "/injected.txt"], user=who, config=cfg)
    assert p.returncode != 0


@pytest.mark.root
def test_hook_does_not_run_when_its_annotation_is_absent(images, hooks_env, who):
    rec = os.path.join(hooks_env.out, "none.json")
    cfg = hooks_env([("record", RECORD_HOOK, {"annotations": {r"^org\.hpcc\.mpi$": "^1$"}},
                      ["prestart"], {"args": [rec]})])
    p = run_hpcc(["exec", images["base"], "true"], user=who, config=cfg)
    assert p.returncode == 0 and not os.path.exists(rec)


@pytest.mark.root
def test_failing_prestart_hook_aborts_with_its_stderr(images, hooks_env, who):
    cfg = hooks_env([("checkabi", FAIL_HOOK, {"always": True}, ["prestart"], {})])
    p = run_hpcc(["exec", images["base"], "echo", "never"], user=who, config=cfg)
    assert p.returncode == 125
    assert p.stdout == ""
    assert p.stderr == ("hpcc: prestart hook checkabi.py failed (exit 3): "
                        "boom: the host MPI is not ABI-compatible\n")


@pytest.mark.root
def test_hook_timeout_is_enforced(images, hooks_env, who):
    cfg = hooks_env([("slow", SLOW_HOOK, {"always": True}, ["createRuntime"],
                      {"timeout": 1})])
    p = run_hpcc(["exec", images["base"], "true"], user=who, config=cfg, timeout=20)
    assert p.returncode == 125
    assert "createRuntime hook slow.py failed" in p.stderr and "timed out after 1 s" in p.stderr


@pytest.mark.root
def test_poststop_hook_runs_on_the_host_after_the_command(images, hooks_env, who):
    rec = os.path.join(hooks_env.out, f"poststop-{who}")
    cfg = hooks_env([("after", POSTSTOP_HOOK, {"commands": ["^/bin/true$|^true$"]},
                      ["poststop"], {"args": [rec]})])
    p = run_hpcc(["exec", images["base"], "true"], user=who, config=cfg)
    assert p.returncode == 0, p.stderr
    with open(rec) as f:
        assert f.read() == "stopped"


@pytest.mark.root
def test_poststop_hook_sees_the_hosts_mounts_below_its_root(images, hooks_env, who):
    """The host's root the poststop hook runs in keeps its submounts (a /tmp or /home of
    its own): the hook, and where it writes, sit on a tmpfs mounted below the host's root."""
    mnt = os.path.join(hooks_env.dir, "mnt")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "hpcc-test", mnt], check=True)
    try:
        os.mkdir(os.path.join(mnt, "out"), 0o777)
        os.chmod(os.path.join(mnt, "out"), 0o777)
        rec = os.path.join(mnt, "out", f"poststop-{who}")
        hooks_env([("after", POSTSTOP_HOOK, {"always": True}, ["poststop"], {"args": [rec]})])
        exe = shutil.copy(os.path.join(hooks_env.dir, "bin", "after.py"), mnt)
        conf = os.path.join(hooks_env.dir, "hooks.d", "after.json")
        with open(conf) as f:
            h = json.load(f)
        h["hook"]["path"] = exe
        with open(conf, "w") as f:
            json.dump(h, f)
        p = run_hpcc(["exec", "-v", images["base"], "true"], user=who,
                     config=os.path.join(hooks_env.dir, "hpcc.toml"))
        assert p.returncode == 0, p.stderr
        assert "poststop hook" not in p.stderr, p.stderr    # -v: a failed one is told
        with open(rec) as f:
            assert f.read() == "stopped"
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


@pytest.mark.root
def test_root_refuses_hook_configs_a_user_can_write(images, hooks_env, test_user):
    cfg = hooks_env([("record", RECORD_HOOK, {"always": True}, ["prestart"], {})])
    conf = os.path.join(hooks_env.dir, "hooks.d", "record.json")
    os.chown(conf, test_user.pw_uid, 0)
    p = run_hpcc(["exec", images["base"], "true"], config=cfg)
    assert p.returncode == 125
    assert "refusing hook config" in p.stderr and "writable by a non-root user" in p.stderr
    os.chown(conf, 0, 0)
    exe = os.path.join(hooks_env.dir, "bin", "record.py")
    os.chmod(exe, 0o777)
    p = run_hpcc(["exec", images["base"], "true"], config=cfg)
    assert p.returncode == 125 and "refusing hook executable" in p.stderr


def _spec(args=("/bin/sh",), ann=None, binds=False):
    return {"process": {"args": list(args)}, "annotations": ann or {},
            "hpcc": {"has_bind_mounts": binds}}


def test_when_follows_podman_every_given_condition_must_match():
    assert matches({"always": True}, _spec())
    assert not matches({"always": False}, _spec())
    ann = {"annotations": {r"^org\.hpcc\.gpu$": "."}}
    assert matches(ann, _spec(ann={"org.hpcc.gpu": "all"}))
    assert not matches(ann, _spec(ann={"org.hpcc.gpu": ""}))
    assert not matches(ann, _spec())
    both = {"always": True, "annotations": {"mpi": "1"}}
    assert not matches(both, _spec())
    assert matches(both, _spec(ann={"org.hpcc.mpi": "1"}))
    cmds = {"commands": ["python3?$", "^/usr/bin/R$"]}
    assert matches(cmds, _spec(("/usr/bin/python3", "x")))
    assert not matches(cmds, _spec(("/bin/sh",)))
    assert matches({"hasBindMounts": True}, _spec(binds=True))
    assert not matches({"hasBindMounts": True}, _spec(binds=False))


def test_hook_configs_are_validated_and_selected_by_stage(tmp_path):
    good = {"version": "1.0.0", "hook": {"path": "/bin/true"}, "when": {"always": True},
            "stages": ["prestart", "poststop"]}
    (tmp_path / "10-good.json").write_text(json.dumps(good))
    hooks = load_hooks(str(tmp_path), privileged=False)
    sel = select_hooks(hooks, _spec())
    assert sel == {"prestart": [{"path": "/bin/true", "args": ["/bin/true"], "env": [],
                                 "timeout": 60}],
                   "poststop": [{"path": "/bin/true", "args": ["/bin/true"], "env": [],
                                 "timeout": 60}]}
    for bad, why in ((dict(good, version="2"), "version"),
                     (dict(good, stages=["bogus"]), "stages"),
                     (dict(good, when={}), "when"),
                     (dict(good, hook={"path": "relative"}), "hook.path")):
        (tmp_path / "20-bad.json").write_text(json.dumps(bad))
        with pytest.raises(HookError, match=why):
            load_hooks(str(tmp_path), privileged=False)
    (tmp_path / "20-bad.json").write_text("{not json")
    with pytest.raises(HookError, match="not valid JSON"):
        load_hooks(str(tmp_path), privileged=False)
