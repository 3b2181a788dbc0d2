"""What the launcher says about bad input before anything is mounted: an empty command, an
IMAGE that is a directory, not a squashfs file or cut short, a config with unknown keys or
wrong types; and a launch by NAME:TAG that costs what a launch by path costs."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hpcc.testkit.busybox import busybox_image
from hpcc.testkit.images import write_docker_archive
from tests.conftest import tool
from tests.fixtures.launcher_images import run_hpcc

HPCC = os.path.join(os.path.dirname(sys.executable), "hpcc")


def one_line(p, code):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hpcc: "), lines[0]
    return lines[0]


@pytest.fixture
def site():
    """A directory every user can read, with a config naming a store in it."""
    d = Path(tempfile.mkdtemp(prefix="hpcc-launchfaults-", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "hooks.d").mkdir(mode=0o755)
    cfg = d / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{d}/store"\nuser_path = "{d}/user"\n'
                   f'[launcher]\nhooks_dir = "{d}/hooks.d"\nbinds = []\n')
    os.chmod(cfg, 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_empty_command_is_one_usage_line(images, launcher_env):
    p = run_hpcc(["run", images["base"], "--", ""], config=launcher_env["HPCC_CONFIG"])
    assert "the command is an empty string" in one_line(p, 2)


def test_a_directory_as_image_says_it_is_a_directory(launcher_env, site):
    p = run_hpcc(["run", str(site), "true"], config=launcher_env["HPCC_CONFIG"])
    line = one_line(p, 125)
    assert f"{site} is a directory, not an image" in line and "repository" not in line


def test_a_file_that_is_not_squashfs_says_what_it_is(launcher_env, site):
    notes = site / "notes.txt"
    notes.write_text("not an image\n")
    p = run_hpcc(["run", str(notes), "true"], config=launcher_env["HPCC_CONFIG"])
    assert f"{notes} is not a squashfs image" in one_line(p, 125)
    # the bare name of a file in the current directory is not a store reference found
    p = run_hpcc(["run", "notes.txt", "true"], config=str(site / "hpcc.toml"), cwd=str(site))
    line = one_line(p, 125)
    assert "'notes.txt' here is a file" in line and "./notes.txt" in line, line


@pytest.mark.root
def test_truncated_image_as_a_user_is_one_line(images, launcher_env, site, test_user):
    cut = site / "cut.sqfs"
    data = Path(images["base"]).read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    os.chmod(cut, 0o644)
    p = run_hpcc(["run", str(cut), "true"], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    line = one_line(p, 125)
    assert f"image file {cut} is truncated: {len(data) // 2} of its" in line, line
    assert "squashfuse" not in p.stderr


@pytest.mark.root
def test_unknown_keys_and_wrong_types_are_warned_once_per_config_text(images, site,
                                                                     test_user):
    cfg = site / "hpcc.toml"
    cfg.write_text(cfg.read_text() + 'mount_home = "no"\nmount_hme = false\n')

    def launch(*opts):
        return run_hpcc([*opts, "exec", images["base"], "true"], user=test_user.pw_name,
                        config=str(cfg))

    first = launch()
    assert first.returncode == 0, first.stderr
    warnings = first.stderr.splitlines()
    assert len(warnings) == 2, first.stderr
    assert warnings[0] == (f"hpcc: warning: {cfg}: 'launcher.mount_home' must be true or "
                           "false, not \"no\"; 'hpcc config check' validates the file")
    assert "unknown key 'launcher.mount_hme' (ignored)" in warnings[1]
    again = launch()
    assert again.returncode == 0 and again.stderr == ""        # the same text: said once
    cfg.write_text(cfg.read_text() + "[mpi]\nabi_chek = 'minor'\n")
    third = launch("-q")
    assert third.returncode == 0 and third.stderr == ""        # -q: only errors
    cfg.write_text(cfg.read_text() + "\n")
    fourth = launch()
    assert "unknown key 'mpi.abi_chek'" in fourth.stderr


def _busybox(variant=""):
    """The busybox image; a variant differs in one label (another config, another image)."""
    img = busybox_image()
    if not variant:
        return img
    config = json.loads(img.config_bytes)
    config.setdefault("config", {}).setdefault("Labels", {})["variant"] = variant
    raw = json.dumps(config).encode()
    return dataclasses.replace(img, config=config, config_bytes=raw,
                               config_digest="sha256:" + hashlib.sha256(raw).hexdigest())


def _import(site, archive_name, tag, variant=""):
    archive = site / archive_name
    write_docker_archive(archive, _busybox(variant), repo_tag=None)
    env = dict(os.environ, HPCC_CONFIG=str(site / "hpcc.toml"))
    p = subprocess.run([tool("gateway"), "import", "-q", "--json", str(archive), "--tag", tag],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["path"]


@pytest.mark.root
def test_warm_launch_by_name_imports_no_json_re_or_store_and_follows_the_store(site):
    first = _import(site, "a.tar", "launch/name:1")
    env = dict(os.environ, HPCC_CONFIG=str(site / "hpcc.toml"))

    def launch(*extra):
        return subprocess.run([sys.executable, *extra, HPCC, "-v", "exec", "launch/name:1",
                               "true"], capture_output=True, text=True, env=env, cwd="/")

    assert launch().returncode == 0
    p = launch("-X", "importtime")
    assert p.returncode == 0, p.stderr
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    for mod in ("json", "re", "enum", "hpcc.store", "hpcc.resolve", "hpcc.reference",
                "tomllib"):
        assert mod not in imported, mod
    assert f"image {first}" in p.stderr
    # the tag moves to another image: the next launch runs that one
    second = _import(site, "b.tar", "launch/name:1", variant="b")
    assert second != first
    p = launch()
    assert p.returncode == 0 and f"image {second}" in p.stderr, p.stderr
    # the tag is removed: not found, as the store says
    subprocess.run([tool("gateway"), "rm", "launch/name:1"], env=env, check=True,
                   capture_output=True)
    p = launch()
    assert p.returncode == 125 and "not found in the store" in p.stderr, p.stderr
