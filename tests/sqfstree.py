"""Test helpers: mount a squashfs (kernel loop or squashfuse_ll) and snapshot a tree.

A snapshot maps each path to (type, mode, uid, gid, mtime, size, content digest or link
target) plus its hard-link group, which is what "file for file equal" means in the tests.
"""
import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time


@contextlib.contextmanager
def mounted(sqfs, how="kernel"):
    mnt = tempfile.mkdtemp(prefix="hpcc-test-mnt-")
    try:
        if how == "kernel":
            subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", str(sqfs),
                            mnt],
                           check=True, capture_output=True)
        else:
            subprocess.run(["squashfuse_ll", str(sqfs), mnt], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            for _ in range(50):
                r = subprocess.run(["umount", mnt], capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
    finally:
        os.rmdir(mnt)


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def snapshot(root, *, dir_mtimes=True):
    entries = {}
    inodes = {}

    def visit(full, rel):
        st = os.lstat(full)
        kind = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
                stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s"}[stat.S_IFMT(st.st_mode)]
        extra = None
        if kind == "f":
            extra = _digest(full)
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
        elif kind == "l":
            extra = os.readlink(full)
        mtime = int(st.st_mtime) if (kind != "d" or dir_mtimes) else None
        mode = stat.S_IMODE(st.st_mode) if kind != "l" else 0o777
        entries[rel] = (kind, oct(mode), st.st_uid, st.st_gid, mtime,
                        st.st_size if kind == "f" else None, extra)

    visit(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            visit(full, os.path.relpath(full, root))
    links = {}
    for paths in inodes.values():
        group = tuple(sorted(paths))
        for p in paths:
            links[p] = group
    return {p: v + (links.get(p),) for p, v in entries.items()}


def diff(a, b, limit=40):
    """Readable differences between two snapshots ('' when equal)."""
    out = []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            out.append(f"{p}:\n   ours: {a.get(p)}\n   ref:  {b.get(p)}")
            if len(out) >= limit:
                out.append("...")
                break
    return "\n".join(out)


def have(*tools):
    return all(shutil.which(t) for t in tools)
