"""Conversion overlaps the download of a layer still arriving, and never publishes bytes
that later fail their digest check (a slow and a corrupting FaultProxy in front of a real
registry)."""
import os
import time

import pytest

from hpcc.errors import ImageError
from hpcc.gateway.progress import Reporter
from hpcc.gateway.pull import pull
from hpcc.gateway.registry import RegistryClient
from hpcc.squashfs import SquashfsReader
from hpcc.store import Store
from hpcc.testkit.images import ImageBuilder, directory, file


class Timeline(Reporter):
    """Records when the big layer finished downloading and when conversion first wrote
    file data."""

    def __init__(self, digest):
        super().__init__(quiet=True)
        self.digest = digest
        self.first_data = None
        self.download_done = None

    def download(self, event, digest, done, total):
        if digest == self.digest and event == "done":
            self.download_done = time.monotonic()

    def converted_bytes(self, n):
        if self.first_data is None:
            self.first_data = time.monotonic()


def _config(tmp_path, proxy_host):
    return {"store": {"path": str(tmp_path / "store"), "user_path": str(tmp_path / "u"),
                      "blob_cache": ""},
            "gateway": {"compressor": "zstd", "level": 0, "block_size": 131072, "workers": 2,
                        "concurrent_downloads": 4, "retries": 0, "strip_setuid": True,
                        "strip_sticky": False, "keep_user_xattrs": True, "platform": ""},
            "registries": {}}


def _tree(sqfs):
    with SquashfsReader(str(sqfs)) as r:
        return {e.path: (e.type, e.size) for e in r.walk()}


def test_a_slow_layer_is_converted_while_it_downloads(registry, fault_proxy, tmp_path):
    files = [file(f"d/f{i:02}", os.urandom(60_000)) for i in range(50)]
    img = ImageBuilder(oci=True).layer([directory("d"), *files], "none").build()
    registry.push("stream/slow", "1", img)
    fault_proxy.throttle = 1_000_000  # about 3 s for the layer
    cfg = _config(tmp_path, fault_proxy.host)
    store = Store(cfg["store"]["path"], create=True)
    timeline = Timeline(img.layers[0].digest)
    res = pull(fault_proxy.ref("stream/slow", "1"), store=store, config=cfg, reporter=timeline)
    assert res.converted
    assert timeline.first_data < timeline.download_done - 0.5, \
        "conversion waited for the whole download"
    tree = _tree(res.record.sqfs_path)
    assert sum(1 for p in tree if p.startswith("/d/f")) == 50
    with SquashfsReader(res.record.sqfs_path) as r:
        assert r.read_file("d/f07") == files[7].content
        assert r.read_file("d/f49") == files[49].content


def test_bytes_that_fail_the_digest_check_are_never_published(registry, fault_proxy, tmp_path):
    img = ImageBuilder(oci=True).layer(
        [directory("d"), *[file(f"d/f{i}", os.urandom(50_000)) for i in range(40)]],
        "gzip").build()
    registry.push("stream/corrupt", "1", img)
    cfg = _config(tmp_path, fault_proxy.host)
    store = Store(cfg["store"]["path"], create=True)
    client = RegistryClient(cfg)
    resolve = client.resolve

    def resolve_then_corrupt(*a, **kw):
        out = resolve(*a, **kw)
        fault_proxy.throttle = 2_000_000
        fault_proxy.corrupt_blob(times=5, offset=len(img.layers[0].blob) - 100)
        return out

    client.resolve = resolve_then_corrupt
    with pytest.raises(ImageError, match="digest"):
        pull(fault_proxy.ref("stream/corrupt", "1"), store=store, config=cfg, client=client)
    assert [n for n in os.listdir(store.root) if n.endswith((".sqfs", ".json"))] == []
    assert os.listdir(store.tmp_dir) == []
