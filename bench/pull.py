"""Pull benchmark: `gateway pull` vs the peers' pipelines, cold, in one run.

    (a) gateway pull, hpcc's defaults
    (b) skopeo copy + umoci raw unpack + mksquashfs (its defaults)
    (c) ch-image pull + ch-convert to squashfs (Charliecloud)
    (d) the floor: tar2sqfs fed an already flattened tar of the same tree, same compressor
        settings as (a)

The image: a Debian userland made with debootstrap (with python3), in three layers, the
upper ones deleting files of the lower (whiteouts). It is built once and cached in
/var/cache/hpcc-bench. Every tool starts with empty caches; all talk to the same local
registry (https with a throw-away CA, which Charliecloud needs; the others are told to trust
it). Prints times, image sizes and the ratios a/min(b,c) and a/d.

Options (for iterating on one side): `--only a,d` (or BENCH_ONLY=a,d) runs only those
(d needs a's image: when only d is asked for, a still runs, untimed); `--repeat N` (or
BENCH_REPEAT=N) runs the selection N times, alternating, and reports each side's median,
with its user+sys CPU seconds.
"""
import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("HPCC_BENCH_CACHE", "/var/cache/hpcc-bench"))
MIRROR = os.environ.get("HPCC_BENCH_MIRROR", "http://deb.debian.org/debian")
BIN = Path(sys.executable).parent
# A userland like a scientist's image: python3 with numpy, a compiler, perl, git.
PACKAGES = "python3,python3-pip,python3-numpy,perl,git,build-essential"
VERSION = "v2"  # bump when PACKAGES or the layer split changes (invalidates the cache)


def sh(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def rootfs():
    root = CACHE / f"rootfs-{VERSION}"
    if not (root / "usr/bin/python3").exists():
        print("building the Debian userland with debootstrap (once, cached)...", flush=True)
        tmp = CACHE / f"rootfs-{VERSION}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        sh(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", tmp, MIRROR],
           stdout=subprocess.DEVNULL)
        tmp.rename(root)
    return root


def _tar_layer(path, members, root, deletions=()):
    """A gzip layer with `members` (paths relative to root) plus whiteouts."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel in members:
            tf.add(root / rel, arcname=rel, recursive=False)
        for rel in deletions:
            d, _, base = rel.rpartition("/")
            ti = tarfile.TarInfo((d + "/" if d else "") + ".wh." + base)
            tf.addfile(ti)
    tmp.rename(path)
    return path


def layers():
    """Three layers: the userland minus python; python (+ a copy of docs); deletions."""
    root = rootfs()
    all_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            all_paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    py = [p for p in all_paths if "python3" in p]
    base = [p for p in all_paths if "python3" not in p]
    # every parent of a python path must be in the python layer too
    parents = sorted({str(Path(p).parent) for p in py if str(Path(p).parent) != "."})
    l1 = _tar_layer(CACHE / f"{VERSION}-layer1.tar.gz", base, root)
    l2 = _tar_layer(CACHE / f"{VERSION}-layer2.tar.gz", parents + py, root)
    doomed = [p for p in base if p.startswith(("usr/share/locale/", "usr/share/doc/"))
              and p.count("/") == 3][:400]
    l3 = _tar_layer(CACHE / f"{VERSION}-layer3.tar.gz", ["etc", "etc/hostname"], root, doomed)
    return [l1, l2, l3]


def build_image(layer_files):
    from hpcc.testkit.images import ImageBuilder, LayerBlob, sha256

    b = ImageBuilder(oci=False)
    for f in layer_files:
        blob = f.read_bytes()
        diff_id_file = f.with_suffix(".diffid")
        if not diff_id_file.exists():
            diff_id_file.write_text(sha256(gzip.decompress(blob)))
        b._layers.append(LayerBlob(b"", blob, "gzip",
                                   "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                   sha256(blob), diff_id_file.read_text()))
        b._history.append({"created": b.created, "created_by": f.name})
    return b.env("PATH=/usr/local/bin:/usr/bin:/bin").cmd(["/usr/bin/python3"]).build()


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_cpu(fn):
    """(wall seconds, user+sys CPU seconds of the child processes fn ran)."""
    c0 = _children_cpu()
    t = timed(fn)
    return t, _children_cpu() - c0


def options(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", "a,b,c,d"),
                   help="comma-separated subset of a,b,c,d (default all)")
    p.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", "1")),
                   help="run the selection this many times; report medians")
    o = p.parse_args(argv)
    o.only = {k.strip() for k in o.only.split(",") if k.strip()}
    if not o.only or o.only - set("abcd"):
        p.error("--only takes a comma-separated subset of a,b,c,d")
    if o.repeat < 1:
        p.error("--repeat must be at least 1")
    return o


def main(argv=None):
    from hpcc.testkit.registry import LocalRegistry

    opts = options(sys.argv[1:] if argv is None else argv)
    files = layers()
    image = build_image(files)
    total = sum(f.stat().st_size for f in files)
    work = Path(tempfile.mkdtemp(prefix="hpcc-bench-pull-"))
    runs = {}      # key -> [(seconds, cpu seconds, size)]
    what = {}
    try:
        with LocalRegistry(tls=True) as reg:
            reg.push("bench/debian", "latest", image)
            ref = reg.ref("bench/debian", "latest")
            env = dict(os.environ, SSL_CERT_FILE=reg.ca_file, REQUESTS_CA_BUNDLE=reg.ca_file)
            print(f"image: {len(files)} layers, {total / 1e6:.0f} MB compressed, at {ref}",
                  flush=True)
            certs = work / "certs"
            certs.mkdir()
            shutil.copy(reg.ca_file, certs / "ca.crt")
            cfg = work / "hpcc.toml"
            cfg.write_text(f'[store]\npath = "{work}/store"\n'
                           f'[registries."{reg.host}"]\nca_file = "{reg.ca_file}"\n')
            env_a = dict(env, HPCC_CONFIG=str(cfg))
            flat = work / "flat.tar"
            meta = None

            def record(key, t, cpu, size, label):
                runs.setdefault(key, []).append((t, cpu, size))
                what[key] = label
                print(f"({key}) {t:.2f} s  ({cpu:.2f} CPU-s)", flush=True)

            for _ in range(opts.repeat):
                # (a) gateway pull, defaults, empty store and blob cache
                if "a" in opts.only or meta is None and "d" in opts.only:
                    shutil.rmtree(work / "store", ignore_errors=True)
                    t, cpu = timed_cpu(lambda: sh([BIN / "gateway", "pull", "-q", ref],
                                                  env=env_a))
                    sqfs_a = next((work / "store").glob("sha256-*.sqfs"))
                    if "a" in opts.only:
                        record("a", t, cpu, sqfs_a.stat().st_size,
                               "gateway pull (hpcc defaults)")
                    if meta is None and "d" in opts.only:
                        meta = json.loads(sqfs_a.with_suffix(".json").read_text())["squashfs"]
                        with open(flat, "wb") as out:
                            sh(["sqfs2tar", sqfs_a], stdout=out, stderr=subprocess.DEVNULL)

                # (b) skopeo + umoci raw unpack + mksquashfs
                if "b" in opts.only:
                    for p in ("oci", "rootfs-b", "b.sqfs"):
                        shutil.rmtree(work / p, ignore_errors=True)

                    def b():
                        sh(["skopeo", "copy", "--quiet", "--src-cert-dir", certs,
                            f"docker://{ref}", f"oci:{work}/oci:latest"], env=env)
                        sh(["umoci", "raw", "unpack", "--image", f"{work}/oci:latest",
                            work / "rootfs-b"])
                        sh(["mksquashfs", work / "rootfs-b", work / "b.sqfs", "-noappend",
                            "-quiet", "-no-progress"], stdout=subprocess.DEVNULL)
                    t, cpu = timed_cpu(b)
                    record("b", t, cpu, (work / "b.sqfs").stat().st_size,
                           "skopeo + umoci raw unpack + mksquashfs")
                    shutil.rmtree(work / "rootfs-b", ignore_errors=True)

                # (c) Charliecloud: ch-image pull + ch-convert
                if "c" in opts.only and shutil.which("ch-image") and shutil.which("ch-convert"):
                    # Debian's ch-image needs Debian's python3 (python3-lark) and $USER; its
                    # storage directory must not exist yet; ch-convert finds it by env.
                    shutil.rmtree(work / "ch-storage", ignore_errors=True)
                    env_c = dict(env, USER="root", CH_IMAGE_STORAGE=str(work / "ch-storage"),
                                 PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")

                    def c():
                        sh(["ch-image", "--tls-no-verify", "pull", ref, "bench"], env=env_c,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        sh(["ch-convert", "-i", "ch-image", "-o", "squash", "bench",
                            work / "c.sqfs"], env=env_c, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
                    try:
                        (work / "c.sqfs").unlink(missing_ok=True)
                        t, cpu = timed_cpu(c)
                        record("c", t, cpu, (work / "c.sqfs").stat().st_size,
                               "ch-image pull + ch-convert")
                    except subprocess.CalledProcessError as e:
                        print(f"(c) Charliecloud failed: {e}; left out", flush=True)

                # (d) floor: tar2sqfs of the flattened tree, same compressor settings as (a)
                if "d" in opts.only:
                    args = ["-c", meta["compressor"], "-b", str(meta["block_size"]),
                            "-j", str(os.cpu_count()), "-q", "-f"]
                    if meta.get("level"):
                        args += ["-X", f"level={meta['level']}"]
                    with open(flat, "rb") as inp:
                        t, cpu = timed_cpu(lambda: sh(["tar2sqfs", *args, work / "d.sqfs"],
                                                      stdin=inp))
                    record("d", t, cpu, (work / "d.sqfs").stat().st_size,
                           f"tar2sqfs of a flat tar ({meta['compressor']} {meta.get('level')})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
               v[-1][2]) for k, v in runs.items()}
    print()
    head = "median seconds" if opts.repeat > 1 else "seconds"
    print(f"{'':3}{head:>14}  {'CPU-s':>6}  {'squashfs MB':>11}  what")
    for k in sorted(med):
        t, cpu, size = med[k]
        print(f"({k}){t:14.2f}  {cpu:6.2f}  {size / 1e6:11.1f}  {what[k]}")
    print()
    if "a" in med:
        peers = [med[k][0] for k in ("b", "c") if k in med]
        if peers:
            print(f"ratio a/min(b,c) = {med['a'][0] / min(peers):.3f}   (target <= 0.25)")
        if "d" in med:
            print(f"ratio a/d        = {med['a'][0] / med['d'][0]:.3f}   (target <= 1.1)")
            if opts.repeat > 1:   # a and d of one round ran back to back: less noise
                pairs = [ra[0] / rd[0] for ra, rd in zip(runs["a"], runs["d"])]
                print(f"  median of the {len(pairs)} rounds' a/d = "
                      f"{statistics.median(pairs):.3f}  "
                      f"(range {min(pairs):.3f}-{max(pairs):.3f})")
        if "b" in med:
            print(f"size a/b         = {med['a'][2] / med['b'][2]:.3f}   (target <= 1.0)")


if __name__ == "__main__":
    main()
