"""The image store: atomic publication, O(1) resolution, tags, removal, debris collection."""
import json
import multiprocessing
import os
import time

import pytest

from hpcc.errors import ImageNotFound
from hpcc.reference import parse_reference
from hpcc.resolve import resolve_image
from hpcc.store import Store

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _publish(store, digest, refs=(), payload=b"hsqs"):
    with store.lock(digest):
        tmp = store.temp_path(digest, ".sqfs")
        with open(tmp, "wb") as f:
            f.write(payload)
        return store.publish(digest, tmp, {"config": {"Cmd": ["/bin/sh"]}},
                             [parse_reference(r) for r in refs])


def test_publish_makes_image_resolvable_by_tag_and_digest(tmp_path):
    store = Store(tmp_path / "s", create=True)
    _publish(store, D1, ["127.0.0.1:5000/a/b:1.0"])
    rec = store.resolve("127.0.0.1:5000/a/b:1.0")
    assert rec.digest == D1
    assert rec.config["Cmd"] == ["/bin/sh"]
    assert open(rec.sqfs_path, "rb").read() == b"hsqs"
    assert store.resolve(D1).digest == D1
    assert store.resolve("sha256-" + "1" * 64).digest == D1
    assert store.resolve("127.0.0.1:5000/a/b@" + D1).digest == D1
    assert os.listdir(store.tmp_dir) == []


def test_resolution_never_lists_a_directory(tmp_path, monkeypatch):
    store = Store(tmp_path / "s", create=True)
    _publish(store, D1, ["docker.io/library/ubuntu:22.04"])

    def forbidden(*a, **k):
        raise AssertionError("resolution listed a directory")

    monkeypatch.setattr(os, "listdir", forbidden)
    monkeypatch.setattr(os, "scandir", forbidden)
    monkeypatch.setattr(os, "walk", forbidden)
    assert store.resolve("ubuntu:22.04").digest == D1


def test_tag_and_nested_repository_do_not_collide(tmp_path):
    store = Store(tmp_path / "s", create=True)
    _publish(store, D1, ["example.org/a/b:c"])
    _publish(store, D2, ["example.org/a/b/c:x"])
    assert store.resolve("example.org/a/b:c").digest == D1
    assert store.resolve("example.org/a/b/c:x").digest == D2


def test_missing_image_error_says_how_to_pull(tmp_path):
    store = Store(tmp_path / "s", create=True)
    with pytest.raises(ImageNotFound) as e:
        store.resolve("ubuntu:22.04")
    assert "gateway pull ubuntu:22.04" in str(e.value)


def test_sqfs_without_metadata_is_invisible_and_collected(tmp_path):
    store = Store(tmp_path / "s", create=True)
    open(store.sqfs_path(D1), "wb").write(b"partial")          # crash between renames
    open(store.temp_path(D2, ".sqfs"), "wb").write(b"partial")  # crash while converting
    assert store.find(D1) is None
    removed = store.gc()
    assert store.sqfs_path(D1) in removed
    assert not os.path.exists(store.sqfs_path(D1))
    assert os.listdir(store.tmp_dir) == []


def test_gc_spares_temp_files_of_a_running_conversion(tmp_path):
    store = Store(tmp_path / "s", create=True)
    with store.lock(D1):
        tmp = store.temp_path(D1, ".sqfs")
        open(tmp, "wb").write(b"in progress")
        store.gc()
        assert os.path.exists(tmp)


def test_remove_tag_keeps_image_while_another_tag_points_to_it(tmp_path):
    store = Store(tmp_path / "s", create=True)
    _publish(store, D1, ["example.org/x:1", "example.org/x:latest"])
    tags, gone = store.remove("example.org/x:1")
    assert gone is None and store.find(D1) is not None
    tags, gone = store.remove("example.org/x:latest")
    assert gone == D1 and store.find(D1) is None
    assert not os.path.exists(store.sqfs_path(D1))
    assert not os.path.exists(os.path.join(store.refs_dir, "example.org"))


def test_remove_by_digest_drops_its_tags(tmp_path):
    store = Store(tmp_path / "s", create=True)
    _publish(store, D1, ["example.org/x:1"])
    tags, gone = store.remove(D1)
    assert tags == ["example.org/x:1"] and gone == D1
    assert store.find("example.org/x:1") is None


def test_gc_removes_dangling_tags(tmp_path):
    store = Store(tmp_path / "s", create=True)
    store.tag(parse_reference("example.org/x:1"), D2)
    store.gc()
    assert list(store.iter_refs()) == []


def _hold_lock(root, digest, started, seconds):
    store = Store(root)
    with store.lock(digest):
        started.set()
        time.sleep(seconds)


def test_lock_excludes_other_processes(tmp_path):
    store = Store(tmp_path / "s", create=True)
    started = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold_lock, args=(store.root, D1, started, 1.0))
    p.start()
    try:
        assert started.wait(10)
        with store.lock(D1, blocking=False) as got:
            assert got is False
        t0 = time.monotonic()
        with store.lock(D1) as got:
            assert got is True
            assert time.monotonic() - t0 > 0.3
    finally:
        p.join()


def test_resolve_image_accepts_a_sqfs_path_with_metadata_beside_it(tmp_path):
    img = tmp_path / "app.sqfs"
    img.write_bytes(b"hsqs")
    (tmp_path / "app.json").write_text(json.dumps({"config": {"Env": ["A=1"]}}))
    rec = resolve_image(str(img), {"store": {"path": str(tmp_path / "x"),
                                             "user_path": str(tmp_path / "y")}})
    assert rec.sqfs_path == str(img) and rec.config["Env"] == ["A=1"]


def test_resolve_image_prefers_the_users_store(tmp_path, monkeypatch):
    site = Store(tmp_path / "site", create=True)
    user = Store(tmp_path / "user", create=True)
    _publish(site, D1, ["example.org/x:1"])
    _publish(user, D2, ["example.org/x:1"])
    cfg = {"store": {"path": site.root, "user_path": user.root}}
    monkeypatch.delenv("HPCC_STORE", raising=False)
    monkeypatch.delenv("HPCC_USER_STORE", raising=False)
    assert resolve_image("example.org/x:1", cfg).digest == D2
    user.remove("example.org/x:1")
    assert resolve_image("example.org/x:1", cfg).digest == D1
    with pytest.raises(ImageNotFound) as e:
        resolve_image("example.org/y:1", cfg)
    assert "hpcc pull example.org/y:1" in str(e.value)
