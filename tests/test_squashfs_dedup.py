"""Deduplication and sparse files: identical data is stored once, zeros not at all."""
import hashlib
import io

from hpcc.squashfs import Dir, File
from hpcc.squashfs.reader import SquashfsReader
from hpcc.squashfs.writer import SquashfsWriter

MB = 1 << 20


def _noise(n, seed):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha512(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def _image(path, files):
    with SquashfsWriter(path, compressor="zstd") as w:
        root = Dir()
        for name, data in files.items():
            root.children[name] = File(data=w.add_file_data(io.BytesIO(data)))
        return w.finish(root)


def test_two_identical_one_megabyte_files_cost_one_copy(tmp_path):
    data = _noise(MB + 5000, "dup")        # 8 whole blocks + a tail fragment, incompressible
    one = _image(tmp_path / "one.sqfs", {"a": data})
    two = _image(tmp_path / "two.sqfs", {"a": data, "b": data})
    assert one["bytes_used"] > MB
    assert two["bytes_used"] - one["bytes_used"] < 200      # one more inode and dir entry
    assert two["duplicate_blocks"] == 8
    assert two["duplicate_fragments"] == 1
    with SquashfsReader(tmp_path / "two.sqfs") as r:
        assert r.read_file("a") == data and r.read_file("b") == data
        ents = {e.path: e for e in r.walk()}
        assert ents["/a"].inode_number != ents["/b"].inode_number   # copies, not hard links
        assert ents["/a"].nlink == ents["/b"].nlink == 1


def test_identical_small_files_share_one_fragment(tmp_path):
    files = {f"f{i}": b"the same small config file\n" for i in range(100)}
    st = _image(tmp_path / "small.sqfs", files)
    assert st["fragments"] == 1 and st["duplicate_fragments"] == 99


def test_zero_blocks_are_stored_as_holes(tmp_path):
    zeros = bytes(10 * MB)
    mixed = _noise(200_000, "m") + bytes(3 * 131072) + _noise(1000, "n")
    st = _image(tmp_path / "sparse.sqfs", {"zeros": zeros, "mixed": mixed})
    assert st["bytes_used"] < 400_000
    assert st["sparse_blocks"] >= 80 + 2
    with SquashfsReader(tmp_path / "sparse.sqfs") as r:
        assert r.read_file("zeros") == zeros
        assert r.read_file("mixed") == mixed
