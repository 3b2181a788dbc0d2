"""Benchmark: hpcc's squashfs writer vs tar2sqfs on the same tar, same compressor settings.

    python bench/squashfs_writer.py [--tar FILE] [--compressor zstd] [--level 6] [--workers N]

Without --tar, a tar of a slice of /usr (~45k entries, ~1.7 GB) is made in a temp dir. Both
sides read the tar from the page cache (one warm-up read first); ours parses it with Python's
tarfile (seekable, like a cached layer), builds the tree and streams file data into
the writer. Prints wall/CPU seconds and image sizes of both and the ratio.
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from hpcc.squashfs import Dir, Fifo, File, Symlink
from hpcc.squashfs.writer import SquashfsWriter

SLICE = ["usr/include", "usr/lib/x86_64-linux-gnu", "usr/bin", "usr/share/man", "usr/share/doc"]


def tar_to_image(tar_path, out, compressor, level, workers):
    root = Dir(0o755)
    by_path = {"": root}
    with SquashfsWriter(out, compressor=compressor, level=level, workers=workers) as w:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                path = m.name.strip("/")
                if not path or path == ".":
                    continue
                parent_path, _, name = path.rpartition("/")
                parent = by_path.get(parent_path)
                if parent is None:      # implicit parent directories
                    parent = root
                    acc = ""
                    for part in parent_path.split("/"):
                        acc = f"{acc}/{part}" if acc else part
                        nxt = by_path.get(acc)
                        if nxt is None:
                            nxt = by_path[acc] = parent.children[part] = Dir(0o755)
                        parent = nxt
                if m.isreg():
                    node = File(m.mode, m.uid, m.gid, int(m.mtime))
                    node.data = w.add_file_data(tf.extractfile(m), m.size) if m.size else None
                elif m.isdir():
                    node = by_path.get(path)
                    if node is None:
                        node = Dir(m.mode, m.uid, m.gid, int(m.mtime))
                    else:
                        node.mode, node.uid, node.gid = m.mode, m.uid, m.gid
                        node.mtime = int(m.mtime)
                elif m.issym():
                    node = Symlink(m.linkname, 0o777, m.uid, m.gid, int(m.mtime))
                elif m.islnk():
                    node = by_path[m.linkname.strip("/")]
                elif m.isfifo():
                    node = Fifo(m.mode, m.uid, m.gid, int(m.mtime))
                else:
                    continue
                parent.children[name] = node
                by_path[path] = node
        t0 = time.monotonic()
        stats = w.finish(root)
        stats["finish_s"] = time.monotonic() - t0
    return stats


def timed(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = fn()
    t1 = time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
           + c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
    return t1 - t0, cpu, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tar")
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hpcc-bench-sqfs-")
    try:
        tar_path = args.tar
        if tar_path is None:
            tar_path = os.path.join(tmp, "slice.tar")
            present = [s for s in SLICE if os.path.isdir("/" + s)]
            subprocess.run(["tar", "-cf", tar_path, "-C", "/", *present],
                           check=True, stderr=subprocess.DEVNULL)
        subprocess.run(["cat", tar_path], stdout=subprocess.DEVNULL, check=True)   # warm cache
        workers = args.workers or len(os.sched_getaffinity(0))
        results = {"ours": [], "tar2sqfs": []}
        for _ in range(args.rounds):
            ours = os.path.join(tmp, "ours.sqfs")
            theirs = os.path.join(tmp, "theirs.sqfs")
            for p in (ours, theirs):
                if os.path.exists(p):
                    os.unlink(p)
            wall, cpu, st = timed(lambda: tar_to_image(tar_path, ours, args.compressor,
                                                       args.level, workers))
            results["ours"].append((wall, cpu, os.path.getsize(ours)))

            def run_tar2sqfs():
                with open(tar_path, "rb") as f:
                    subprocess.run(["tar2sqfs", "-q", "-f", "-c", args.compressor, "-X",
                                    f"level={args.level}", "-j", str(workers), theirs],
                                   stdin=f, check=True, stdout=subprocess.DEVNULL)
            wall, cpu, _ = timed(run_tar2sqfs)
            results["tar2sqfs"].append((wall, cpu, os.path.getsize(theirs)))
        o = min(results["ours"])
        t = min(results["tar2sqfs"])
        print(f"tar: {tar_path} ({os.path.getsize(tar_path) / 1e6:.0f} MB, {st['inodes']} inodes), "
              f"{args.compressor} level {args.level}, {workers} workers")
        print(f"ours: finish() (wait for blocks + inode/dir/tables) {st['finish_s']:.2f} s")
        print(f"ours     : {o[0]:6.2f} s wall {o[1]:6.2f} s cpu  image {o[2] / 1e6:8.1f} MB")
        print(f"tar2sqfs : {t[0]:6.2f} s wall {t[1]:6.2f} s cpu  image {t[2] / 1e6:8.1f} MB")
        print(f"ratio ours/tar2sqfs: wall {o[0] / t[0]:.3f}  cpu {o[1] / t[1]:.3f}  size "
              f"{o[2] / t[2]:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
