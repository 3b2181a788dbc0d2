"""Round trips through real squashfs: our writer -> our reader, unsquashfs, sqfsdiff against a
tar2sqfs image of the same tree, the kernel's squashfs and squashfuse_ll."""
import io
import os
import random
import shutil
import subprocess

import pytest

from hpcc.squashfs.reader import SquashfsReader
from hpcc.squashfs.writer import SquashfsWriter
from tests.fixtures.squashfs_sample import (
    build_tree,
    check_mounted,
    expected,
    mount_fuse,
    mount_kernel,
    sample_entries,
    unmount,
    write_tar,
)

COMPRESSORS = ["zstd", "gzip"]
LEVEL = 6


@pytest.fixture(scope="module")
def sample():
    return sample_entries()


@pytest.fixture(scope="module", params=COMPRESSORS)
def images(request, sample, tmp_path_factory):
    """(ours, tar2sqfs's) images of the sample with one compressor, and our stats."""
    comp = request.param
    d = tmp_path_factory.mktemp(f"sqfs-{comp}")
    ours = d / "ours.sqfs"
    with SquashfsWriter(ours, compressor=comp, level=LEVEL) as w:
        stats = w.finish(build_tree(w, sample))
    tar = d / "sample.tar"
    write_tar(tar, sample)
    theirs = d / "tar2sqfs.sqfs"
    with open(tar, "rb") as f:
        subprocess.run(["tar2sqfs", "-q", "-c", comp, "-X", f"level={LEVEL}", str(theirs)],
                       stdin=f, check=True, capture_output=True)
    return comp, ours, theirs, stats


def test_reader_sees_every_entry_with_its_metadata_and_content(images, sample):
    comp, ours, _theirs, stats = images
    exp = expected(sample)
    with SquashfsReader(ours) as r:
        info = r.info()
        assert info["compressor"] == comp
        assert info["compressor_level"] == LEVEL
        assert info["block_size"] == 131072
        assert info["inodes"] == stats["inodes"] == len({e["inode_of"] for e in exp.values()}) + 1
        assert info["bytes_used"] == stats["bytes_used"]
        entries = list(r.walk())
        assert entries[0].path == "/" and entries[0].type == "dir"
        assert entries[0].nlink == 2 + sum(1 for p, e in exp.items()
                                           if e["type"] == "dir" and "/" not in p)
        got = {e.path[1:]: e for e in entries[1:]}
        assert set(got) == set(exp)
        ino_of = {}
        for p, e in exp.items():
            g = got[p]
            assert g.type == e["type"], p
            assert (g.mode, g.uid, g.gid, g.mtime) == (e["mode"], e["uid"], e["gid"],
                                                       e["mtime"]), p
            assert g.nlink == e["nlink"], p
            assert (g.xattrs or None) == (e.get("xattrs") or None), p
            ino_of.setdefault(e["inode_of"], set()).add(g.inode_number)
            if e["type"] == "file":
                assert g.size == len(e["data"])
                assert r.read_file(p) == e["data"], p
            elif e["type"] == "symlink":
                assert g.target == e["target"]
            elif e["type"] == "chr":
                assert g.rdev == e["rdev"]
        assert all(len(v) == 1 for v in ino_of.values())
        numbers = sorted(next(iter(v)) for v in ino_of.values()) + [entries[0].inode_number]
        assert sorted(numbers) == list(range(1, info["inodes"] + 1))


def test_unsquashfs_listing_equals_tar2sqfs_listing(images):
    _comp, ours, theirs, _ = images

    def listing(img):
        out = subprocess.run(["unsquashfs", "-lln", "-d", "", str(img)], check=True,
                             capture_output=True).stdout
        return [line for line in out.splitlines() if line and not line.startswith(b"Parallel")]

    a, b = listing(ours), listing(theirs)
    assert len(a) > 3000
    assert a == b


def test_sqfsdiff_finds_no_difference_to_tar2sqfs(images):
    _comp, ours, theirs, _ = images
    # contents, owners, permissions, timestamps and xattrs. Not inode numbers (-I): both number
    # each directory's entries together, deepest first, but tar2sqfs gives a hard-linked inode
    # the place of its first tar entry, we that of the first directory listing it.
    r = subprocess.run(["sqfsdiff", "-T", "-a", str(theirs), "-b", str(ours)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_is_no_larger_than_tar2sqfs(images):
    _comp, ours, theirs, stats = images
    assert os.path.getsize(ours) <= os.path.getsize(theirs)
    assert os.path.getsize(ours) % 4096 == 0
    assert stats["duplicate_blocks"] >= 2 and stats["duplicate_fragments"] >= 2
    assert stats["sparse_blocks"] >= 7


@pytest.mark.skipif(os.geteuid() != 0, reason="rdsquashfs needs root to mknod the sample's device")
def test_rdsquashfs_unpacks_the_image(images, sample, tmp_path):
    _comp, ours, _theirs, _ = images
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["rdsquashfs", "-u", "/", "-p", str(out), "-C", "-O", "-X", "-T", str(ours)],
                   check=True, capture_output=True)
    # rdsquashfs unpacks hard links as copies
    check_mounted(out, sample, check_nlink=False, hardlinks=False)


@pytest.mark.root
def test_kernel_mount_matches_the_tree(images, sample, tmp_path):
    _comp, ours, _theirs, _ = images
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount_kernel(ours, mnt)
        check_mounted(mnt, sample)
        # the extended directory (listing > 64 KiB, with an index) resolves every name
        names = os.listdir(mnt / "big")
        assert len(names) == 3000
        for n in names[::97]:
            assert os.stat(mnt / "big" / n).st_size == 0
    finally:
        unmount(mnt)


@pytest.mark.skipif(not shutil.which("squashfuse_ll") or not os.path.exists("/dev/fuse"),
                    reason="needs squashfuse_ll and /dev/fuse")
def test_squashfuse_ll_mount_matches_the_tree(images, sample, tmp_path):
    _comp, ours, _theirs, _ = images
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount_fuse(ours, mnt, "squashfuse_ll")
        check_mounted(mnt, sample, owners=os.geteuid() == 0, empty_xattr_values=False)
    finally:
        unmount(mnt)


@pytest.mark.skipif(not shutil.which("squashfuse") or not os.path.exists("/dev/fuse"),
                    reason="needs squashfuse and /dev/fuse")
def test_squashfuse_high_level_reads_the_image(images, sample, tmp_path):
    _comp, ours, _theirs, _ = images
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount_fuse(ours, mnt, "squashfuse")
        check_mounted(mnt, sample, owners=os.geteuid() == 0, empty_xattr_values=False,
                      hardlinks=False)   # high-level FUSE: path-based st_ino
    finally:
        unmount(mnt)


def test_sockets_and_block_devices_round_trip(tmp_path):
    from hpcc.squashfs import Device, Dir, Socket
    img = tmp_path / "s.sqfs"
    with SquashfsWriter(img) as w:
        root = Dir()
        root.children["sock"] = Socket(0o755, 1, 2, 3, xattrs={"user.s": b"x"})
        root.children["blk"] = Device("b", os.makedev(8, 1), 0o660, 0, 6, 9)
        w.finish(root)
    with SquashfsReader(img) as r:
        e = {x.path: x for x in r.walk()}
        assert (r.info()["compressor"], r.info()["compressor_level"]) == ("zstd", 3)
    assert e["/sock"].type == "socket" and e["/sock"].xattrs == {"user.s": b"x"}
    assert (e["/sock"].uid, e["/sock"].gid, e["/sock"].mtime) == (1, 2, 3)
    assert e["/blk"].type == "blk" and e["/blk"].rdev == os.makedev(8, 1)
    out = subprocess.run(["unsquashfs", "-lln", str(img)], check=True, capture_output=True,
                         text=True).stdout
    assert "srwxr-xr-x 1/2" in out and "brw-rw---- 0/6" in out and "8,  1" in out


ZERO = memoryview(bytes(1 << 20))


class Zeros:
    """A stream of `n` zero bytes that costs nothing to produce."""

    def __init__(self, n):
        self.left = n

    def readinto(self, buf):
        n = min(len(buf), self.left, len(ZERO))
        buf[:n] = ZERO[:n]
        self.left -= n
        return n


HUGE = 5 * 2**30 + 12345


@pytest.fixture(scope="module")
def huge_image(tmp_path_factory):
    from hpcc.squashfs import Dir, File
    img = tmp_path_factory.mktemp("huge") / "big.sqfs"
    with SquashfsWriter(img, workers=2) as w:
        root = Dir(0o700, 5, 6, 7777, xattrs={"user.root": b"yes"})
        root.children["huge"] = File(0o600, data=w.add_file_data(Zeros(HUGE), HUGE))
        root.children["after"] = File(data=w.add_bytes(b"tail"))
        st = w.finish(root)
    return img, st


def test_root_metadata_and_files_over_4_gib(huge_image):
    img, st = huge_image
    assert st["bytes_used"] < 1 << 20           # all holes
    with SquashfsReader(img) as r:
        e = {x.path: x for x in r.walk()}
        assert (e["/"].mode, e["/"].uid, e["/"].gid, e["/"].mtime) == (0o700, 5, 6, 7777)
        assert e["/"].xattrs == {"user.root": b"yes"}
        assert e["/huge"].size == HUGE
        assert r.read_file("after") == b"tail"
    out = subprocess.run(["unsquashfs", "-lln", str(img)], check=True, capture_output=True,
                         text=True).stdout
    assert f" {HUGE} " in out


@pytest.mark.root
def test_kernel_reads_root_metadata_and_files_over_4_gib(huge_image, tmp_path):
    img, _ = huge_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount_kernel(img, mnt)
        assert os.stat(mnt / "huge").st_size == HUGE
        with open(mnt / "huge", "rb") as f:
            f.seek(HUGE - 100)
            assert f.read() == bytes(100)
        assert (mnt / "after").read_bytes() == b"tail"
        assert os.getxattr(mnt, "user.root") == b"yes"
        st = os.stat(mnt)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5, 6, 0o700)
    finally:
        unmount(mnt)


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes per call, to exercise short reads."""

    def __init__(self, data, step):
        self.f = io.BytesIO(data)
        self.step = step

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.step)
        chunk = self.f.read(n)
        buf[:len(chunk)] = chunk
        return len(chunk)


def test_sizes_around_block_and_chunk_boundaries_round_trip(tmp_path):
    from hpcc.squashfs import Dir, File
    rnd = random.Random(7)
    sizes = [0, 1, 4095, 4096, 131071, 131072, 131073, (1 << 20) - 1, 1 << 20, (1 << 20) + 1,
             3 * (1 << 20) + 17] + [rnd.randrange(0, 3 << 20) for _ in range(20)]
    files = {}
    with SquashfsWriter(tmp_path / "b.sqfs", block_size=65536) as w:
        root = Dir()
        for i, size in enumerate(sizes):
            data = rnd.randbytes(size // 2) + bytes(size - size // 2)
            files[f"f{i}"] = data
            how = i % 3
            if how == 0:
                fd = w.add_file_data(io.BytesIO(data), size)
            elif how == 1:
                fd = w.add_file_data(Trickle(data, rnd.choice([1000, 65536, 300_000])))
            else:
                fd = w.add_file_data(Trickle(data, 777_777), size)
            root.children[f"f{i}"] = File(data=fd)
        w.finish(root)
    with SquashfsReader(tmp_path / "b.sqfs") as r:
        assert r.info()["block_size"] == 65536
        for name, data in files.items():
            assert r.read_file(name) == data, name
