"""Store faults through the real `gateway` and `hpcc` commands: a read-only store, paths
the caller may not read or write, broken metadata, partial failures of `rm`, and imports
of what the store already holds. Each ends in one line (per failure), never a traceback."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hpcc.testkit.images import simple_image, write_docker_archive
from tests.conftest import tool


@pytest.fixture
def open_tmp():
    """A temporary directory every user can reach (pytest's tmp_path is root's only)."""
    d = tempfile.mkdtemp(prefix="hpcc-storefaults-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def gw(open_tmp):
    tmp_path = open_tmp
    store = tmp_path / "store"
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{store}"\nuser_path = "{tmp_path}/user"\n'
                   '[gateway]\nretries = 0\nworkers = 2\n')
    os.chmod(tmp_path, 0o755)

    class Gw:
        path = store
        config = cfg

        def run(self, *args, prog="gateway", user=None):
            env = dict(os.environ, HPCC_CONFIG=str(cfg))
            env.pop("HPCC_STORE", None)
            return subprocess.run([tool(prog), *map(str, args)], env=env, text=True,
                                  capture_output=True, timeout=120, user=user)

        def imported(self, tmp, text, tag):
            archive = tmp / f"{text}.tar"
            write_docker_archive(archive, simple_image(text), repo_tag=None)
            p = self.run("import", archive, "--tag", tag, "--json")
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout)

    return Gw()


def one_line(p, code, prog="gateway"):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("[")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{prog}: ") and ": error:" not in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def readonly(gw, open_tmp):
    """The store on a filesystem remounted read-only after an import."""
    gw.path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(gw.path)], check=True)
    try:
        rec = gw.imported(open_tmp, "ro", "site/ro:1")
        subprocess.run(["mount", "-o", "remount,ro", str(gw.path)], check=True)
        yield rec
    finally:
        subprocess.run(["umount", str(gw.path)], check=True)


@pytest.mark.root
def test_read_only_store_is_one_line_exit_1(gw, readonly, open_tmp):
    p = gw.run("rm", "site/ro:1")
    line = one_line(p, 1)
    assert "Read-only file system" in line and str(gw.path) in line, line
    archive = open_tmp / "other.tar"
    write_docker_archive(archive, simple_image("other"), repo_tag=None)
    line = one_line(gw.run("import", archive, "--tag", "site/other:1"), 1)
    assert "Read-only file system" in line, line
    p = gw.run("gc")
    if p.returncode:
        assert "Read-only file system" in one_line(p, 1)
    # listing and inspecting a read-only store work
    assert gw.run("images").returncode == 0
    assert gw.run("inspect", "site/ro:1").returncode == 0


@pytest.mark.root
def test_tag_the_caller_cannot_remove_names_the_path(gw, open_tmp, test_user):
    gw.imported(open_tmp, "perm", "site/perm:1")
    # the store is the user's, but the tag's directory is root's
    subprocess.run(["chown", "-R", f"{test_user.pw_uid}", str(gw.path)], check=True)
    tagdir = gw.path / "refs" / "localhost" / "site" / "perm"
    os.chown(tagdir, 0, 0)
    p = gw.run("rm", "site/perm:1", user=test_user.pw_uid)
    line = one_line(p, 1)
    assert f"cannot remove the tag file {tagdir}/@1: Permission denied" in line, line
    assert (tagdir / "@1").exists()


@pytest.mark.root
def test_unreadable_refs_say_permission_denied_with_the_path(gw, open_tmp, test_user):
    gw.imported(open_tmp, "unread", "site/unread:1")
    refs = gw.path / "refs"
    os.chmod(refs, 0o700)
    p = gw.run("inspect", "site/unread:1", user=test_user.pw_uid)
    line = one_line(p, 1)
    assert "permission denied" in line and str(refs) in line, line
    assert "pull it" not in line


@pytest.mark.root
def test_image_file_in_an_unreadable_directory_says_permission_denied(open_tmp, test_user):
    private = open_tmp / "private"
    private.mkdir(mode=0o700)
    (private / "x.sqfs").write_bytes(b"hsqs")
    p = subprocess.run([tool("hpcc"), "run", str(private / "x.sqfs"), "--", "true"],
                       capture_output=True, text=True, user=test_user.pw_uid, timeout=60)
    line = one_line(p, 125, prog="hpcc")
    assert "permission denied" in line.lower() and str(private / "x.sqfs") in line, line
    assert "does not exist" not in line


def test_broken_metadata_is_listed_and_gc_removes_it(gw, open_tmp):
    rec = gw.imported(open_tmp, "broken", "site/broken:1")
    meta = gw.path / ("sha256-" + rec["digest"][7:] + ".json")
    meta.write_text("{ not json")
    p = gw.run("images")
    assert p.returncode == 0, p.stderr
    assert "<broken>" in p.stdout and rec["digest"][7:19] in p.stdout
    assert "1 broken image(s)" in p.stderr and "'gateway gc' removes them" in p.stderr
    rows = json.loads(gw.run("images", "--json").stdout)
    assert [r["digest"] for r in rows if r["broken"]] == [rec["digest"]]
    p = gw.run("gc", "--json")
    assert p.returncode == 0, p.stderr
    removed = json.loads(p.stdout)["removed"]
    assert str(meta) in removed and rec["path"] in removed
    assert not meta.exists() and not os.path.exists(rec["path"])
    assert json.loads(gw.run("images", "--json").stdout) == []


def test_rm_json_reports_what_was_removed_and_what_failed(gw, open_tmp):
    rec = gw.imported(open_tmp, "rmjson", "site/a:1")
    p = gw.run("rm", "--json", "site/a:1", "site/missing:1")
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out[0] == {"ref": "site/a:1", "untagged": ["localhost/site/a:1"],
                      "deleted": rec["digest"], "error": None}
    assert out[1]["ref"] == "site/missing:1" and out[1]["deleted"] is None
    assert "not found in the store" in out[1]["error"]
    assert "Traceback" not in p.stderr
    # without --json: a line per removal, one error line for the failure
    rec = gw.imported(open_tmp, "rmhuman", "site/b:1")
    p = gw.run("rm", "site/nope:1", "site/b:1")
    assert p.returncode == 1
    assert f"deleted {rec['digest']}" in p.stdout
    assert p.stderr.count("gateway: ") == 1


def test_import_of_what_the_store_has_converts_nothing_and_local_tags_stay_local(gw, open_tmp):
    first = gw.imported(open_tmp, "same", "site/x:1")
    rows = json.loads(gw.run("images", "--json").stdout)
    assert rows[0]["tags"] == ["localhost/site/x:1"]          # not docker.io/site/x:1
    sqfs_before = sorted(gw.path.glob("*.sqfs"))
    again = gw.imported(open_tmp, "same", "site/x:2")
    assert again["digest"] == first["digest"]
    assert again["conversion"].get("already_present") is True
    assert sorted(gw.path.glob("*.sqfs")) == sqfs_before
    rows = json.loads(gw.run("images", "--json").stdout)
    assert rows[0]["tags"] == ["localhost/site/x:1", "localhost/site/x:2"]
    # the short name finds the local image
    info = json.loads(gw.run("inspect", "site/x:2", "--json").stdout)
    assert info["digest"] == first["digest"]


def test_import_recognises_an_image_pulled_under_its_manifest_digest(gw, open_tmp, registry):
    built = simple_image("pulled-then-saved")
    registry.push("storefaults/same", "1", built)
    p = gw.run("pull", registry.ref("storefaults/same", "1"), "--json")
    assert p.returncode == 0, p.stderr
    pulled = json.loads(p.stdout)
    archive = open_tmp / "saved.tar"
    write_docker_archive(archive, built, repo_tag=None)
    p = gw.run("import", archive, "--tag", "site/saved:1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["digest"] == pulled["digest"]
    assert len(list(gw.path.glob("*.sqfs"))) == 1


def test_hpcc_rm_of_a_site_image_says_so_and_images_shows_the_store(gw, open_tmp):
    rec = gw.imported(open_tmp, "siteimg", "site/only:1")
    p = gw.run("rm", "site/only:1", prog="hpcc")
    line = one_line(p, 1, prog="hpcc")
    assert f"image 'site/only:1' is in the site store {gw.path}, not in yours" in line, line
    assert "gateway rm site/only:1" in line
    assert os.path.exists(rec["path"])
    p = gw.run("images", prog="hpcc")
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()[:2]
    assert header.split()[-1] == "STORE" and row.split()[-1] == "site", p.stdout
