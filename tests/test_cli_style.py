"""hpcc, gateway and hpcc-hook share one style: `--version`, `-q/-v`, one-line errors with
the program's name first, one-line usage errors with the way out (exit 2); and every --json
output validates against its schema in etc/hpcc-output.schema.json."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import pytest

from hpcc import __version__
from hpcc.testkit.images import simple_image, write_docker_archive
from tests.conftest import REPO, tool

PROGS = ("hpcc", "gateway", "hpcc-hook")


def run(prog, *args, env=None):
    return subprocess.run([tool(prog), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("prog", PROGS)
def test_version_is_prog_and_version(prog):
    p = run(prog, "--version")
    assert p.returncode == 0 and p.stdout == f"{prog} {__version__}\n", (p.stdout, p.stderr)


@pytest.mark.parametrize("argv", [
    ("gateway", "pull", "--bogus", "x"), ("gateway", "pul"), ("gateway", "pull"),
    ("hpcc", "images", "--bogus"), ("hpcc", "run", "--bogus", "x"), ("hpcc", "bogus"),
    ("hpcc-hook", "bogus"), ("hpcc-hook", "mpi", "--bogus"),
], ids=lambda a: " ".join(a))
def test_usage_errors_are_one_line_with_the_help_to_read_exit_2(argv):
    p = run(*argv)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{argv[0]}: ") and "--help" in lines[0], lines[0]
    assert "Usage:" not in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("argv", [("gateway", "-q", "images"), ("gateway", "-v", "images"),
                                  ("gateway", "images", "-q", "-v"), ("hpcc", "-q", "images"),
                                  ("hpcc", "-v", "images", "--json"),
                                  ("hpcc-hook", "-q", "--help"), ("hpcc-hook", "-v", "--help")])
def test_quiet_and_verbose_are_accepted_everywhere(argv, tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/s"\nuser_path = "{tmp_path}/u"\n')
    p = run(*argv, env=dict(os.environ, HPCC_CONFIG=str(cfg)))
    assert p.returncode == 0, p.stderr


def test_config_check_help():
    p = run("hpcc", "config", "check", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: hpcc config check [--json] [FILE]")


def test_errors_start_with_the_program_name_and_no_error_word(tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/s"\nuser_path = "{tmp_path}/u"\n')
    env = dict(os.environ, HPCC_CONFIG=str(cfg))
    for prog in ("gateway", "hpcc"):
        p = run(prog, "inspect", "no/such:1", env=env)
        assert p.returncode == 1
        assert p.stderr.startswith(f"{prog}: image 'no/such:1' not found"), p.stderr


def test_gateway_verbose_prints_each_registry_request(registry, tmp_path):
    registry.push("style/verbose", "1", simple_image("v"))
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/s"\nuser_path = "{tmp_path}/u"\n')
    env = dict(os.environ, HPCC_CONFIG=str(cfg))
    p = run("gateway", "-v", "pull", registry.ref("style/verbose", "1"), env=env)
    assert p.returncode == 0, p.stderr
    assert f"gateway: GET {registry.url}/v2/style/verbose/manifests/1 -> 200" in p.stderr
    q = run("gateway", "-q", "pull", "--force", registry.ref("style/verbose", "1"), env=env)
    assert q.returncode == 0 and q.stderr == ""


# --json schemas -----------------------------------------------------------------------------
SCHEMA = json.loads((REPO / "etc" / "hpcc-output.schema.json").read_text())


def check(command, output):
    schema = dict(SCHEMA, **{"$ref": f"#/$defs/{command}"})
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(output, schema, cls=jsonschema.Draft202012Validator)


@pytest.fixture
def site():
    d = Path(tempfile.mkdtemp(prefix="hpcc-jsonout-", dir="/tmp"))
    os.chmod(d, 0o755)
    cfg = d / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{d}/site"\nuser_path = "{d}/user"\n')
    yield d, dict(os.environ, HPCC_CONFIG=str(cfg))
    shutil.rmtree(d, ignore_errors=True)


def jrun(prog, env, *args, code=0):
    p = run(prog, *args, "--json", env=env)
    assert p.returncode == code, p.stderr
    return json.loads(p.stdout)


def test_every_command_output_validates_against_its_schema(registry, site):
    d, env = site
    built = simple_image("json-out")
    registry.push("style/json", "1", built)
    ref = registry.ref("style/json", "1")
    pulled = jrun("gateway", env, "pull", ref)
    check("pull", pulled)
    assert pulled["tags"] == [ref] and pulled["ref"] == ref
    assert "/.tmp/" not in json.dumps(pulled)
    again = jrun("gateway", env, "pull", ref)
    check("pull", again)
    assert again["converted"] is False
    archive = d / "a.tar"
    write_docker_archive(archive, simple_image("json-import"), repo_tag=None)
    imported = jrun("gateway", env, "import", archive, "--tag", "style/imp:1")
    check("import", imported)
    assert imported["tags"] == ["localhost/style/imp:1"]
    rows = jrun("gateway", env, "images")
    check("images", rows)
    assert len(rows) == 2
    info = jrun("gateway", env, "inspect", ref)
    check("inspect", info)
    assert "/.tmp/" not in json.dumps(info["squashfs"])
    # the same commands of hpcc, on the user's store and the site's
    user_pull = jrun("hpcc", env, "pull", ref)
    check("pull", user_pull)
    user_rows = jrun("hpcc", env, "images")
    check("images", user_rows)
    assert {r["store_kind"] for r in user_rows} >= {"site"}
    check("inspect", jrun("hpcc", env, "inspect", ref))
    removed = jrun("gateway", env, "rm", "style/imp:1", "style/none:1", code=1)
    check("rm", removed)
    check("gc", jrun("gateway", env, "gc", "--blobs"))
    check("gc", jrun("gateway", env, "gc", "--dry-run"))


# progress and summaries --------------------------------------------------------------------
def _device_image_archive(path):
    from hpcc.testkit.images import ImageBuilder, chardev, file
    built = (ImageBuilder().layer([file("a", "x"), chardev("dev/null2", 1, 3),
                                   file("s", "y", mode=0o4755)], compression="none").build())
    write_docker_archive(path, built, repo_tag=None)
    return built


def test_closing_line_reports_drops_and_digests_are_short(site):
    d, env = site
    _device_image_archive(d / "dev.tar")
    p = run("gateway", "import", d / "dev.tar", "--tag", "style/dev:1", env=env)
    assert p.returncode == 0, p.stderr
    last = p.stderr.splitlines()[-1]
    assert last.endswith("; dropped 1 device node; setuid/setgid bits stripped from 1 files")
    first = p.stderr.splitlines()[0]
    digest = json.loads(run("gateway", "images", "--json", env=env).stdout)[0]["digest"]
    assert first.endswith(f"as {digest[7:19]}") and digest not in first


@pytest.mark.skipif(not shutil.which("script"), reason="script(1) is not installed")
def test_conversion_bar_on_a_terminal_is_indeterminate_until_the_end(site):
    """Under a pseudo-terminal the conversion bar has no total ('?') while it runs; the
    total appears when the image is written."""
    d, env = site
    _device_image_archive(d / "dev.tar")
    out = d / "typescript"
    cmd = f"{tool('gateway')} import {d / 'dev.tar'} --tag style/tty:1"
    subprocess.run(["script", "-q", "-c", cmd, str(out)], env=dict(env, COLUMNS="120"),
                   capture_output=True, timeout=120, check=True)
    import re
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.read_text(errors="replace"))
    frames = [ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith("squashfs")]
    assert frames and "/?" in frames[0], frames


@pytest.mark.root
def test_containers_json_validates(images, launcher_env):
    from tests.fixtures.launcher_images import run_hpcc
    name = f"jsonout{os.getpid()}"
    p = run_hpcc(["run", "--name", name, images["base"], "--", "true"],
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    try:
        p = run_hpcc(["containers", "--json"], config=launcher_env["HPCC_CONFIG"])
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout)
        check("containers", rows)
        assert name in [r["name"] for r in rows]
    finally:
        run_hpcc(["containers", "rm", name], config=launcher_env["HPCC_CONFIG"])


def test_quiet_before_the_command_reaches_the_image_commands(tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/s"\nuser_path = "{tmp_path}/u"\n')
    env = dict(os.environ, HPCC_CONFIG=str(cfg))
    for prog in ("hpcc", "gateway"):
        loud = run(prog, "images", env=env)
        assert loud.returncode == 0 and "no images in" in loud.stderr
        quiet = run(prog, "-q", "images", env=env)
        assert quiet.returncode == 0 and quiet.stderr == "", (prog, quiet.stderr)


def test_config_check_json_validates(tmp_path):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/s"\n')
    p = run("hpcc", "config", "check", "--json", cfg)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    check("config_check", out)
    assert out["config"] == str(cfg)
    assert run("hpcc", "config", "check", str(cfg)).stdout.startswith(f"{cfg}: ok")
