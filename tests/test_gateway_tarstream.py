"""TarReader (the flattener's tar parser) against Python's tarfile: the same members, the
same data, the same end (or error) on the same archives, written by tarfile and GNU tar in
every format, and on truncated and corrupted copies of them."""
import io
import os
import random
import shutil
import subprocess
import tarfile

import pytest

from hpcc.gateway import tarstream
from hpcc.gateway.tarstream import TarReader

MTIME = 1_600_000_000
FIELDS = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "uname",
          "gname", "pax_headers", "sparse")


class Trickle(io.RawIOBase):
    """A stream giving at most `step` bytes per read (as a decompressor or socket may)."""

    def __init__(self, data, step):
        self._b = io.BytesIO(data)
        self._step = step

    def readable(self):
        return True

    def readinto(self, b):
        view = memoryview(b)[:self._step]
        return self._b.readinto(view)


@pytest.fixture(autouse=True, params=["c", "python"])
def header_parser(request, monkeypatch):
    """Every test twice: with the C fast path for headers, and with the Python parser alone
    (the one the fast path leaves unusual headers to)."""
    if request.param == "python":
        monkeypatch.setattr(tarstream, "_c_parser", lambda: None)
    elif tarstream._c_parser() is None:
        pytest.skip("the C header parser is not built")
    return request.param


def with_tarfile(data):
    """[(fields, data or None)] and how it ended ("end" or "error"), by tarfile."""
    out = []
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.ReadError as e:
        return out, ("empty" if str(e) == "empty file" else "error")
    try:
        while True:
            m = tf.next()
            if m is None:
                return out, "end"
            body = tf.extractfile(m).read() if m.type in (
                tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else None
            out.append(({f: getattr(m, f) for f in FIELDS}, body))
    except (tarfile.ReadError, EOFError):
        return out, "error"


def with_tarreader(data, step=None, bufsize=1 << 20):
    out = []
    stream = io.BytesIO(data) if step is None else Trickle(data, step)
    tr = TarReader(stream, bufsize=bufsize)
    try:
        m = tr.next()
    except tarfile.ReadError as e:
        return out, ("empty" if str(e) == "empty file" else "error")
    try:
        while m is not None:
            body = None
            if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                view = tr.small_data(m)
                body = bytes(view) if view is not None else tr.data_reader().read()
                if len(body) != m.size:
                    raise EOFError("short")
            out.append(({f: getattr(m, f) for f in FIELDS}, body))
            m = tr.next()
        return out, "end"
    except (tarfile.ReadError, EOFError):
        return out, "error"


def same(data, **kw):
    want = with_tarfile(data)
    got = with_tarreader(data, **kw)
    assert got == want
    return want


def python_tar(fmt, pax_global=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_global or {}) as tf:
        def add(name, type_=tarfile.REGTYPE, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type = type_
            ti.mtime = kw.pop("mtime", MTIME)
            ti.mode = kw.pop("mode", 0o644)
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data) if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)

        add("dir/", tarfile.DIRTYPE, mode=0o755)
        for n in (0, 1, 511, 512, 513, 4096, 100_000, (1 << 20) + 3):
            add(f"dir/f{n}", data=os.urandom(n))
        add("d" * 99 + "/" + "e" * 90, data=b"long name")           # ustar prefix, pax or L
        add("dir/sym", tarfile.SYMTYPE, linkname="f1")
        add("dir/hard", tarfile.LNKTYPE, linkname="dir/f1")
        add("dir/fifo", tarfile.FIFOTYPE)
        add("dir/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("dir/blk", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("owned", data=b"x", uid=1000, gid=100, uname="alice", gname="users", mode=0o4755)
        if fmt != tarfile.USTAR_FORMAT:
            add("ünïcode-名前", data=b"u")
            add("l" * 150, tarfile.SYMTYPE, linkname="t" * 200)
            add("big-ids", data=b"b", uid=3_000_000_000, gid=2_500_000_000)
            add("old", data=b"o", mtime=-86400 * 365)
        if fmt == tarfile.PAX_FORMAT:
            add("xattrs", data=b"x", pax_headers={"SCHILY.xattr.user.a": "1",
                                                   "SCHILY.xattr.security.capability": "\x01"})
            add("float-mtime", data=b"f", mtime=MTIME + 0.25)
        add("latin1-\udce9", data=b"surrogate")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_python_written_archives(fmt):
    data = python_tar(fmt)
    members, end = same(data)
    assert end == "end" and len(members) > 15
    same(data, step=777)                    # short reads everywhere
    same(data, bufsize=4096)                # members bigger than the buffer


def test_global_pax_header():
    data = python_tar(tarfile.PAX_FORMAT, pax_global={"comment": "g", "uname": "everyone"})
    members, _ = same(data)
    assert all(f["uname"] == "everyone" for f, _ in members if f["name"] != "owned")


def _gnu_tar_tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / ("n" * 130)).write_bytes(b"long")
    with open(src / "sparse", "wb") as f:             # data, a hole, data, a hole
        f.write(b"A" * 5000)
        f.seek(1 << 20)
        f.write(b"B" * 7000)
        f.truncate(3 << 20)
    with open(src / "allhole", "wb") as f:
        f.truncate(2 << 20)
    (src / "plain").write_bytes(os.urandom(70_000))
    os.symlink("plain", src / "link")
    os.link(src / "plain", src / "hard")
    return src


@pytest.mark.skipif(not shutil.which("tar"), reason="GNU tar needed")
@pytest.mark.parametrize("args", [
    ["--format=gnu"], ["--format=oldgnu"], ["--format=ustar"], ["--format=v7"],
    ["--format=posix"], ["--format=gnu", "--sparse"], ["--format=oldgnu", "--sparse"],
    ["--format=posix", "--sparse", "--sparse-version=0.0"],
    ["--format=posix", "--sparse", "--sparse-version=0.1"],
    ["--format=posix", "--sparse", "--sparse-version=1.0"],
], ids=lambda a: "_".join(x.split("=")[-1] for x in a))
def test_gnu_tar_archives(tmp_path, args):
    src = _gnu_tar_tree(tmp_path)
    r = subprocess.run(["tar", "-cf", "-", "-C", str(src), "--sort=name", *args, "."],
                       capture_output=True)
    if r.returncode not in (0, 2) or not r.stdout:   # 2: v7/ustar cannot hold a long name
        pytest.skip(f"tar {args}: {r.stderr.decode().strip()}")
    members, end = same(r.stdout)
    assert end == "end" and members
    same(r.stdout, step=1000, bufsize=8192)


def test_sparse_member_data_is_expanded(tmp_path):
    """A pax sparse file (what GNU tar --sparse writes) reads back with its holes."""
    src = _gnu_tar_tree(tmp_path)
    r = subprocess.run(["tar", "-cf", "-", "-C", str(src), "--format=posix", "--sparse",
                        "sparse"], capture_output=True, check=True)
    tr = TarReader(io.BytesIO(r.stdout))
    m = tr.next()
    assert m.sparse and m.size == 3 << 20
    body = tr.data_reader().read()
    assert body == (src / "sparse").read_bytes()


def test_empty_and_zero_archives():
    assert same(b"") == ([], "empty")
    assert same(bytes(10240)) == ([], "end")
    assert same(b"x" * 512)[1] == "error"                     # a bad first header
    assert same(b"x" * 100)[1] == "error"                     # a short first header


def test_truncated_and_corrupted_archives():
    rnd = random.Random(42)
    data = python_tar(tarfile.PAX_FORMAT)
    cuts = sorted({rnd.randrange(len(data)) for _ in range(150)} |
                  {512 * k + d for k in range(1, 12) for d in (0, 1, 511)})
    for cut in cuts:
        same(data[:cut])
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(min(len(b), 40_000))
            b[pos] = rnd.randrange(256)
        same(bytes(b))
