"""Failures a real registry will not produce on demand, injected by FaultProxy in front of
the real docker-registry: corrupt bytes, 5xx bursts, connections cut mid-blob."""
import json
import os
import uuid

import pytest

from hpcc.errors import ImageError, RegistryError
from hpcc.gateway.blobcache import BlobCache
from hpcc.gateway.registry import RegistryClient
from hpcc.reference import parse_reference
from hpcc.testkit.images import ImageBuilder, file, simple_image


def big_image():
    """One layer of ~600 KiB of incompressible data (so a cut lands mid-body)."""
    data = os.urandom(600 * 1024)
    return ImageBuilder().layer([file("blob.bin", data)], compression="none").build()


@pytest.fixture
def pushed(registry):
    built = big_image()
    name = f"faults/img-{uuid.uuid4().hex[:8]}"
    registry.push(name, "v", built)
    return built, name


@pytest.fixture
def client(client_config, no_ambient_credentials):
    with RegistryClient(client_config("[gateway]\nretries = 3\n"), backoff=0.02) as c:
        yield c


def test_corrupted_blob_is_an_image_error_and_nothing_is_cached(fault_proxy, pushed, client,
                                                                 tmp_path):
    built, name = pushed
    img = client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    cache = BlobCache(tmp_path / "cache")
    fault_proxy.corrupt_blob()
    digest = built.layers[0].digest
    with pytest.raises(ImageError) as ei:
        client.fetch_layers(img, cache)
    msg = str(ei.value)
    assert msg.startswith(f"layer {digest} of {img.ref} has digest sha256:")
    assert msg.endswith(f"instead of {digest}; the registry served corrupt data")
    assert ei.value.exit_code == 1
    assert not cache.has(digest)
    assert not any(n for n in os.listdir(cache.dir) if not n.endswith(".lock")), \
        "neither a final blob nor a partial one may remain"
    # the next attempt (no fault) downloads it afresh and succeeds
    path = client.fetch_layers(img, cache)[0]
    assert path.read_bytes() == built.layers[0].blob


def test_corrupted_config_is_an_image_error(fault_proxy, pushed, client):
    _, name = pushed
    fault_proxy.corrupt_blob()               # the first blob GET of resolve is the config
    with pytest.raises(ImageError, match=r"config of .* has digest sha256:.* instead of"):
        client.resolve(parse_reference(fault_proxy.ref(name, "v")))


def test_retry_after_503s_succeeds(fault_proxy, pushed, client, tmp_path):
    built, name = pushed
    fault_proxy.fail(2, status=503)
    img = client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    assert img.manifest_digest == built.digest
    fault_proxy.fail(3, status=503, what="blob")
    paths = client.fetch_layers(img, BlobCache(tmp_path / "cache"))
    assert paths[0].read_bytes() == built.layers[0].blob
    statuses = [e["status"] for e in fault_proxy.log]
    assert statuses.count(503) == 5


def test_persistent_5xx_gives_up_with_one_line(fault_proxy, pushed, client):
    _, name = pushed
    fault_proxy.fail(100, status=500, what="manifest")
    with pytest.raises(RegistryError) as ei:
        client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    msg = str(ei.value)
    assert f"registry {fault_proxy.host} failed with HTTP 500" in msg
    assert "after 4 attempts" in msg and "\n" not in msg
    assert ei.value.exit_code == 3
    manifest_gets = [e for e in fault_proxy.log if e["kind"] == "manifest"]
    assert len(manifest_gets) == 4                     # 1 + retries


def test_cut_download_resumes_with_a_range_request(fault_proxy, pushed, client, tmp_path):
    built, name = pushed
    img = client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    digest = built.layers[0].digest
    fault_proxy.cut_blob(after_bytes=200 * 1024)
    events = []
    paths = client.fetch_layers(img, BlobCache(tmp_path / "cache"),
                                progress=lambda *a: events.append(a))
    assert paths[0].read_bytes() == built.layers[0].blob
    gets = fault_proxy.blob_gets(digest)
    assert len(gets) == 2
    assert gets[0]["range"] is None
    assert gets[1]["range"] == f"bytes={200 * 1024}-" and gets[1]["status"] == 206
    assert any(e[0] == "retry" for e in events)


def test_partial_file_from_an_interrupted_pull_is_resumed(fault_proxy, pushed, client_config,
                                                          no_ambient_credentials, tmp_path):
    """A pull that gave up leaves the partial blob; the next pull asks only for the rest."""
    built, name = pushed
    digest = built.layers[0].digest
    cache = BlobCache(tmp_path / "cache")
    with RegistryClient(client_config("[gateway]\nretries = 0\n"), backoff=0.01) as c:
        img = c.resolve(parse_reference(fault_proxy.ref(name, "v")))
        fault_proxy.cut_blob(after_bytes=300 * 1024)
        with pytest.raises(RegistryError, match="resumes where it stopped"):
            c.fetch_layers(img, cache)
    assert cache.partial_size(digest) == 300 * 1024
    assert not cache.has(digest)
    with RegistryClient(client_config("[gateway]\nretries = 0\n"), backoff=0.01) as c:
        img = c.resolve(parse_reference(fault_proxy.ref(name, "v")))
        paths = c.fetch_layers(img, cache)
    assert paths[0].read_bytes() == built.layers[0].blob
    assert fault_proxy.blob_gets(digest)[-1]["range"] == f"bytes={300 * 1024}-"
    assert cache.partial_size(digest) == 0


def test_server_ignoring_range_falls_back_to_a_full_download(fault_proxy, pushed, client,
                                                             tmp_path):
    built, name = pushed
    digest = built.layers[0].digest
    img = client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    fault_proxy.ignore_range = True
    fault_proxy.cut_blob(after_bytes=100 * 1024)
    paths = client.fetch_layers(img, BlobCache(tmp_path / "cache"))
    assert paths[0].read_bytes() == built.layers[0].blob
    gets = fault_proxy.blob_gets(digest)
    assert len(gets) == 2 and gets[1]["status"] == 200    # Range dropped: whole blob again


def test_manifest_500_then_success(fault_proxy, client):
    from hpcc.testkit.images import simple_image as si
    built = si("m500")
    fault_proxy.upstream.push("faults/m500", "v", built)
    fault_proxy.fail(1, status=500, what="manifest")
    img = client.resolve(parse_reference(fault_proxy.ref("faults/m500", "v")))
    assert img.manifest_digest == built.digest


def test_layers_download_concurrently(fault_proxy, client, tmp_path):
    """Several layers are in flight at once (the proxy sees overlapping requests)."""
    built = simple_image("concurrent", layers=6)
    fault_proxy.upstream.push("faults/conc", "v", built)
    img = client.resolve(parse_reference(fault_proxy.ref("faults/conc", "v")))
    import threading
    seen = set()
    lock = threading.Lock()

    def progress(event, digest, done, total):
        if event == "start":
            with lock:
                seen.add(threading.current_thread().name)

    paths = client.fetch_layers(img, BlobCache(tmp_path / "c"), progress=progress,
                                concurrency=4)
    assert [p.read_bytes() for p in paths] == [lay.blob for lay in built.layers]
    assert len(seen) > 1


SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "faults/s1", "tag": "v",
                      "architecture": "amd64", "fsLayers": [], "history": [],
                      "signatures": []}).encode()


@pytest.mark.parametrize("body,ctype,match", [
    (SCHEMA1, "application/vnd.docker.distribution.manifest.v1+prettyjws",
     "deprecated Docker schema 1 manifest format"),
    (b"<html>proxy error page</html>", "text/html", "is not valid JSON"),
    (b'["a", "list"]', "application/vnd.oci.image.manifest.v1+json", "is not a JSON object"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "config": {"digest": "sha256:xyz", "size": 2},
                 "layers": []}).encode(), None, "has no valid config descriptor"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.artifact.v1+json"}
                ).encode(), "application/vnd.oci.artifact.v1+json", "unsupported media type"),
], ids=["schema1", "html", "json-list", "bad-config-digest", "artifact"])
def test_bad_manifests_are_image_errors(fault_proxy, pushed, client, body, ctype, match):
    _, name = pushed
    fault_proxy.replace_manifest(body, ctype)
    with pytest.raises(ImageError, match=match) as ei:
        client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    assert "\n" not in str(ei.value) and ei.value.exit_code == 1


def test_manifest_not_matching_its_digest_is_refused(fault_proxy, pushed, client):
    built, name = pushed
    other = simple_image("other").manifest_bytes
    fault_proxy.replace_manifest(other)
    with pytest.raises(ImageError, match=f"has digest sha256:.* instead of {built.digest}"):
        client.resolve(parse_reference(f"{fault_proxy.host}/{name}@{built.digest}"))
    # by tag, the registry's Docker-Content-Digest header gives the lie away
    fault_proxy.replace_manifest(other, digest_header="keep")
    with pytest.raises(ImageError, match="but the registry announced"):
        client.resolve(parse_reference(fault_proxy.ref(name, "v")))


def test_blob_deleted_from_the_registry_is_blob_unknown(registry, client, tmp_path):
    built = simple_image("deleted")
    name = f"faults/deleted-{uuid.uuid4().hex[:8]}"
    registry.push(name, "v", built)
    img = client.resolve(parse_reference(registry.ref(name, "v")))
    import requests
    victim = built.layers[1].digest
    r = requests.delete(f"{registry.url}/v2/{name}/blobs/{victim}", timeout=10)
    assert r.status_code == 202
    with pytest.raises(RegistryError, match=f"layer {victim} of .* not found in registry "
                                            r".* \(blob unknown\)"):
        client.fetch_layers(img, BlobCache(tmp_path / "cache"))


def test_one_failed_layer_stops_the_other_downloads(registry, fault_proxy, client, tmp_path):
    """A missing layer fails the pull at once; a slow download in flight stops within a
    chunk (keeping its partial file for a resume) instead of running to its end."""
    import time
    slow = os.urandom(4 << 20)
    built = (ImageBuilder().layer([file("slow", slow)], compression="none")
             .layer([file("gone", b"x")]).build())
    name = f"faults/stop-{uuid.uuid4().hex[:8]}"
    registry.push(name, "v", built)
    img = client.resolve(parse_reference(fault_proxy.ref(name, "v")))
    import requests
    assert requests.delete(f"{registry.url}/v2/{name}/blobs/{built.layers[1].digest}",
                           timeout=10).status_code == 202
    fault_proxy.throttle = 1 << 20                     # 4 s for the big layer
    cache = BlobCache(tmp_path / "cache")
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=r"\(blob unknown\)"):
        client.fetch_layers(img, cache, concurrency=2)
    assert time.monotonic() - t0 < 2.5
    assert not cache.has(built.layers[0].digest)
    # what arrived before the stop (possibly nothing yet) stays for a resume
    assert cache.partial_size(built.layers[0].digest) < len(built.layers[0].blob)
