"""Round trips through real squashfs: our writer -> our reader, unsquashfs, sqfsdiff against a
tar2sqfs image of the same tree, the kernel's squashfs and squashfuse_ll."""
import os
import shutil
import subprocess

import pytest

from hpcc.squashfs.reader import SquashfsReader
from hpcc.squashfs.writer import SquashfsWriter
from tests.fixtures.squashfs_sample import (build_tree, check_mounted, expected, mount_fuse,
                                            mount_kernel, sample_entries, unmount, write_tar)

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


def test_rdsquashfs_unpacks_the_image(images, sample, tmp_path):
    _comp, ours, _theirs, _ = images
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["rdsquashfs", "-u", "/", "-p", str(out), "-C", "-O", "-X", "-T", str(ours)],
                   check=True, capture_output=True)
    # rdsquashfs unpacks hard links as copies
    check_mounted(out, sample, owners=os.geteuid() == 0, check_nlink=False, hardlinks=False)


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
    assert e["/sock"].type == "socket" and e["/sock"].xattrs == {"user.s": b"x"}
    assert (e["/sock"].uid, e["/sock"].gid, e["/sock"].mtime) == (1, 2, 3)
    assert e["/blk"].type == "blk" and e["/blk"].rdev == os.makedev(8, 1)
    out = subprocess.run(["unsquashfs", "-lln", str(img)], check=True, capture_output=True,
                         text=True).stdout
    assert "srwxr-xr-x 1/2" in out and "brw-rw---- 0/6" in out and "8,  1" in out
