"""`gateway` end to end against a real docker-registry: pull, images, inspect, rm, gc,
import, concurrency and crash safety, and one-line errors."""
import dataclasses
import gzip
import json
import os
import signal
import subprocess
import time

import pytest

from hpcc.testkit.busybox import busybox_image
from hpcc.testkit.images import (
    ImageBuilder,
    directory,
    file,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from tests.conftest import tool
from tests.sqfstree import mounted, snapshot


@pytest.fixture
def site(tmp_path):
    """A config + empty site store for one test; returns a helper to run `gateway`."""
    store = tmp_path / "store"
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{store}"\nuser_path = "{tmp_path}/user"\n'
                   '[gateway]\nretries = 1\nworkers = 2\n')

    class Site:
        path = store
        config = cfg

        def run(self, *args, check=False, timeout=300):
            env = dict(os.environ, HPCC_CONFIG=str(cfg))
            env.pop("HPCC_STORE", None)
            p = subprocess.run([tool("gateway"), *map(str, args)], env=env, text=True,
                               capture_output=True, timeout=timeout)
            if check and p.returncode:
                raise AssertionError(f"gateway {args} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
            return p

        def json(self, *args):
            return json.loads(self.run(*args, "--json", check=True).stdout)

        def visible(self):
            return [n for n in os.listdir(store) if n.endswith((".sqfs", ".json"))] \
                if store.exists() else []

        def debris(self):
            tmp = store / ".tmp"
            return os.listdir(tmp) if tmp.exists() else []

    return Site()


def assert_one_line_error(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    # progress lines ("[  0.3s] ...") may come first; the error itself is one line
    err = "\n".join(x for x in p.stderr.strip().splitlines() if not x.startswith("["))
    assert len(err.splitlines()) == 1, p.stderr
    for n in needles:
        assert n in err, err


def test_pull_busybox_then_images_and_inspect(registry, site):
    registry.push("demo/busybox", "1.0", busybox_image())
    ref = registry.ref("demo/busybox", "1.0")
    res = site.json("pull", ref)
    assert res["converted"] is True and res["digest"].startswith("sha256:")
    assert os.path.exists(res["path"])
    rows = site.json("images")
    assert rows[0]["tags"] == [ref] and rows[0]["digest"] == res["digest"]
    info = site.json("inspect", ref)
    assert info["config"]["Cmd"] == ["/bin/sh"]
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in info["config"]["Env"]
    assert len(info["layers"]) == 2
    assert info["squashfs_info"]["compressor"] == "zstd"
    human = site.run("images", check=True).stdout
    assert ref in human and res["digest"][7:19] in human
    assert site.debris() == []


def test_second_pull_of_an_unchanged_image_converts_nothing(registry, site):
    img = busybox_image()
    registry.push("demo/again", "v", img)
    ref = registry.ref("demo/again", "v")
    site.json("pull", ref)
    before = len(registry.access_log())
    res = site.json("pull", ref)
    assert res["converted"] is False
    layer_gets = [entry for entry in registry.access_log()[before:]
                  if any(lay.digest in entry for lay in img.layers)]
    assert layer_gets == []


@pytest.mark.root
def test_pulled_image_mounts_with_the_kernel_and_squashfuse(registry, site):
    registry.push("demo/mount", "x", busybox_image(compression="zstd"))
    res = site.json("pull", registry.ref("demo/mount", "x"))
    with mounted(res["path"], "kernel") as k, mounted(res["path"], "squashfuse") as f:
        assert snapshot(k) == snapshot(f)
        assert os.path.islink(os.path.join(k, "bin/sh"))
        assert not os.path.exists(os.path.join(k, "etc/motd"))  # whited out in layer 2
        out = subprocess.run(["chroot", k, "/bin/sh", "/app/hello.sh"], capture_output=True,
                             text=True)
        assert "hello from Linux" in out.stdout


def test_rm_and_gc(registry, site):
    registry.push("demo/rm", "a", busybox_image())
    ref = registry.ref("demo/rm", "a")
    res = site.json("pull", ref)
    out = site.json("rm", ref)
    assert out[0]["deleted"] == res["digest"]
    assert site.visible() == []
    p = site.run("rm", ref)
    assert_one_line_error(p, 1, "not found")
    site.run("gc", check=True)
    assert site.json("images") == []


def test_unknown_image_is_a_one_line_error(registry, site):
    p = site.run("pull", registry.ref("nothing/here", "1"))
    assert_one_line_error(p, 1, "not found")   # a user error: retrying never helps
    assert site.visible() == []


@pytest.mark.parametrize("ref", ["Upper/Case", "a@sha256:123", "bad ref"])
def test_bad_reference_is_a_one_line_usage_error(site, ref):
    p = site.run("pull", ref)
    assert_one_line_error(p, 1, "invalid image reference")


def test_corrupt_blob_leaves_nothing_in_the_store(registry, fault_proxy, site):
    img = ImageBuilder(oci=True).layer([file("data", os.urandom(100_000))]).build()
    registry.push("demo/corrupt", "1", img)
    fault_proxy.corrupt_blob(times=10)
    p = site.run("pull", f"{fault_proxy.host}/demo/corrupt:1")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "digest" in p.stderr
    assert site.visible() == [] and site.debris() == []


def test_truncated_layer_with_valid_digest_is_refused_cleanly(registry, site):
    good = ImageBuilder(oci=True).layer([file("big", os.urandom(300_000))]).build()
    blob = good.layers[0].blob[:-5000]
    img = ImageBuilder(oci=True).raw_layer(blob, good.layers[0].media_type).build()
    registry.push("demo/trunc", "1", img)
    p = site.run("pull", registry.ref("demo/trunc", "1"))
    assert_one_line_error(p, 1, "truncated or corrupt")
    assert site.visible() == [] and site.debris() == []


def test_concurrent_pulls_of_one_image_convert_once_and_all_succeed(registry, site):
    img = ImageBuilder(oci=True).layer(
        [directory("d"), *[file(f"d/f{i}", os.urandom(20_000)) for i in range(200)]]).build()
    registry.push("demo/herd", "1", img)
    ref = registry.ref("demo/herd", "1")
    env = dict(os.environ, HPCC_CONFIG=str(site.config))
    procs = [subprocess.Popen([tool("gateway"), "pull", "--json", ref], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["converted"] for r in results) == 1
    assert len({r["digest"] for r in results}) == 1
    assert len(site.json("images")) == 1


def test_kill_9_during_conversion_leaves_no_visible_image_and_gc_cleans(registry, site):
    img = ImageBuilder(oci=True).layer(
        [directory("d"), *[file(f"d/f{i}", os.urandom(400_000)) for i in range(150)]],
        "gzip").build()
    registry.push("demo/kill", "1", img)
    ref = registry.ref("demo/kill", "1")
    env = dict(os.environ, HPCC_CONFIG=str(site.config))
    p = subprocess.Popen([tool("gateway"), "pull", ref], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not site.debris() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert site.json("images") == []
    site.run("gc", check=True)
    assert site.debris() == []
    assert site.json("pull", ref)["converted"] is True
    assert len(site.json("images")) == 1


@pytest.mark.parametrize("fmt", ["oci-layout", "oci-archive", "docker-archive"])
def test_import_air_gapped_formats(tmp_path, site, fmt):
    img = busybox_image(oci=(fmt != "docker-archive"))
    target = tmp_path / ("layout" if fmt == "oci-layout" else "image.tar")
    if fmt == "oci-layout":
        write_oci_layout(str(target), img)
    elif fmt == "oci-archive":
        write_oci_archive(str(target), img)
    else:
        write_docker_archive(str(target), img)
    res = site.json("import", target, "--tag", "local/imported:1")
    assert res["digest"].startswith("sha256:")
    info = site.json("inspect", "local/imported:1")
    assert info["config"]["Cmd"] == ["/bin/sh"]
    assert info["import_format"] == fmt


def test_docker_archive_with_compressed_layers_is_checked_against_diff_ids(tmp_path, site):
    img = busybox_image(oci=False)
    good = write_docker_archive(str(tmp_path / "good.tar"), img, compressed=True)
    res = site.json("import", good, "--tag", "local/compressed:1")
    assert res["digest"] == img.config_digest
    assert site.json("inspect", "local/compressed:1")["config"]["Cmd"] == ["/bin/sh"]
    # a well-formed gzip layer whose tar is not the one the config's diff_id names
    lay = img.layers[-1]
    swapped = dataclasses.replace(lay, blob=gzip.compress(lay.tar + bytes(10240), mtime=0))
    bad = write_docker_archive(str(tmp_path / "bad.tar"),
                               dataclasses.replace(img, layers=img.layers[:-1] + [swapped]),
                               compressed=True)
    p = site.run("import", bad, "--tag", "local/compressed:2")
    assert_one_line_error(p, 1, "corrupt")
    assert "compressed:2" not in json.dumps(site.json("images"))
    assert site.debris() == []


def test_import_of_a_corrupt_archive_is_refused(tmp_path, site):
    img = busybox_image(oci=True)
    layout = tmp_path / "layout"
    write_oci_layout(str(layout), img)
    blob = layout / "blobs" / "sha256" / img.layers[0].digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    p = site.run("import", layout)
    assert_one_line_error(p, 1, "corrupt")
    assert site.visible() == []


def test_import_of_something_else_is_refused(tmp_path, site):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert_one_line_error(site.run("import", junk), 1)
    assert_one_line_error(site.run("import", tmp_path / "missing.tar"), 2, "does not exist")


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[gateway]\ncompressor = \"lz4\"\n")
    p = subprocess.run([tool("gateway"), "images"], env=dict(os.environ, HPCC_CONFIG=str(cfg)),
                       capture_output=True, text=True)
    assert_one_line_error(p, 1, "gateway.compressor")


def test_non_tty_output_is_plain_lines_with_elapsed_times(registry, site):
    registry.push("demo/plain", "1", busybox_image())
    p = site.run("pull", registry.ref("demo/plain", "1"), check=True)
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert lines and all(x.startswith("[") and "s]" in x for x in lines), lines
    assert "\x1b[" not in p.stderr


@pytest.mark.root
def test_user_pulls_into_own_store_and_runs_it_unprivileged(registry, test_user):
    """`hpcc pull` as an ordinary user: the user's own store, then `hpcc run` of it."""
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="hpcc-userpull-"))  # pytest's tmp is root-only
    try:
        _user_pull_and_run(registry, test_user, tmp_path, pwd, shutil)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _user_pull_and_run(registry, test_user, tmp_path, pwd, shutil):
    registry.push("demo/userpull", "1", busybox_image())
    ref = registry.ref("demo/userpull", "1")
    home = tmp_path / "home"
    home.mkdir()
    shutil.chown(home, test_user.pw_uid, test_user.pw_gid)
    os.chmod(tmp_path, 0o755)
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/site"\n'
                   f'user_path = "{home}/images"\n[launcher]\nmount_cwd = false\n')
    env = {"HPCC_CONFIG": str(cfg), "HOME": str(home), "PATH": "/usr/bin:/bin",
           "USER": test_user.pw_name}

    def as_user(*args):
        return subprocess.run([tool("hpcc"), *args], env=env, text=True, capture_output=True,
                              user=test_user.pw_uid, group=test_user.pw_gid, cwd="/",
                              timeout=120)

    p = as_user("pull", "--json", ref)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["path"].startswith(str(home / "images"))
    assert os.stat(res["path"]).st_uid == test_user.pw_uid
    rows = json.loads(as_user("images", "--json").stdout)
    assert [r["tags"] for r in rows] == [[ref]]
    p = as_user("run", "--no-home", ref, "--", "/app/hello.sh")
    assert p.returncode == 0, p.stderr
    assert f"uid {test_user.pw_uid}" in p.stdout
    p = as_user("run", "--no-home", registry.ref("demo/not-pulled", "1"), "--", "true")
    assert p.returncode == 125 and "hpcc pull" in p.stderr
    assert pwd.getpwuid(os.stat(home / "images").st_uid).pw_name == test_user.pw_name


def test_tty_output_shows_progress_bars(registry, site):
    """On a terminal the pull draws rich progress bars (run under script(1)'s pty)."""
    import shlex

    registry.push("demo/tty", "1", busybox_image())
    cmd = " ".join(shlex.quote(c) for c in [tool("gateway"), "pull", registry.ref("demo/tty", "1")])
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                       env=dict(os.environ, HPCC_CONFIG=str(site.config), TERM="xterm",
                                COLUMNS="120"), timeout=120)
    assert p.returncode == 0, p.stdout
    assert "\x1b[" in p.stdout            # terminal control sequences: a live display
    assert "layer" in p.stdout and "squashfs" in p.stdout
    assert "pulled" in p.stdout


def test_gc_blobs_prunes_only_unused_layers_and_dry_run_keeps_them(registry, site):
    keep = ImageBuilder(oci=True).layer([file("k", b"keep me")]).build()
    drop = ImageBuilder(oci=True).layer([file("d", b"drop me")]).build()
    registry.push("demo/gc-keep", "1", keep)
    registry.push("demo/gc-drop", "1", drop)
    site.json("pull", registry.ref("demo/gc-keep", "1"))
    site.json("pull", registry.ref("demo/gc-drop", "1"))
    site.json("rm", registry.ref("demo/gc-drop", "1"))
    blobs = site.path / ".blobs" / "sha256"
    dropped = blobs / drop.layers[0].digest.split(":")[1]
    kept = blobs / keep.layers[0].digest.split(":")[1]
    assert dropped.exists() and kept.exists()
    out = site.json("gc", "--blobs", "--dry-run")
    assert str(dropped) in out["removed"] and dropped.exists()
    out = site.json("gc", "--blobs")
    assert str(dropped) in out["removed"]
    assert not dropped.exists() and kept.exists()


def test_import_of_a_multi_platform_layout_picks_the_platform(tmp_path, site):
    from hpcc.testkit.images import image_index, simple_image

    idx = image_index([simple_image("amd", oci=True, architecture="amd64"),
                       simple_image("arm", oci=True, architecture="arm64")])
    layout = tmp_path / "multi"
    write_oci_layout(str(layout), idx)
    res = site.json("import", layout, "--platform", "linux/arm64", "--tag", "local/multi:arm")
    assert res["digest"] == idx.images[1].digest
    p = site.run("import", layout, "--platform", "linux/s390x")
    assert_one_line_error(p, 1, "linux/s390x", "linux/amd64, linux/arm64")
