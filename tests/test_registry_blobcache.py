"""The digest-addressed blob cache: atomic publish, verification, concurrent writers of the
same blob (threads and processes, fetching from the real registry), pruning."""
import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from hpcc.errors import ImageError
from hpcc.gateway.blobcache import BlobCache
from hpcc.gateway.registry import RegistryClient
from hpcc.reference import parse_reference
from hpcc.testkit.images import ImageBuilder, file


def _digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_ingest_publishes_read_only_blob_atomically(tmp_path):
    cache = BlobCache(tmp_path)
    data = b"hello blob" * 1000
    d = _digest(data)
    with cache.ingest(d, len(data)) as ing:
        ing.write(data[:5000])
        assert not cache.has(d)                      # nothing visible before commit
        assert ing.partial.exists()
        ing.write(data[5000:])
        path = ing.commit()
    assert cache.has(d, len(data)) and not cache.has(d, len(data) + 1)
    assert path == cache.path(d) == tmp_path / "sha256" / d.split(":")[1]
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert not ing.partial.exists()
    with cache.ingest(d, len(data)) as again:
        assert again is None                         # already complete


def test_wrong_size_or_digest_leaves_nothing(tmp_path):
    cache = BlobCache(tmp_path)
    data = b"x" * 100
    d = _digest(data)
    with pytest.raises(ImageError, match="has 99 bytes instead of 100"):
        with cache.ingest(d, 100) as ing:
            ing.write(data[:99])
            ing.commit("layer X")
    with pytest.raises(ImageError, match="larger than the 100 bytes"):
        with cache.ingest(d, 100) as ing:
            ing.write(data + b"!")
    with pytest.raises(ImageError, match=f"layer Y has digest {_digest(b'y' * 100)} instead "
                                         f"of {d}"):
        with cache.ingest(d, 100) as ing:
            ing.restart()
            ing.write(b"y" * 100)
            ing.commit("layer Y")
    assert not cache.has(d)
    assert [n for n in os.listdir(cache.dir) if not n.endswith(".lock")] == []


def test_partial_data_survives_for_resume(tmp_path):
    cache = BlobCache(tmp_path)
    data = os.urandom(10000)
    d = _digest(data)
    with pytest.raises(RuntimeError):
        with cache.ingest(d, len(data)) as ing:
            ing.write(data[:4000])
            raise RuntimeError("connection lost")
    assert cache.partial_size(d) == 4000
    with cache.ingest(d, len(data)) as ing:
        assert ing.offset == 4000                    # rehashed from the partial file
        ing.write(data[4000:])
        ing.commit()
    assert cache.path(d).read_bytes() == data


def test_malformed_digest_is_refused(tmp_path):
    with pytest.raises(ImageError, match="malformed digest"):
        BlobCache(tmp_path).path("sha256:../../etc/passwd")
    with pytest.raises(ImageError, match="malformed digest"):
        BlobCache(tmp_path).path("md5:d41d8cd98f00b204e9800998ecf8427e")


def test_prune_keeps_only_the_given_digests(tmp_path):
    cache = BlobCache(tmp_path)
    blobs = [os.urandom(100 + i) for i in range(3)]
    for b in blobs:
        cache.put_bytes(_digest(b), b)
    # a stale partial of another blob
    stale = os.urandom(50)
    with pytest.raises(RuntimeError):
        with cache.ingest(_digest(stale), 50) as ing:
            ing.write(stale[:10])
            raise RuntimeError
    gone = {cache.path(_digest(blobs[1])), cache.path(_digest(blobs[2])),
            cache._partial(_digest(stale))}
    assert set(cache.prune([_digest(blobs[0])], dry_run=True)) == gone
    assert len(cache.digests()) == 3
    assert set(cache.prune([_digest(blobs[0])])) == gone
    assert cache.digests() == [_digest(blobs[0])]
    assert sorted(os.listdir(cache.dir)) == [_digest(blobs[0]).split(":")[1],
                                             _digest(blobs[0]).split(":")[1] + ".lock"]


@pytest.fixture
def big_blob_image(registry):
    data = os.urandom(2 * 1024 * 1024)
    built = ImageBuilder().layer([file("big", data)], compression="none").build()
    name = f"cache/conc-{uuid.uuid4().hex[:8]}"
    registry.push(name, "v", built)
    return built, parse_reference(registry.ref(name, "v"))


def test_concurrent_fetch_of_one_blob_from_threads(big_blob_image, fault_proxy, tmp_path,
                                                   no_ambient_credentials):
    built, ref = big_blob_image
    ref = parse_reference(fault_proxy.ref(ref.path, "v"))
    lay = built.layers[0]
    cache = BlobCache(tmp_path / "cache")
    client = RegistryClient({"gateway": {"retries": 1}}, backoff=0.01)
    results, errors = [], []

    def worker():
        try:
            results.append(client.fetch_blob(ref, lay.digest, lay.size, cache))
        except Exception as e:       # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    with cache.lock(lay.digest):          # all four pass the cache check, then queue here
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0].read_bytes() == lay.blob
    assert len(fault_proxy.blob_gets(lay.digest)) == 1       # downloaded once, shared
    assert sorted(os.listdir(cache.dir)) == [lay.digest.split(":")[1],
                                             lay.digest.split(":")[1] + ".lock"]


def _flock_waiters(inode):
    """Number of processes blocked in flock() on the file with this inode."""
    n = 0
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts and "FLOCK" in parts and parts[-3].split(":")[-1] == str(inode):
                n += 1
    return n


_FETCH_SCRIPT = """
import sys
from hpcc.gateway.blobcache import BlobCache
from hpcc.gateway.registry import RegistryClient
from hpcc.reference import parse_reference
ref, digest, size, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = RegistryClient({"gateway": {"retries": 1}}, backoff=0.01)
print(client.fetch_blob(parse_reference(ref), digest, size, BlobCache(root)))
"""


def test_concurrent_fetch_of_one_blob_from_processes(big_blob_image, fault_proxy, tmp_path,
                                                     no_ambient_credentials):
    built, ref = big_blob_image
    lay = built.layers[0]
    root = str(tmp_path / "cache")
    # Separate interpreters (cwd outside the checkout: they import the installed hpcc).
    cache = BlobCache(root)
    # Hold the digest's lock until all 4 processes wait on it (visible in /proc/locks), so
    # they really contend for the same blob.
    with cache.lock(lay.digest):
        procs = [subprocess.Popen([sys.executable, "-c", _FETCH_SCRIPT,
                                   fault_proxy.ref(ref.path, "v"), lay.digest, str(lay.size),
                                   root],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for _ in range(4)]
        inode = os.stat(cache._lockpath(lay.digest)).st_ino
        deadline = time.monotonic() + 60
        while _flock_waiters(inode) < 4:
            assert time.monotonic() < deadline, "the fetchers never blocked on the lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, out
    assert len({o.strip() for o, _ in out}) == 1
    assert out[0][0].strip() == str(cache.path(lay.digest))
    assert cache.path(lay.digest).read_bytes() == lay.blob
    assert len(fault_proxy.blob_gets(lay.digest)) == 1
    assert [n for n in os.listdir(cache.dir) if n.endswith(".partial")] == []


@pytest.mark.root
def test_full_disk_is_a_clear_store_error(registry, tmp_path, no_ambient_credentials):
    """A real ENOSPC (a 1 MiB tmpfs) is reported once, not retried as a network error."""
    built = ImageBuilder().layer([file("big", os.urandom(3 << 20))], compression="none").build()
    registry.push("cache/enospc", "v", built)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        from hpcc.errors import StoreError
        client = RegistryClient({"gateway": {"retries": 3}}, backoff=0.01)
        img = client.resolve(parse_reference(registry.ref("cache/enospc", "v")))
        before = len(client.request_log)
        with pytest.raises(StoreError) as ei:
            client.fetch_layers(img, BlobCache(mnt / "blobs"))
        msg = str(ei.value)
        assert msg.startswith(f"cannot write to the blob cache {mnt / 'blobs' / 'sha256'}: "
                              "No space left on device")
        assert "store.blob_cache" in msg
        assert len(client.request_log) == before + 1        # no retry of a local failure
        assert not BlobCache(mnt / "blobs").has(built.layers[0].digest)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
