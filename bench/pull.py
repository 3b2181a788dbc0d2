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
"""
import gzip
import json
import os
import shutil
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
    from hpcc.gateway.testing import ImageBuilder, LayerBlob, sha256

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


def main():
    from hpcc.gateway.testing import LocalRegistry

    files = layers()
    image = build_image(files)
    total = sum(f.stat().st_size for f in files)
    work = Path(tempfile.mkdtemp(prefix="hpcc-bench-pull-"))
    results = {}
    try:
        with LocalRegistry(tls=True) as reg:
            reg.push("bench/debian", "latest", image)
            ref = reg.ref("bench/debian", "latest")
            env = dict(os.environ, SSL_CERT_FILE=reg.ca_file, REQUESTS_CA_BUNDLE=reg.ca_file)
            print(f"image: {len(files)} layers, {total / 1e6:.0f} MB compressed, at {ref}",
                  flush=True)

            # (a) gateway pull, defaults, empty store and blob cache
            cfg = work / "hpcc.toml"
            cfg.write_text(f'[store]\npath = "{work}/store"\n'
                           f'[registries."{reg.host}"]\nca_file = "{reg.ca_file}"\n')
            env_a = dict(env, HPCC_CONFIG=str(cfg))
            t = timed(lambda: sh([BIN / "gateway", "pull", "-q", ref], env=env_a))
            sqfs_a = next((work / "store").glob("sha256-*.sqfs"))
            results["a"] = (t, sqfs_a.stat().st_size, "gateway pull (hpcc defaults)")
            print(f"(a) {t:.2f} s", flush=True)

            # (b) skopeo + umoci raw unpack + mksquashfs
            certs = work / "certs"
            certs.mkdir()
            shutil.copy(reg.ca_file, certs / "ca.crt")

            def b():
                sh(["skopeo", "copy", "--quiet", "--src-cert-dir", certs,
                    f"docker://{ref}", f"oci:{work}/oci:latest"], env=env)
                sh(["umoci", "raw", "unpack", "--image", f"{work}/oci:latest", work / "rootfs-b"])
                sh(["mksquashfs", work / "rootfs-b", work / "b.sqfs", "-noappend", "-quiet",
                    "-no-progress"], stdout=subprocess.DEVNULL)
            results["b"] = (timed(b), (work / "b.sqfs").stat().st_size,
                            "skopeo + umoci raw unpack + mksquashfs")
            print(f"(b) {results['b'][0]:.2f} s", flush=True)
            shutil.rmtree(work / "rootfs-b", ignore_errors=True)

            # (c) Charliecloud: ch-image pull + ch-convert
            if shutil.which("ch-image") and shutil.which("ch-convert"):
                # Debian's ch-image needs Debian's python3 (python3-lark) and $USER; its
                # storage directory must not exist yet; ch-convert finds it by env.
                env_c = dict(env, USER="root", CH_IMAGE_STORAGE=str(work / "ch-storage"),
                             PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")

                def c():
                    sh(["ch-image", "--tls-no-verify", "pull", ref, "bench"], env=env_c,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    sh(["ch-convert", "-i", "ch-image", "-o", "squash", "bench",
                        work / "c.sqfs"], env=env_c, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
                try:
                    results["c"] = (timed(c), (work / "c.sqfs").stat().st_size,
                                    "ch-image pull + ch-convert")
                    print(f"(c) {results['c'][0]:.2f} s", flush=True)
                except subprocess.CalledProcessError as e:
                    print(f"(c) Charliecloud failed: {e}; left out", flush=True)

            # (d) floor: tar2sqfs of the flattened tree, same compressor settings as (a)
            meta = json.loads(sqfs_a.with_suffix(".json").read_text())["squashfs"]
            flat = work / "flat.tar"
            sh(["sqfs2tar", sqfs_a], stdout=open(flat, "wb"), stderr=subprocess.DEVNULL)
            opts = ["-c", meta["compressor"], "-b", str(meta["block_size"]),
                    "-j", str(os.cpu_count()), "-q", "-f"]
            if meta.get("level"):
                opts += ["-X", f"level={meta['level']}"]
            t = timed(lambda: sh(["tar2sqfs", *opts, work / "d.sqfs"], stdin=open(flat, "rb")))
            results["d"] = (t, (work / "d.sqfs").stat().st_size,
                            f"tar2sqfs of a flat tar ({meta['compressor']} {meta.get('level')})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'':3}{'seconds':>9}  {'squashfs MB':>11}  what")
    for k in sorted(results):
        t, size, what = results[k]
        print(f"({k}){t:9.2f}  {size / 1e6:11.1f}  {what}")
    a = results["a"][0]
    peers = [results[k][0] for k in ("b", "c") if k in results]
    print()
    print(f"ratio a/min(b,c) = {a / min(peers):.3f}   (target <= 0.25)")
    print(f"ratio a/d        = {a / results['d'][0]:.3f}   (target <= 1.1)")
    print(f"size a/b         = {results['a'][1] / results['b'][1]:.3f}   (target <= 1.0)")


if __name__ == "__main__":
    main()
