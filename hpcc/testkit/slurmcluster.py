"""A real, throw-away Slurm cluster on this machine: munge, slurmctld and one or two slurmd.

Used by the test suite (tests/fixtures/slurm.py), the benchmarks and `make demo`. Everything
lives in one work directory (config, keys, sockets, spool, logs); `stop()` ends every process
the cluster started (daemons and the slurmstepd processes they left) and nothing else.

Two layouts:
- `nodes=1`: one slurmd, node name `n1`, on 127.0.0.1.
- `nodes=2, separate_hosts=True`: each slurmd runs in its own mount + UTS namespace with its own
  host name (`n1`, `n2`) and its own loopback address (127.0.1.1, 127.0.1.2), so `srun -N2`
  crosses two "hosts" whose mounts are invisible to each other and to the test process.
  `separate_hosts=False` runs both slurmd in the host's namespaces (Slurm's multiple-slurmd mode).

Root is required (slurmd runs tasks as other users).
"""
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_SBIN = "/usr/sbin"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, workdir, *, nodes=1, separate_hosts=False, plugstack_lines=(),
                 slurmd_env=None, cpus_per_node=8, extra_conf=""):
        self.dir = Path(workdir)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.separate_hosts = separate_hosts
        self.plugstack_lines = list(plugstack_lines)
        self.slurmd_env = dict(slurmd_env or {})
        self.cpus = cpus_per_node
        self.extra_conf = extra_conf
        self.procs = {}
        self.conf = self.dir / "etc" / "slurm.conf"
        self.plugstack = self.dir / "etc" / "plugstack.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.hostname = socket.gethostname()

    # -- configuration ----------------------------------------------------------------------
    def node_addr(self, name):
        if self.separate_hosts:
            return f"127.0.1.{self.nodes.index(name) + 1}"
        return "127.0.0.1"

    def _write_config(self):
        etc = self.dir / "etc"
        for d in ("etc", "state", "spool", "log", "run"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.dir / "munge", 0o755)
        os.chmod(self.dir, 0o755)
        ctld_port = _free_port()
        lines = [
            "ClusterName=hpcctest",
            # Job ids of their own: every cluster on the machine (tests, benches, another
            # session's) numbering from 1 would let one's job epilog remove another's
            # job-scoped named containers (/run/hpcc-containers/job-N-...)
            f"FirstJobId={random.randrange(1, 6000) * 10000}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.dir}/state",
            f"SlurmdSpoolDir={self.dir}/spool/%n",
            f"SlurmctldPidFile={self.dir}/run/slurmctld.pid",
            f"SlurmdPidFile={self.dir}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.dir}/log/slurmctld.log",
            f"SlurmdLogFile={self.dir}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            "SrunPortRange=40000-40999",
            "KillWait=2",
            "MinJobAge=300",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "LaunchParameters=use_interactive_step",
            f"PlugStackConfig={self.plugstack}",
        ]
        for name in self.nodes:
            host = name if self.separate_hosts else self.hostname
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr={self.node_addr(name)} "
                         f"Port={_free_port()} CPUs={self.cpus} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=NO")
        if self.extra_conf:
            lines.append(self.extra_conf)
        self.conf.write_text("\n".join(lines) + "\n")
        self.plugstack.write_text("".join(line + "\n" for line in self.plugstack_lines))
        for p in (self.conf, self.plugstack):
            os.chmod(p, 0o644)
        os.chmod(etc, 0o755)

    @property
    def env(self):
        """Environment for Slurm clients (srun, sbatch, squeue...) talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del env[k]
        return env

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout=30):
        self._write_config()
        try:
            self._start_munge()
            self._start_ctld()
            for name in self.nodes:
                self._start_slurmd(name)
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, key, argv, env=None, log=None):
        out = open(self.dir / "log" / f"{key}.stdout", "ab")
        self.procs[key] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           cwd=self.dir)  # core files stay in the work dir
        out.close()

    def _start_munge(self):
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [f"{SLURM_SBIN}/munged", "-F", "--force",
                               f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.dir}/munge/munged.pid",
                               f"--log-file={self.dir}/log/munged.log",
                               f"--seed-file={self.dir}/munge/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        os.chmod(self.munge_socket, 0o777)

    def _start_ctld(self):
        env = self.env
        self._spawn("slurmctld", [f"{SLURM_SBIN}/slurmctld", "-D", "-i", "-f", str(self.conf)],
                    env=env)

    def _start_slurmd(self, name):
        env = self.env
        env.update(self.slurmd_env)
        argv = [f"{SLURM_SBIN}/slurmd", "-D", "-N", name, "-f", str(self.conf)]
        (self.dir / "spool" / name).mkdir(parents=True, exist_ok=True)
        if self.separate_hosts:
            # Own mount + UTS namespace, own host name; the mount namespace is private, so
            # what the node mounts stays on the node.
            argv = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                    "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        self._spawn(f"slurmd-{name}", argv, env=env)

    def _wait(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{key} exited with {p.returncode}; see {self.dir}/log")
            if cond():
                return
            time.sleep(0.05)
        raise ClusterError(f"{what} after {timeout}s; see {self.dir}/log")

    def wait_idle(self, timeout=30):
        def idle():
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                return False
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in self.nodes)

        self._wait(idle, timeout, "nodes did not become idle")

    def run(self, *argv, user=None, timeout=120, check=False, input=None, env=None):
        """Run a Slurm client command against this cluster (as `user` if given)."""
        full = self.env
        if env:
            full.update(env)
        p = subprocess.run([str(a) for a in argv], env=full, capture_output=True, text=True,
                           timeout=timeout, user=user, input=input,
                           cwd=self._cwd_for(user))
        if check and p.returncode != 0:
            raise ClusterError(f"{argv} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    @staticmethod
    def _cwd_for(user):
        if user is None:
            return None
        import pwd
        home = pwd.getpwnam(user).pw_dir
        return home if os.path.isdir(home) else "/tmp"

    def slurmd_pid(self, name):
        """Pid of the slurmd of node `name` (the daemon itself, inside its namespaces)."""
        p = self.procs[f"slurmd-{name}"]
        if not self.separate_hosts:
            return p.pid
        # unshare execs sh which execs slurmd: same pid.
        return p.pid

    def stepd_pids(self):
        """Pids of slurmstepd processes belonging to this cluster."""
        out = []
        conf = f"SLURM_CONF={self.conf}".encode()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                if not cmd.startswith(b"slurmstepd"):
                    continue
                with open(f"/proc/{d}/environ", "rb") as f:
                    if conf in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
        return out

    def helper_server_pids(self, children=False):
        """hpcc.stepd servers started for this cluster's plugin (matched by their config);
        the children a server forks for each step, which may outlive srun a moment, only
        with children=True."""
        configs = set()
        for line in self.plugstack_lines:
            for word in line.split():
                if word.startswith("config="):
                    configs.add(b"HPCC_CONFIG=" + word[len("config="):].encode())
        found = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"hpcc.stepd\0--serve" not in f.read():
                        continue
                with open(f"/proc/{d}/environ", "rb") as f:
                    if not configs & set(f.read().split(b"\0")):
                        continue
                with open(f"/proc/{d}/stat", "rb") as f:
                    found[int(d)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return sorted(pid for pid, ppid in found.items() if children or ppid not in found)

    def stop(self):
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 5
            while self.stepd_pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        for pid in self.stepd_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.helper_server_pids(children=True):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for key in [k for k in self.procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]:
            p = self.procs.get(key)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_plugin():
    """spank_hpcc.so: $HPCC_SPANK_PLUGIN, else the build in this checkout (make spank)."""
    cands = [os.environ.get("HPCC_SPANK_PLUGIN", ""),
             os.path.join(os.getcwd(), "spank", "spank_hpcc.so"),
             str(Path(__file__).resolve().parents[2] / "spank" / "spank_hpcc.so")]
    for c in cands:
        if c and os.path.isfile(c):
            return c
    return None


def demo(ref, show):
    """`make demo`'s last step: `srun --container=REF` across two embedded nodes."""
    import sys
    import tempfile

    from hpcc.config import config_path

    plugin = find_plugin()
    if plugin is None:
        print("spank_hpcc.so is not built (make spank): skipping the Slurm demo")
        return
    work = Path(tempfile.mkdtemp(prefix="hpcc-demo-slurm-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        shutil.copy(plugin, work / "spank_hpcc.so")
        cfg, _ = config_path()
        line = f"required {work}/spank_hpcc.so python={sys.executable}"
        if os.path.exists(cfg):
            line += f" config={cfg}"
        cluster = SlurmCluster(work / "cluster", nodes=2, separate_hosts=True,
                               plugstack_lines=[line])
        cluster.start()
        try:
            print(f"cluster up: nodes {', '.join(cluster.nodes)} "
                  f"(SLURM_CONF={cluster.conf})")
            env = cluster.env
            show(["srun", "-N2", "-n4", "-l", f"--container={ref}", "sh", "-c",
                  'echo "$(hostname): $(grep PRETTY_NAME /etc/os-release 2>/dev/null || '
                  'cat /etc/hostname) in $HPCC_IMAGE_DIGEST"'], env=env, cwd="/tmp")
            show(["srun", "-N2", "-n2", "-l", f"--container={ref}", "/app/hello.sh"],
                 env=env, cwd="/tmp")
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
