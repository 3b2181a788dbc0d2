"""`gateway pull` end to end through the FaultProxy in front of a real docker-registry:
each failure ends in the one line that names its cause, with the exit code of its class,
and what a failed download left behind never spoils the next pull."""
import os
import subprocess
import uuid

import pytest

from hpcc.squashfs import SquashfsReader
from hpcc.testkit.images import ImageBuilder, file
from tests.conftest import tool


def _image(*sizes):
    """One uncompressed layer of random bytes per size (so a cut lands mid-body); the
    built image gets .data, the files' contents."""
    b = ImageBuilder()
    data = [os.urandom(n) for n in sizes]
    for i, d in enumerate(data):
        b.layer([file(f"data{i}.bin", d)], compression="none")
    built = b.build()
    built.data = data
    return built


@pytest.fixture
def gw(tmp_path, fault_proxy, no_ambient_credentials):
    """Runs `gateway` with a config of its own store (and gateway.retries = RETRIES)."""
    store = tmp_path / "store"

    class Gw:
        path = store
        proxy = fault_proxy

        def push(self, built):
            name = f"pullfaults/{uuid.uuid4().hex[:8]}"
            fault_proxy.upstream.push(name, "v", built)
            return fault_proxy.ref(name, "v")

        def run(self, *args, retries=1, extra="", timeout=120):
            cfg = tmp_path / "hpcc.toml"
            cfg.write_text(f'[store]\npath = "{store}"\nuser_path = "{tmp_path}/user"\n'
                           f'{extra}\n[gateway]\nretries = {retries}\nworkers = 2\n')
            env = dict(os.environ, HPCC_CONFIG=str(cfg))
            env.pop("HPCC_STORE", None)
            return subprocess.run([tool("gateway"), *map(str, args)], env=env, text=True,
                                  capture_output=True, timeout=timeout)

    return Gw()


def error_line(p):
    """The error of a failed command: exactly one line that is not a progress line."""
    assert "Traceback" not in p.stderr, p.stderr
    errs = [ln for ln in p.stderr.splitlines() if not ln.startswith("[")]
    assert len(errs) == 1, p.stderr
    assert errs[0].startswith("gateway: "), errs[0]
    return errs[0]


def read_back(sqfs, name):
    with SquashfsReader(str(sqfs)) as r:
        return r.read_file("/" + name)


def test_digest_mismatch_names_the_corrupt_layer_not_a_stopped_sibling(gw):
    """Layers 0 and 2 are large and slow; the small layer 1 arrives corrupt. The pull used
    to report layer 0's DownloadAborted (exit 3); the cause is layer 1 (exit 1)."""
    built = _image(3 << 20, 4096, 3 << 20)
    ref = gw.push(built)
    victim = built.layers[1].digest
    gw.proxy.throttle = 4 << 20
    gw.proxy.corrupt_blob(digest=victim)
    p = gw.run("pull", ref)
    assert p.returncode == 1, p.stderr
    line = error_line(p)
    assert f"layer {victim} of" in line and f"instead of {victim}" in line, line
    assert "was stopped" not in line and built.layers[0].digest not in line
    assert not any(n.endswith(".sqfs") for n in os.listdir(gw.path))


def test_retries_exhausted_names_the_failing_layer_exit_3(gw):
    built = _image(2 << 20, 300 * 1024, 2 << 20)
    ref = gw.push(built)
    victim = built.layers[1].digest
    gw.proxy.throttle = 4 << 20
    gw.proxy.cut_blob(after_bytes=1000, times=10, digest=victim)
    p = gw.run("pull", ref, retries=1)
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert f"download of layer {victim} of" in line and "after 2 attempts" in line, line
    assert "was stopped" not in line


def test_429_is_retried_after_retry_after_with_one_line_per_wait(gw):
    built = _image(4096)
    ref = gw.push(built)
    gw.proxy.fail(2, status=429, what="manifest", retry_after=1)
    p = gw.run("pull", ref, retries=3)
    assert p.returncode == 0, p.stderr
    waits = [ln for ln in p.stderr.splitlines() if "HTTP 429" in ln]
    assert len(waits) == 2, p.stderr
    assert waits[0].endswith(f"registry {gw.proxy.host} limits the request rate (HTTP 429): "
                             "waiting 1 s before retry 1 of 3")
    assert [e["status"] for e in gw.proxy.log if e["kind"] == "manifest"][:3] == \
        [429, 429, 200]


def test_429_asking_for_a_long_wait_is_not_waited_for(gw):
    ref = gw.push(_image(4096))
    gw.proxy.fail(5, status=429, what="manifest", retry_after=3600)
    p = gw.run("pull", ref, retries=3, timeout=30)
    assert p.returncode == 3
    line = error_line(p)
    assert "too many requests (rate limit)" in line and "asks to wait 3600 s" in line, line
    assert len([e for e in gw.proxy.log if e["kind"] == "manifest"]) == 1


def test_429_retries_are_bounded(gw):
    ref = gw.push(_image(4096))
    gw.proxy.fail(10, status=429, what="manifest", retry_after=0)
    p = gw.run("pull", ref, retries=2)
    assert p.returncode == 3
    assert "too many requests (rate limit) after 3 attempts" in error_line(p)
    assert len([e for e in gw.proxy.log if e["kind"] == "manifest"]) == 3


def test_wrong_bytes_kept_in_a_partial_file_are_fetched_again_not_resumed(gw):
    """A connection that delivered a flipped byte and then dropped leaves wrong bytes in
    the blob's .partial file. The next clean pull used to resume after them and fail
    (twice: exit 3 and exit 1); now it fetches the blob again from byte 0 and succeeds,
    with the right content in the image."""
    built = _image(600 * 1024)
    ref = gw.push(built)
    digest = built.layers[0].digest
    gw.proxy.cut_blob(after_bytes=300 * 1024, corrupt=True, digest=digest)
    p = gw.run("pull", ref, retries=0)
    assert p.returncode == 3, p.stderr
    partial = gw.path / ".blobs" / "sha256" / (digest[7:] + ".partial")
    assert partial.stat().st_size == 300 * 1024
    p = gw.run("pull", ref, retries=0)
    assert p.returncode == 0, p.stderr
    gets = gw.proxy.blob_gets(digest)
    assert gets[-2]["range"] == f"bytes={300 * 1024}-"        # resumed, mismatched ...
    assert gets[-1]["range"] is None and gets[-1]["status"] == 200   # ... fetched again
    assert "downloading it again from the start" in p.stderr
    sqfs = next(gw.path.glob("sha256-*.sqfs"))
    assert read_back(sqfs, "data0.bin") == built.data[0]


def test_refetch_while_the_conversion_reads_the_partial_file_converts_again(gw):
    """The conversion streams a layer from its .partial file while it downloads. When the
    download drops those bytes (resumed data that failed the digest check), the conversion
    must not publish what it read: it converts again from the verified blob."""
    built = _image(3 << 20)
    ref = gw.push(built)
    digest = built.layers[0].digest
    gw.proxy.throttle = 2 << 20
    gw.proxy.cut_blob(after_bytes=1 << 20, corrupt=True, digest=digest)
    p = gw.run("pull", ref, retries=2)
    assert p.returncode == 0, p.stderr
    gets = gw.proxy.blob_gets(digest)
    assert [g["range"] for g in gets] == [None, f"bytes={1 << 20}-", None]
    assert "converting again" in p.stderr
    sqfs = next(gw.path.glob("sha256-*.sqfs"))
    assert read_back(sqfs, "data0.bin") == built.data[0]


def test_a_resumed_blob_that_mismatches_twice_is_the_registrys_fault(gw):
    built = _image(600 * 1024)
    ref = gw.push(built)
    digest = built.layers[0].digest
    gw.proxy.cut_blob(after_bytes=300 * 1024, corrupt=True, digest=digest)
    gw.proxy.corrupt_blob(times=5, digest=digest)
    p = gw.run("pull", ref, retries=2)
    assert p.returncode == 1, p.stderr
    assert "the registry served corrupt data" in error_line(p)
    assert len(gw.proxy.blob_gets(digest)) == 3      # cut, resume, one full refetch


def test_unknown_repository_is_a_user_error(gw):
    p = gw.run("pull", gw.proxy.ref("pullfaults/no-such-repo", "v"))
    assert p.returncode == 1
    assert "not found in registry" in error_line(p)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
def test_full_blob_cache_names_gc_blobs(gw, small_tmpfs):
    ref = gw.push(_image(1 << 20))
    p = gw.run("pull", ref, extra=f'blob_cache = "{small_tmpfs}/blobs"')
    assert p.returncode == 1, p.stderr
    line = error_line(p)
    assert "No space left on device" in line and "'gateway gc --blobs'" in line, line


@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="strace is not installed")
def test_new_store_directories_are_fsynced_before_a_tag_names_them(gw, tmp_path):
    """refs/<registry>/<path>/ and .blobs/sha256 are created by the pull; each new
    directory is fsynced in its parent before the tag file under it is renamed in place."""
    ref = gw.push(_image(4096))
    trace = tmp_path / "trace"
    cfg = tmp_path / "hpcc.toml"
    p = gw.run("--version")
    assert p.returncode == 0
    env = dict(os.environ, HPCC_CONFIG=str(cfg))
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=mkdir,mkdirat,"
                    "openat,open,fsync,rename,renameat,renameat2", tool("gateway"), "pull",
                    ref], env=env, check=True, capture_output=True, timeout=120)
    lines = trace.read_text().splitlines()
    repo_dir = str(gw.path / "refs" / gw.proxy.host)
    mk = next(i for i, ln in enumerate(lines) if "mkdir" in ln and f'"{repo_dir}"' in ln)
    # the parent (refs/) is opened and fsynced after the mkdir
    opened = [i for i, ln in enumerate(lines[mk:], mk)
              if "open" in ln and f'"{gw.path / "refs"}"' in ln and "O_DIRECTORY" in ln]
    assert opened, "refs/ was not opened to be fsynced"
    fd = lines[opened[0]].rsplit("=", 1)[1].strip()
    fsync = next(i for i, ln in enumerate(lines[opened[0]:], opened[0])
                 if f"fsync({fd})" in ln)
    tag_rename = next(i for i, ln in enumerate(lines)
                      if "rename" in ln and '/@v"' in ln)
    assert mk < fsync < tag_rename
    blobs = str(gw.path / ".blobs" / "sha256")
    assert any("mkdir" in ln and f'"{blobs}"' in ln for ln in lines)


def test_blob_cache_cap_counts_partial_files_and_evicts_unused_blobs(gw):
    built = _image(300 * 1024)
    ref = gw.push(built)
    blobs = gw.path / ".blobs" / "sha256"
    blobs.mkdir(parents=True)
    orphan = blobs / ("a" * 64)
    orphan.write_bytes(os.urandom(400 * 1024))
    stale = blobs / ("b" * 64 + ".partial")
    stale.write_bytes(os.urandom(800 * 1024))
    cap = 'blob_cache_max_mb = 1'
    p = gw.run("pull", ref, extra=cap)
    assert p.returncode == 0, p.stderr
    assert not orphan.exists() and not stale.exists()     # partial files count and go too
    assert "to stay under 1 MB" in p.stderr
    # an image whose layers alone pass the cap is refused, before any download
    big = _image(1536 * 1024)
    ref = gw.push(big)
    p = gw.run("pull", ref, extra=cap)
    assert p.returncode == 1
    line = error_line(p)
    assert "beyond store.blob_cache_max_mb = 1" in line and "'gateway gc --blobs'" in line
    assert gw.proxy.blob_gets(big.layers[0].digest) == []
