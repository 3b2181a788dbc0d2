"""Failure paths of the squashfs binding: clean one-line errors, no leaked handles, no debris."""
import io
import os
import subprocess

import pytest

from hpcc.errors import SquashfsError
from hpcc.squashfs import Dir, File, Symlink
from hpcc.squashfs.reader import SquashfsReader
from hpcc.squashfs.writer import SquashfsWriter


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _fds_into(directory):
    """Open descriptors of this process on files under `directory` (the writers' files)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


def _threads():
    return len(os.listdir("/proc/self/task"))


class Boom(Exception):
    pass


class FailingStream:
    """Gives `good` chunks of data, then raises (a registry connection dropping mid-blob)."""

    def __init__(self, good=3):
        self.good = good

    def readinto(self, buf):
        if self.good == 0:
            raise Boom("connection reset")
        self.good -= 1
        n = min(len(buf), 300_000)
        buf[:n] = os.urandom(n)
        return n


def _small_image(path):
    with SquashfsWriter(path) as w:
        root = Dir()
        root.children["a"] = File(data=w.add_bytes(os.urandom(500_000)))
        root.children["l"] = Symlink("a")
        w.finish(root)


def test_existing_path_is_refused_and_left_untouched(tmp_path):
    p = tmp_path / "exists.sqfs"
    p.write_bytes(b"precious")
    with pytest.raises(SquashfsError, match="cannot create squashfs image .*File exists"):
        SquashfsWriter(p)
    assert p.read_bytes() == b"precious"


def test_bad_settings_are_refused_before_any_file_is_made(tmp_path):
    p = tmp_path / "x.sqfs"
    with pytest.raises(SquashfsError, match="unknown squashfs compressor"):
        SquashfsWriter(p, compressor="lzo")
    with pytest.raises(SquashfsError, match="level 99 out of range"):
        SquashfsWriter(p, compressor="zstd", level=99)
    with pytest.raises(SquashfsError, match="level 10 out of range 1..9"):
        SquashfsWriter(p, compressor="gzip", level=10)
    with pytest.raises(SquashfsError, match="block size"):
        SquashfsWriter(p, block_size=100_000)
    assert not p.exists()


def test_stream_error_propagates_and_leaves_no_file(tmp_path):
    p = tmp_path / "partial.sqfs"
    with pytest.raises(Boom):
        with SquashfsWriter(p) as w:
            w.add_bytes(b"some earlier file")
            w.add_file_data(FailingStream())
    assert not p.exists()


def test_writer_is_unusable_after_a_stream_error_but_closes_cleanly(tmp_path):
    p = tmp_path / "partial.sqfs"
    w = SquashfsWriter(p)
    with pytest.raises(Boom):
        w.add_file_data(FailingStream(5))    # fails after 1 MiB was handed over
    with pytest.raises(SquashfsError, match="unusable after an earlier error"):
        w.add_bytes(b"more")
    with pytest.raises(SquashfsError, match="unusable"):
        w.finish(Dir())
    w.close()
    w.close()   # idempotent
    assert not p.exists()
    with pytest.raises(SquashfsError, match="closed"):
        w.fileno()


def test_two_hundred_aborted_writers_leak_no_descriptor_or_thread(tmp_path):
    def one(i):
        p = tmp_path / f"w{i}.sqfs"
        try:
            with SquashfsWriter(p, workers=2) as w:
                w.add_bytes(b"x" * 1000)
                w.add_file_data(FailingStream(6))
        except Boom:
            pass
        assert not p.exists()

    one(-1)     # warm-up: imports, first cffi allocations
    fds, threads = _fds(), _threads()
    for i in range(200):
        one(i)
    # Other session fixtures (registry servers, proxies) may close descriptors of their
    # own meanwhile: the total must not grow, and none may point at a writer's file.
    assert _fds() <= fds and _fds_into(tmp_path) == []
    assert _threads() <= threads
    assert os.listdir(tmp_path) == []


def test_finished_writers_leak_nothing_either(tmp_path):
    fds, threads = _fds(), _threads()
    for i in range(50):
        _small_image(tmp_path / f"ok{i}.sqfs")
    assert _fds() <= fds and _fds_into(tmp_path) == [] and _threads() <= threads
    assert len(os.listdir(tmp_path)) == 50


def test_stream_failing_before_any_data_leaves_the_writer_usable(tmp_path):
    with SquashfsWriter(tmp_path / "u.sqfs") as w:
        with pytest.raises(Boom):
            w.add_file_data(FailingStream(0))
        with pytest.raises(SquashfsError, match="ended after 0 of 10 bytes"):
            w.add_file_data(io.BytesIO(b""), size=10)
        w.finish(Dir(children={"f": File(data=w.add_bytes(b"fine"))}))
    with SquashfsReader(tmp_path / "u.sqfs") as r:
        assert r.read_file("f") == b"fine"


def test_short_stream_with_declared_size_is_an_error(tmp_path):
    with SquashfsWriter(tmp_path / "s.sqfs") as w:
        with pytest.raises(SquashfsError, match="ended after 3 of 10 bytes"):
            w.add_file_data(io.BytesIO(b"abc"), size=10)
    assert not (tmp_path / "s.sqfs").exists()


def test_declared_size_stops_reading_there(tmp_path):
    src = io.BytesIO(b"0123456789" * 300_000)
    with SquashfsWriter(tmp_path / "s.sqfs") as w:
        fd1 = w.add_file_data(src, size=2_500_000)
        fd2 = w.add_file_data(src, size=5)          # the same stream goes on
        root = Dir(children={"a": File(data=fd1), "b": File(data=fd2)})
        w.finish(root)
    assert (fd1.size, fd2.size) == (2_500_000, 5)
    with SquashfsReader(tmp_path / "s.sqfs") as r:
        assert r.read_file("a") == (b"0123456789" * 300_000)[:2_500_000]
        assert r.read_file("/b") == b"01234"


def test_read_only_streams_work_too(tmp_path):
    class ReadOnly:
        def __init__(self, data):
            self.f = io.BytesIO(data)

        def read(self, n=-1):
            return self.f.read(min(n, 7777))    # short reads are not EOF

    data = os.urandom(1_000_000)
    with SquashfsWriter(tmp_path / "r.sqfs") as w:
        w.finish(Dir(children={"f": File(data=w.add_file_data(ReadOnly(data)))}))
    with SquashfsReader(tmp_path / "r.sqfs") as r:
        assert r.read_file("f") == data


@pytest.mark.parametrize("name", ["a/b", "", ".", "..", "nul\0byte", "x" * 256, "\ud800"])
def test_bad_names_are_refused(tmp_path, name):
    with SquashfsWriter(tmp_path / "n.sqfs") as w:
        with pytest.raises(SquashfsError, match="file name"):
            w.finish(Dir(children={name: File()}))
    assert not (tmp_path / "n.sqfs").exists()


def test_names_that_encode_alike_are_refused(tmp_path):
    with SquashfsWriter(tmp_path / "n.sqfs") as w:
        with pytest.raises(SquashfsError, match="same bytes"):
            w.finish(Dir(children={"\u00e9": File(), "\udcc3\udca9": File()}))


def test_directory_hard_links_and_cycles_are_refused(tmp_path):
    sub = Dir()
    with SquashfsWriter(tmp_path / "h.sqfs") as w:
        with pytest.raises(SquashfsError, match="cannot be hard-linked"):
            w.finish(Dir(children={"a": sub, "b": sub}))
    root = Dir()
    root.children["loop"] = root
    with SquashfsWriter(tmp_path / "c.sqfs") as w:
        with pytest.raises(SquashfsError, match="cannot be hard-linked"):
            w.finish(root)


@pytest.mark.parametrize("key", ["system.posix_acl_access", "foo", "user.a\0b"])
def test_xattrs_squashfs_cannot_store_are_refused(tmp_path, key):
    with SquashfsWriter(tmp_path / "x.sqfs") as w:
        with pytest.raises(SquashfsError, match="xattr"):
            w.finish(Dir(children={"f": File(xattrs={key: b"v"})}))


@pytest.mark.parametrize("field,value", [("uid", -1), ("gid", 2**32), ("mode", "rw")])
def test_bad_metadata_is_refused(tmp_path, field, value):
    f = File()
    setattr(f, field, value)
    with SquashfsWriter(tmp_path / "m.sqfs") as w:
        with pytest.raises(SquashfsError, match="bad metadata"):
            w.finish(Dir(children={"f": f}))


def test_out_of_range_mtimes_are_clamped(tmp_path):
    with SquashfsWriter(tmp_path / "t.sqfs") as w:
        w.finish(Dir(children={"old": File(mtime=-5), "new": File(mtime=2**40)}))
    with SquashfsReader(tmp_path / "t.sqfs") as r:
        e = {x.path: x for x in r.walk()}
    assert e["/old"].mtime == 0 and e["/new"].mtime == 2**32 - 1


def test_file_data_of_another_writer_is_refused(tmp_path):
    with SquashfsWriter(tmp_path / "a.sqfs") as a, SquashfsWriter(tmp_path / "b.sqfs") as b:
        fd = a.add_bytes(b"data of a")
        with pytest.raises(SquashfsError, match="another squashfs writer"):
            b.finish(Dir(children={"f": File(data=fd)}))


def test_finish_twice_and_root_must_be_a_dir(tmp_path):
    with SquashfsWriter(tmp_path / "f.sqfs") as w:
        with pytest.raises(SquashfsError, match="must be a Dir"):
            w.finish(File())
    with SquashfsWriter(tmp_path / "g.sqfs") as w:
        w.finish(Dir())
        with pytest.raises(SquashfsError, match="already finished"):
            w.finish(Dir())
        w.sync()
        assert os.fstat(w.fileno()).st_size % 4096 == 0
    assert (tmp_path / "g.sqfs").exists()     # finished images stay


def test_reader_refuses_non_squashfs_files(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(os.urandom(10_000))
    with pytest.raises(SquashfsError, match="not a squashfs image"):
        SquashfsReader(p)
    e = tmp_path / "empty"
    e.write_bytes(b"")
    with pytest.raises(SquashfsError, match="cannot read squashfs image"):
        SquashfsReader(e)
    with pytest.raises(SquashfsError, match="No such file"):
        SquashfsReader(tmp_path / "missing")


def test_reader_refuses_truncated_images(tmp_path):
    good = tmp_path / "good.sqfs"
    _small_image(good)
    data = good.read_bytes()
    for cut in (50, 96, len(data) // 2, len(data) - 4096 - 1):
        bad = tmp_path / f"cut{cut}.sqfs"
        bad.write_bytes(data[:cut])
        with pytest.raises(SquashfsError, match="cannot read squashfs image"):
            with SquashfsReader(bad) as r:
                list(r.walk())
                r.read_file("a")


def test_reader_reports_corrupted_metadata_instead_of_crashing(tmp_path):
    good = tmp_path / "good.sqfs"
    _small_image(good)
    with SquashfsReader(good) as r:
        sb = r._r.super
        start, end = sb.inode_table_start, sb.bytes_used
    data = bytearray(good.read_bytes())
    data[start:end] = os.urandom(end - start)     # every table after the data garbled
    bad = tmp_path / "bad.sqfs"
    bad.write_bytes(bytes(data))
    with pytest.raises(SquashfsError):
        with SquashfsReader(bad) as r:
            list(r.walk())
            r.read_file("a")


def test_reader_errors_for_missing_paths_and_non_files(tmp_path):
    good = tmp_path / "good.sqfs"
    _small_image(good)
    with SquashfsReader(good) as r:
        with pytest.raises(SquashfsError, match="no such file"):
            r.read_file("nope")
        with pytest.raises(SquashfsError, match="not a regular file"):
            r.read_file("l")
    with pytest.raises(SquashfsError, match="closed"):
        r.info()


@pytest.mark.root
def test_full_disk_is_reported_with_its_reason(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        with SquashfsWriter(mnt / "full.sqfs", workers=1) as w:
            with pytest.raises(SquashfsError, match="No space left on device"):
                for _ in range(4):
                    w.add_bytes(os.urandom(1_000_000))
                w.finish(Dir())
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
