"""Batch and interactive steps in a container: the binds and variables that let the job's
script run the host's Slurm clients (srun, sbatch, squeue...) from inside the container.

Only `os` is imported at module level (this runs on the launch path of every batch step).
"""
import os

BATCH_STEP = 4294967291
INTERACTIVE_STEP = 4294967290
HOST_DIR = "/.hpcc/host"      # where the host's /usr appears in batch containers
BIN_DIR = "/.hpcc/bin"        # Slurm client wrappers (srun, sbatch...) in batch containers


def _slurm_conf_values(path):
    """A few keys of slurm.conf (first occurrence), for the client binds of batch steps."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                k, eq, v = line.partition("=")
                if eq and k.strip().lower() in ("authinfo", "plugstackconfig", "plugindir"):
                    out.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    return out


def _host_loader():
    for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1",
              "/lib64/ld64.so.2", "/lib/ld64.so.1"):
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def slurm_client_setup(args):
    """Binds and variables that let a batch script inside the container run srun, sbatch,
    squeue... : the host's /usr read-only under /.hpcc/host, Slurm's plugin and config
    directories, the munge socket, the SPANK plugin, and wrapper scripts that start the
    host's clients with the host's dynamic loader and libraries."""
    mounts, env = [], {}
    loader = _host_loader()
    if not loader or not loader.startswith("/usr/"):
        return mounts, env  # a host without merged /usr: not supported
    mounts.append(f"/usr:{HOST_DIR}/usr:ro")
    conf = args.get("slurm_conf") or "/etc/slurm/slurm.conf"
    vals = _slurm_conf_values(conf)
    plugindir = vals.get("plugindir") or ""
    libdirs = []
    for lib in ("libslurmfull.so",):
        for d in ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib64/slurm", "/usr/lib/slurm",
                  "/usr/lib/aarch64-linux-gnu/slurm-wlm"):
            if os.path.exists(os.path.join(d, lib)):
                plugindir = plugindir or d
                libdirs.append(d)
                break
    libdirs.append(os.path.dirname(loader))
    binds = {plugindir} if plugindir else set()
    binds.add(os.path.dirname(os.path.abspath(conf)))
    auth = vals.get("authinfo", "")
    sock = "/run/munge/munge.socket.2"
    for item in auth.split(","):
        if item.startswith("socket="):
            sock = item[len("socket="):]
    binds.add(os.path.dirname(sock))
    plugstack = vals.get("plugstackconfig")
    if plugstack:
        binds.add(plugstack)
    if args.get("plugin"):
        binds.add(args["plugin"])
    for b in sorted(binds):
        if b and os.path.exists(b):
            mounts.append(f"{b}:{b}:ro")
    from importlib.resources import files
    wrappers = str(files("hpcc").joinpath("data", "slurm-bin"))
    if os.path.isdir(wrappers):
        mounts.append(f"{wrappers}:{BIN_DIR}:ro")
    env["HPCC_HOST_LD"] = HOST_DIR + loader
    env["HPCC_HOST_LIBS"] = ":".join(HOST_DIR + d for d in libdirs)
    env["HPCC_HOST"] = HOST_DIR
    if args.get("slurm_conf"):
        env["SLURM_CONF"] = args["slurm_conf"]
    return mounts, env
