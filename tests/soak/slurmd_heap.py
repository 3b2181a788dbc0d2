"""Soak slurmd (and slurmstepd) for heap corruption, with and without hpcc's SPANK plugin.

Issue 10 §4: under 200 steps, 8 at a time, on the 2-node test cluster with the plugin loaded,
one slurmd aborted once with glibc's "unaligned tcache chunk detected" in an exiting RPC
thread. This script repeats that load on a throw-away 2-node cluster (hpcc.testkit) with a
memory checker around the daemons, so that a heap error is reported where it happens instead
of crashing later:

  --checker valgrind   slurmd runs under valgrind memcheck (slurmstepd, exec'd by it, runs
                       natively: what valgrind watches is slurmd's own heap, where the abort
                       was). Errors: valgrind's ERROR SUMMARY per slurmd at its exit.
  --checker asan       the plugin is built with -fsanitize=address, and libasan is preloaded
                       into slurmd and (inherited) every slurmstepd: ASan's allocator checks
                       every free/realloc in both daemons (double or invalid frees, writes
                       into freed chunks when they are reused), and the plugin's own code is
                       bounds-checked. Errors: ASan reports under <work>/asan.*.
  --checker none       no checker (a plain repeat of the original load).

  --plugin yes|no      with the plugin loaded (container steps: --container-image) or
                       without it (the same steps on the host), for the comparison.

Not part of the test suite (minutes of CPU). As root, from the repository, after
`make install`:

    python3 tests/soak/slurmd_heap.py --checker valgrind --plugin yes --steps 200 --parallel 8

Prints one summary line and exits 0 when no checker reported an error, no daemon died and
every step succeeded; 1 otherwise. --keep leaves the work directory (logs) in place.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))  # tests.fixtures; `hpcc` stays the installed package

from hpcc.testkit.slurmcluster import SLURM_SBIN, SlurmCluster  # noqa: E402
from tests.fixtures.slurm import busybox_tree, ensure_user, publish_tree  # noqa: E402

USER = "slurmuser1"
IMAGE = "hpcctest/soak:1"
LIBASAN = "/usr/lib/gcc/x86_64-linux-gnu/12/libasan.so"
VALGRIND = ["valgrind", "--tool=memcheck", "--error-exitcode=99", "--leak-check=no",
            "--num-callers=30", "--child-silent-after-fork=yes", "--trace-children=no"]


class CheckedCluster(SlurmCluster):
    """The test kit's cluster with a command put in front of each slurmd."""

    def __init__(self, *a, wrapper=(), **kw):
        super().__init__(*a, **kw)
        self.wrapper = list(wrapper)

    def _start_slurmd(self, name):
        env = self.env
        env.update(self.slurmd_env)
        argv = [*[w.replace("%n", name) for w in self.wrapper],
                f"{SLURM_SBIN}/slurmd", "-D", "-N", name, "-f", str(self.conf)]
        (self.dir / "spool" / name).mkdir(parents=True, exist_ok=True)
        if self.separate_hosts:
            argv = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                    "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        self._spawn(f"slurmd-{name}", argv, env=env)


def build_plugin(work, asan):
    out = work / "spank_hpcc.so"
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra"]
    if asan:
        flags += ["-fsanitize=address"]
    subprocess.run(["cc", *flags, "-fPIC", "-fvisibility=hidden", "-shared", "-o", str(out),
                    *map(str, sorted((REPO / "spank").glob("*.c")))], check=True)
    os.chmod(out, 0o755)
    return out


def build_trace(work):
    out = work / "spank_trace.so"
    subprocess.run(["cc", "-O2", "-g", "-Wall", "-Wextra", "-fPIC", "-shared", "-o", str(out),
                    str(REPO / "tests" / "soak" / "spank_trace.c")], check=True)
    os.chmod(out, 0o755)
    log = work / "trace.log"
    log.touch()
    os.chmod(log, 0o666)   # srun (the job user) logs its calls too
    return out, log


def trace_summary(log):
    """{"program ctx function": calls} and the slurmd threads that ran plugin code."""
    calls, slurmd_threads = {}, set()
    for line in log.read_text().splitlines():
        comm, pid, tid, ctx, fn = line.split()
        key = f"{comm} {ctx} {fn}"
        calls[key] = calls.get(key, 0) + 1
        if ctx == "ctx=slurmd":  # (under valgrind the program name is memcheck's)
            slurmd_threads.add((pid, tid, pid[4:] == tid[4:]))
    return calls, sorted(slurmd_threads)


def make_site(work, plugin):
    store = work / "store"
    cfg = work / "hpcc.toml"
    hooks = work / "hooks.d"
    hooks.mkdir()
    cfg.write_text(f'[store]\npath = "{store}"\n[launcher]\nhooks_dir = "{hooks}"\n')
    tree = busybox_tree(work / "tree")
    publish_tree(store, tree, [IMAGE])
    shutil.rmtree(work / "tree")
    for p in (work, store, hooks):
        os.chmod(p, 0o755)
    os.chmod(cfg, 0o644)
    return f"required {plugin} python={sys.executable} config={cfg}"


def soak(cluster, steps, parallel, plugin, client_env=None, reconfigure_every=0):
    # each task says whether it runs in the image (its os-release) or on the host
    cmd = ["srun", "-N2", "-n2"] + ([f"--container-image={IMAGE}"] if plugin else []) + \
          ["/bin/sh", "-c", "grep -q 'hpcc test image' /etc/os-release && echo in || echo out"]
    want = ["in", "in"] if plugin else ["out", "out"]
    failures = []

    def one(i):
        if reconfigure_every and i and i % reconfigure_every == 0:
            cluster.run("scontrol", "reconfigure", timeout=120)
        p = cluster.run(*cmd, user=USER, timeout=600, env=client_env)
        good = p.returncode == 0 and p.stdout.split() == want
        if not good:
            failures.append((i, p.returncode, (p.stdout + p.stderr).strip()[-300:]))
        return good

    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        ok = sum(pool.map(one, range(steps)))
    return ok, failures, time.monotonic() - t0


def stop_slurmds(cluster, timeout):
    """SIGTERM each slurmd and wait (a checker writes its summary at exit); exit codes."""
    codes = {}
    for key, p in list(cluster.procs.items()):
        if key.startswith("slurmd-"):
            if p.poll() is None:
                p.terminate()
            try:
                codes[key] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[key] = p.wait(10)
    return codes


def leftovers(work, exclude):
    """Processes of this run still alive after the daemons stopped (their command line names
    the work directory), each killed: {pid: "state wchan command"}."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid() or int(d) in exclude:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if str(work) not in cmd:
                continue
            with open(f"/proc/{d}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        found[int(d)] = f"{state} {wchan} {cmd[:80]}"
        try:
            os.kill(int(d), 9)
        except ProcessLookupError:
            pass
    return found


def valgrind_errors(work):
    out = {}
    for f in sorted(glob.glob(str(work / "valgrind-*.log"))):
        text = Path(f).read_text(errors="replace")
        m = re.findall(r"ERROR SUMMARY: (\d+) errors", text)
        out[os.path.basename(f)] = int(m[-1]) if m else None
    return out


def asan_reports(work):
    """({program: processes that ran under ASan}, {log file: error kind}). verbosity=1 makes
    every process under ASan write a log (asan.<program>.<pid>): proof of coverage."""
    ran, errors = {}, {}
    for f in sorted(glob.glob(str(work / "asan.*")) + glob.glob(str(work / "client/asan.*"))):
        prog = os.path.basename(f).split(".")[1]
        ran[prog] = ran.get(prog, 0) + 1
        text = Path(f).read_text(errors="replace")
        m = re.search(r"ERROR: (\w+Sanitizer): (\S+)", text)
        if m:
            errors[os.path.basename(f)] = f"{m.group(1)}: {m.group(2)}"
    return ran, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checker", choices=("valgrind", "asan", "none"), default="valgrind")
    ap.add_argument("--plugin", choices=("yes", "no"), default="yes")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--reconfigure-every", type=int, default=0, metavar="N",
                    help="also run `scontrol reconfigure` before every Nth step")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--trace", action="store_true",
                    help="load the plugin through spank_trace.so and report which of its "
                         "functions ran in which program and thread")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("slurmd_heap.py: run as root (it starts munge, slurmctld and slurmd)")
    ensure_user(USER)
    plugin = args.plugin == "yes"
    work = Path(tempfile.mkdtemp(prefix="hpcc-soak-", dir="/tmp"))
    os.chmod(work, 0o755)
    lines, wrapper, slurmd_env, client_env = [], [], {}, None
    if plugin:
        lines = [make_site(work, build_plugin(work, args.checker == "asan"))]
        if args.trace:
            shim, trace_log = build_trace(work)
            real = lines[0].split()[1]
            lines = [lines[0].replace(f"required {real}",
                                      f"required {shim} real={real} log={trace_log}")]
    if args.checker == "valgrind":
        wrapper = VALGRIND + [f"--log-file={work}/valgrind-%n.log"]
    elif args.checker == "asan":
        slurmd_env = {"LD_PRELOAD": LIBASAN, "ASAN_OPTIONS":
                      f"log_path={work}/asan:log_exe_name=1:verbosity=1:detect_leaks=0"}
        # srun loads the plugin too (its options): the same runtime there, logs the job
        # user can write
        (work / "client").mkdir(mode=0o1777)
        os.chmod(work / "client", 0o1777)
        client_env = {"LD_PRELOAD": LIBASAN, "ASAN_OPTIONS":
                      f"log_path={work}/client/asan:log_exe_name=1:verbosity=1:"
                      "detect_leaks=0"}
    cluster = CheckedCluster(work / "cluster", nodes=2, separate_hosts=True,
                             plugstack_lines=lines, slurmd_env=slurmd_env, wrapper=wrapper)
    result = 1
    try:
        cluster.start(timeout=180)
        pids_before = {k: p.pid for k, p in cluster.procs.items() if k.startswith("slurmd-")}
        loaded = {}  # is the plugin mapped into each slurmd (under its checker)?
        for k, pid in pids_before.items():
            with open(f"/proc/{pid}/maps") as f:
                loaded[k] = "spank_hpcc" in f.read()
        ok, failures, secs = soak(cluster, args.steps, args.parallel, plugin, client_env,
                                  args.reconfigure_every)
        died = [k for k, p in cluster.procs.items() if k.startswith("slurmd-")
                and p.poll() is not None]
        codes = stop_slurmds(cluster, 120)
        stuck = leftovers(work, {p.pid for p in cluster.procs.values()})
        logs = " ".join(Path(f).read_text(errors="replace")
                        for f in glob.glob(str(work / "cluster" / "log" / "*")))
        glibc = sorted(set(re.findall(r"(unaligned tcache chunk detected|double free[^\n]*|"
                                      r"malloc\(\): [^\n]*|free\(\): [^\n]*|corrupted [^\n]*)",
                                      logs)))
        vg = valgrind_errors(work) if args.checker == "valgrind" else {}
        asan_ran, asan = asan_reports(work) if args.checker == "asan" else ({}, {})
        bad = (failures or died or glibc or any(v != 0 for v in vg.values()) or asan or stuck
               or (args.checker == "valgrind" and len(vg) != len(pids_before))
               or any(v != plugin for v in loaded.values()))
        print(f"checker={args.checker} plugin={args.plugin} steps={args.steps} "
              f"parallel={args.parallel} plugin_in_slurmd={loaded} ok={ok} failed={len(failures)} "
              f"seconds={secs:.0f} slurmd_died_during_soak={died or 'none'} "
              f"slurmd_exit={codes} valgrind_errors={vg or '-'} "
              f"asan_processes={asan_ran or '-'} asan_errors={asan or '-'} "
              f"glibc_messages={glibc or 'none'} leftover_processes={stuck or 'none'} "
              f"work={work}")
        if plugin and args.trace:
            calls, threads = trace_summary(trace_log)
            print("plugin calls (program context function: count):")
            for k in sorted(calls):
                print(f"  {k}: {calls[k]}")
            print("slurmd threads that ran plugin code (pid, tid, main thread?): "
                  f"{threads}")
        for i, rc, text in failures[:5]:
            print(f"  step {i}: exit {rc}: {text}")
        result = 1 if bad else 0
    finally:
        cluster.stop()
        if not args.keep and result == 0:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
