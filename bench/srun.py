"""bench/srun.sh: container steps vs plain steps, and MPI ping-pong in containers vs native.

Everything runs on one embedded Slurm cluster started here (hpcc.testkit.slurmcluster), as an
unprivileged user; both variants alternate within the same run so machine noise hits both.
"""
import argparse
import hashlib
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# its own user: the Slurm tests wipe their users' stores (slurmuser1...), which would make
# a bench run beside them fail or measure the wrong thing
USER = "hpccbench"


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def ensure_user(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        sh("useradd", "-m", "-s", "/bin/sh", name)


def make_store(work):
    """A site store with a busybox image and an MPI image (no MPI inside: --container-mpi)."""
    from hpcc.reference import parse_reference
    from hpcc.store import Store
    from hpcc.testkit.busybox import busybox_tree

    store = Store(work / "store", create=True)
    images = {}
    trees = {}
    trees["bench/busybox:1"] = busybox_tree(work / "t-busybox", extra_dirs=("home",))
    # MPI image: glibc + ping-pong built with Debian's mpicc, MPI itself comes from the host
    sys.path.append(str(REPO))  # tests.hooks_images; the installed hpcc stays first
    from tests.hooks_images import base_tree, build_programs

    (work / "prog").mkdir()
    pp, abi = build_programs(work / "prog")
    t = base_tree(work / "t-nompi")
    shutil.copy2(abi, t / "app" / "pingpong-abi")
    trees["bench/mpi:1"] = t
    for name, tree in trees.items():
        tmp = Path(store.tmp_dir) / (tree.name + ".sqfs")
        sh("mksquashfs", tree, tmp, "-noappend", "-all-root", "-quiet")
        digest = "sha256:" + hashlib.sha256(tmp.read_bytes()).hexdigest()
        with store.lock(digest):
            store.publish(digest, str(tmp), {"config": {"Env": ["PATH=/app:/usr/bin:/bin"]}},
                          refs=[parse_reference(name)])
        images[name] = digest
    return store, pp


def timed(cluster, argv):
    env = dict(cluster.env, HOME=pwd.getpwnam(USER).pw_dir)  # the user's, as in a login
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, user=USER, cwd="/tmp", capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {p.stderr.strip()}")
    return dt, p.stdout


def named_figures(cluster, image, reps, config):
    """3. In one allocation: srun -N2 -n8 true plain, in an existing named container (made
    by a first step: its layer is reused, its root assembled again), in a fresh unnamed
    container, alternating; then, while a step keeps the named container running, plain vs
    attached (--container-name=NAME:exec: the tasks join the running container). Times from
    the allocation's own shell (date +%s%N around each srun)."""
    c = f"--container-image={image}"
    now = "$(date +%s%N)"
    script = (f"srun -N2 -n8 {c} --container-name=bench true || exit 1; "
              f"for i in $(seq {reps}); do "
              f"a={now}; srun -N2 -n8 true || exit 1; b={now}; "
              f"srun -N2 -n8 {c} --container-name=bench true || exit 1; d={now}; "
              f"srun -N2 -n8 {c} true || exit 1; e={now}; "
              "echo T $((b-a)) $((d-b)) $((e-d)); done; "
              f"srun -N2 -n8 --overlap {c} --container-name=bench sleep 600 & p=$!; "
              f"until srun -N2 -n2 --overlap {c} --container-name=bench:exec true "
              "2>/dev/null; do sleep 0.5; done; "
              f"for i in $(seq {reps}); do "
              f"a={now}; srun -N2 -n8 --overlap true || exit 1; b={now}; "
              f"srun -N2 -n8 --overlap {c} --container-name=bench:exec true || exit 1; "
              f"d={now}; echo A $((b-a)) $((d-b)); done; kill $p; wait; "
              "echo job=$SLURM_JOB_ID")
    _, out = timed(cluster, ["salloc", "-N2", "-n8", "sh", "-c", script])
    rows = {"T": [], "A": []}
    for ln in out.splitlines():
        if ln[:2] in ("T ", "A "):
            rows[ln[0]].append([int(x) / 1e9 for x in ln.split()[1:]])
        elif ln.startswith("job="):
            subprocess.run([sys.executable, "-I", "-m", "hpcc.runtime.named", "remove-job",
                            ln[4:]], capture_output=True,
                           env=dict(os.environ, HPCC_CONFIG=str(config)))
    t, a = rows["T"], rows["A"]
    return ([r[0] for r in t], [r[1] for r in t], [r[2] for r in t],
            [r[0] for r in a], [r[1] for r in a])


def pull_figures(cluster, work, reps):
    """4. The first-use pull of an image from srun (hpcc pull as the user, then the step)
    vs `gateway pull` of a like image (as root into the bench's site store), each from a
    real registry: every pull gets an image of its own (a label of its own: a new digest,
    so both download and convert, neither finds it in a store or its blobs in a cache);
    srun's step itself is measured right after with the image present and subtracted."""
    from hpcc.testkit.busybox import busybox_image
    from hpcc.testkit.registry import LocalRegistry

    home = pwd.getpwnam(USER).pw_dir
    user_env = dict(cluster.env, HOME=home)
    # the bench's own site store (the one the plugin's config names), not the host's
    root_env = dict(cluster.env, HPCC_CONFIG=str(work / "hpcc.toml"))
    tg, ts, tstep = [], [], []
    with LocalRegistry() as reg:
        for i in range(reps):
            shutil.rmtree(os.path.join(home, ".local", "share", "hpcc"), ignore_errors=True)
            shutil.rmtree(work / "store" / ".blobs", ignore_errors=True)
            for kind in "gs":
                reg.push("bench/pull", f"{kind}{i}",
                         busybox_image(labels={"org.hpcc.bench": f"{os.getpid()}-{kind}{i}"}))
            t = time.perf_counter()
            g = sh(Path(sys.executable).parent / "gateway", "pull",
                   reg.ref("bench/pull", f"g{i}"), env=root_env)
            tg.append(time.perf_counter() - t)
            if "up to date" in g.stderr + g.stdout:
                raise SystemExit("bench: gateway pull found the image: it did not convert")
            argv = ["srun", "-n1", f"--container-image={reg.ref('bench/pull', f's{i}')}",
                    "true"]
            for out in (ts, tstep):  # first use (pull + step), then the step alone
                t = time.perf_counter()
                p = subprocess.run(argv, env=user_env, user=USER, cwd=home,
                                   capture_output=True, text=True)
                out.append(time.perf_counter() - t)
                if p.returncode != 0:
                    raise SystemExit(f"bench: {' '.join(argv)} failed: {p.stderr.strip()}")
                if out is ts and "pulled" not in p.stderr:
                    raise SystemExit(f"bench: srun's first use did not convert: {p.stderr}")
    shutil.rmtree(os.path.join(home, ".local", "share", "hpcc"), ignore_errors=True)
    return tg, [a - b for a, b in zip(ts, tstep)]


def pingpong_figures(out):
    lat = bw = None
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["size"]:
            size, latency, b = int(parts[1]), float(parts[3]), float(parts[5])
            if size <= 8 and lat is None:
                lat = latency
            bw = b  # the largest size comes last
    return lat, bw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30, help="srun pairs (default 30)")
    ap.add_argument("--mpi-reps", type=int, default=5)
    ap.add_argument("--named-reps", type=int, default=20)
    ap.add_argument("--pull-reps", type=int, default=5,
                    help="first-use pulls from srun vs gateway pull (0 skips part 4)")
    ap.add_argument("--named-only", action="store_true",
                    help="run only part 3 (the named container)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/srun.sh: run as root (it starts a Slurm cluster)")
    from hpcc.testkit.slurmcluster import SlurmCluster, find_plugin

    plugin = find_plugin() or str(REPO / "spank" / "spank_hpcc.so")
    if not os.path.exists(plugin):
        raise SystemExit("bench/srun.sh: build the plugin first (make spank)")
    ensure_user(USER)
    # a site store lies below root-only directories (not /tmp): its images are trusted for
    # the kernel's squashfs (docs/launcher.md, rule K), as on a real cluster
    work = Path(tempfile.mkdtemp(prefix="hpcc-bench-srun-", dir="/var/lib"))
    os.chmod(work, 0o755)
    try:
        store, native_pp = make_store(work)
        os.chmod(native_pp, 0o755)
        os.chmod(native_pp.parent, 0o755)
        hooks = work / "hooks.d"
        hooks.mkdir()
        import json
        (hooks / "50-mpi.json").write_text(json.dumps({
            "version": "1.0.0",
            "hook": {"path": str(Path(sys.executable).parent / "hpcc-hook"),
                     "args": ["hpcc-hook", "mpi"]},
            "when": {"annotations": {"^org\\.hpcc\\.mpi$": "^1$"}},
            "stages": ["createRuntime"]}))
        cfg = work / "hpcc.toml"
        # named containers in a directory of the bench's own: another Slurm cluster on this
        # machine (a test run) numbers its jobs from 1 too, and its job prolog and epilog
        # would remove this cluster's job 1 containers from the shared default directory
        cfg.write_text(f'[store]\npath = "{store.root}"\n[launcher]\nhooks_dir = "{hooks}"\n'
                       f'containers_dir = "{work}/containers"\n')
        shutil.copy(plugin, work / "spank_hpcc.so")
        line = f"required {work}/spank_hpcc.so python={sys.executable} config={cfg}"
        cluster = SlurmCluster(work / "cluster", nodes=2, separate_hosts=True,
                               plugstack_lines=[line])
        cluster.start()
        try:
            if args.named_reps > 0:  # --named-reps 0 skips part 3
                tp, tn, tu, ap, at = named_figures(cluster, "bench/busybox:1",
                                                   args.named_reps, cfg)
                mp, mn, mu, map_, mat = (statistics.median(x) for x in (tp, tn, tu, ap, at))
                print(f"in one allocation, {len(tp)} rounds: srun -N2 -n8 true median "
                      f"{mp * 1000:.1f} ms; in the existing named container "
                      f"{mn * 1000:.1f} ms; in a fresh unnamed container {mu * 1000:.1f} ms")
                print(f"named/plain: {mn / mp:.2f}x median, {min(tn) / min(tp):.2f}x best "
                      f"(target <= 1.1x); named/unnamed container: {mn / mu:.2f}x median")
                print(f"while it runs: plain {map_ * 1000:.1f} ms, attached (NAME:exec) "
                      f"{mat * 1000:.1f} ms: attached/plain {mat / map_:.2f}x median, "
                      f"{min(at) / min(ap):.2f}x best")
            if args.named_only:
                return
            if args.pull_reps > 0:
                tg, tf = pull_figures(cluster, work, args.pull_reps)
                mg, mf = statistics.median(tg), statistics.median(tf)
                print(f"gateway pull (fresh tag, converts)          median {mg * 1000:7.1f} ms "
                      f"({len(tg)} runs)")
                print(f"srun first-use pull (srun minus a warm srun) median {mf * 1000:7.1f} ms "
                      f"({len(tf)} runs)")
                print(f"first-use/gateway pull: {mf / mg:.2f}x median, {min(tf) / min(tg):.2f}x "
                      "best (target <= 1.1x)")
            plain = ["srun", "-N2", "-n8", "true"]
            cont = ["srun", "-N2", "-n8", "--container=bench/busybox:1", "true"]
            for _ in range(3):  # warm-up (page cache, Python bytecode)
                timed(cluster, plain)
                timed(cluster, cont)
            tp, tc = [], []
            for _ in range(args.reps):
                tp.append(timed(cluster, plain)[0])
                tc.append(timed(cluster, cont)[0])
            mp, mc = statistics.median(tp), statistics.median(tc)
            print(f"srun -N2 -n8 true                          median {mp * 1000:7.1f} ms "
                  f"(min {min(tp) * 1000:.1f}, {args.reps} runs)")
            print(f"srun -N2 -n8 --container=bench/busybox:1 true median {mc * 1000:7.1f} ms "
                  f"(min {min(tc) * 1000:.1f}, {args.reps} runs)")
            print(f"container/plain: {mc / mp:.2f}x median, {min(tc) / min(tp):.2f}x best "
                  "(target <= 1.25x)")

            nat = ["srun", "--mpi=pmi2", "-N2", "-n2", str(native_pp), "1000", "4194304"]
            con = ["srun", "--mpi=pmi2", "-N2", "-n2", "--container=bench/mpi:1",
                   "--container-mpi", "pingpong-abi", "1000", "4194304"]
            ln, bn, lc, bc = [], [], [], []
            for _ in range(args.mpi_reps):
                lat, b = pingpong_figures(timed(cluster, nat)[1])
                ln.append(lat)
                bn.append(b)
                lat, b = pingpong_figures(timed(cluster, con)[1])
                lc.append(lat)
                bc.append(b)
            mln, mbn = statistics.median(ln), statistics.median(bn)
            mlc, mbc = statistics.median(lc), statistics.median(bc)
            print(f"MPI ping-pong native:    latency median {mln:.2f} us (min {min(ln):.2f}), "
                  f"bandwidth median {mbn:.0f} MB/s (max {max(bn):.0f}) at 4 MiB")
            print(f"MPI ping-pong container: latency median {mlc:.2f} us (min {min(lc):.2f}), "
                  f"bandwidth median {mbc:.0f} MB/s (max {max(bc):.0f}) at 4 MiB")
            print(f"container/native bandwidth: {mbc / mbn:.3f}x median, "
                  f"{max(bc) / max(bn):.3f}x best; latency native/container: "
                  f"{mln / mlc:.3f}x median, {min(ln) / min(lc):.3f}x best (target >= 0.98x)")
            print(f"load average during the run: {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} CPUs")
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
