"""Job and node facts from Slurm, for hpcc's Python side (e.g. `gateway prefetch`).

Two sources, same result types:
- pyslurm, when a build whose major version matches the site's Slurm is importable (pyslurm
  follows Slurm's release numbers: pyslurm 22.5.x for Slurm 22.05);
- otherwise Slurm's own `squeue --json` / `sinfo --json` (OpenAPI data, Slurm >= 21.08).
`HPCC_SLURM_BACKEND=json|pyslurm` forces one. The clients find the cluster the usual way
(SLURM_CONF, /etc/slurm/slurm.conf, configless DNS).

Only the standard library is imported here.
"""
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from ..errors import SlurmError

PENDING = "PENDING"


@dataclass
class Job:
    job_id: int
    name: str
    user: str
    uid: int
    state: str
    reason: str = ""
    container: str = ""
    nodes: str = ""
    partition: str = ""
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class Node:
    name: str
    state: str
    cpus: int
    hostname: str = ""
    address: str = ""


def _run_json(argv, env=None):
    exe = shutil.which(argv[0], path=(env or os.environ).get("PATH"))
    if exe is None:
        raise SlurmError(f"'{argv[0]}' is not installed on this host",
                         hint="run this on a Slurm login node or install the Slurm clients")
    try:
        p = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, env=env,
                           timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(argv)}' did not answer within 60 s",
                         hint="check that slurmctld is up (scontrol ping)") from None
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmError(f"'{' '.join(argv)}' failed: {msg}",
                         hint="check that slurmctld is up (scontrol ping)")
    try:
        data = json.loads(p.stdout)
    except ValueError:
        raise SlurmError(f"'{' '.join(argv)}' printed no JSON",
                         hint="hpcc needs Slurm >= 21.08 (squeue --json)") from None
    errors = [e for e in data.get("errors") or [] if e]
    if errors:
        first = errors[0]
        text = first.get("error") or first.get("description") if isinstance(first, dict) \
            else str(first)
        raise SlurmError(f"'{' '.join(argv)}' reported an error: {text}")
    return data


def _state(v):
    # 22.05 gives a string ("PENDING"); newer releases a list (["PENDING"]).
    if isinstance(v, list):
        return v[0] if v else ""
    return v or ""


def _int(v):
    # Newer OpenAPI versions wrap numbers as {"set": true, "number": N}.
    if isinstance(v, dict):
        return int(v.get("number", 0))
    return int(v or 0)


def _job_from_json(j):
    return Job(job_id=_int(j.get("job_id")), name=j.get("name", ""),
               user=j.get("user_name", ""), uid=_int(j.get("user_id")),
               state=_state(j.get("job_state")), reason=j.get("state_reason", "") or "",
               container=j.get("container", "") or "", nodes=j.get("nodes", "") or "",
               partition=j.get("partition", "") or "", extra=j)


def _node_from_json(n):
    return Node(name=n.get("name", ""), state=_state(n.get("state")).lower(),
                cpus=_int(n.get("cpus")), hostname=n.get("hostname", ""),
                address=n.get("address", ""))


# ---- pyslurm --------------------------------------------------------------------------------
def slurm_version(env=None):
    """'22.05.8' from `sinfo --version` (the clients' version is the site's)."""
    exe = shutil.which("sinfo", path=(env or os.environ).get("PATH"))
    if exe is None:
        return ""
    p = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env)
    parts = p.stdout.split()
    return parts[-1] if p.returncode == 0 and parts else ""


def _pyslurm(env=None):
    """The pyslurm module when its version matches the site's Slurm, else None."""
    env = env if env is not None else os.environ
    if not env.get("SLURM_CONF") and not os.path.exists("/etc/slurm/slurm.conf"):
        return None  # importing pyslurm without a configuration kills the interpreter
    try:
        import pyslurm  # noqa: PLC0415 (optional dependency)
    except Exception:
        return None
    have = str(getattr(pyslurm, "__version__", "")).split(".")
    want = slurm_version(dict(env)).split(".")
    # pyslurm 22.5.x <-> Slurm 22.05.x
    if len(have) < 2 or len(want) < 2 or have[0] != want[0] or int(have[1]) != int(want[1]):
        return None
    return pyslurm


def backend(env=None):
    forced = (env or os.environ).get("HPCC_SLURM_BACKEND", "")
    if forced in ("json", "pyslurm"):
        return forced
    return "pyslurm" if _pyslurm(env) else "json"


def _jobs_pyslurm(mod):
    out = []
    for jid, j in mod.job().get().items():
        out.append(Job(job_id=int(jid), name=j.get("name") or "", user=j.get("user_name") or "",
                       uid=int(j.get("user_id") or 0), state=j.get("job_state") or "",
                       reason=j.get("state_reason") or "", container=j.get("container") or "",
                       nodes=j.get("nodes") or "", partition=j.get("partition") or "", extra=j))
    return out


# ---- public API -----------------------------------------------------------------------------
def jobs(*, states=None, env=None):
    """Jobs known to the controller, optionally only those in `states` (e.g. {"PENDING"})."""
    if backend(env) == "pyslurm":
        mod = _pyslurm(env)
        if mod is None:
            raise SlurmError("HPCC_SLURM_BACKEND=pyslurm but no pyslurm matching this Slurm "
                             "is importable", hint="unset HPCC_SLURM_BACKEND")
        result = _jobs_pyslurm(mod)
    else:
        data = _run_json(["squeue", "--json"], env)
        result = [_job_from_json(j) for j in data.get("jobs") or []]
    if states:
        wanted = {s.upper() for s in states}
        result = [j for j in result if j.state.upper() in wanted]
    return result


def nodes(*, env=None):
    """Nodes of the cluster with their state ('idle', 'allocated', 'mixed', 'down'...)."""
    data = _run_json(["sinfo", "--json"], env)
    return [_node_from_json(n) for n in data.get("nodes") or []]


def script_container_image(script):
    """The IMAGE of a `#SBATCH --container-image=IMAGE` (or `--container-image IMAGE`)
    directive in a batch script, read as sbatch does: directives count only before the first
    command. None when there is none."""
    import shlex

    image = None
    lines = script.splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            break  # the first command ends the directives
        if not text.startswith("#SBATCH"):
            continue
        try:
            words = shlex.split(text[len("#SBATCH"):], comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words):
            if w.startswith("--container-image="):
                image = w.split("=", 1)[1]
            elif w == "--container-image" and i + 1 < len(words):
                image = words[i + 1]
    return image or None


def batch_script(job_id, env=None):
    """The batch script of a job (`scontrol write batch_script ID -`), or "" when it cannot be
    read (not a batch job, or not allowed: the script is readable by root, SlurmUser and the
    job's owner)."""
    exe = shutil.which("scontrol", path=(env or os.environ).get("PATH"))
    if not exe:
        return ""
    try:
        p = subprocess.run([exe, "write", "batch_script", str(job_id), "-"], capture_output=True,
                           text=True, errors="replace", env=env, timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    return p.stdout if p.returncode == 0 else ""


def pending_job_images(*, env=None):
    """Images named by pending jobs, each once, in job order: `--container=IMAGE` (in the
    job record), else a `#SBATCH --container-image=IMAGE` line of a batch job's script (the
    SPANK option is not in the job record; one given on sbatch's command line is not seen).

    The prefetcher pulls these before the jobs start. Values that are paths (Slurm OCI
    bundles, .sqfs files) are not registry images and are left out.
    """
    seen = []
    for j in jobs(states={PENDING}, env=env):
        image = j.container.strip()
        if not image and j.extra.get("batch_flag", True):
            image = (script_container_image(batch_script(j.job_id, env)) or "").strip()
        if not image or image.startswith(("/", "./", "../")) or image in seen:
            continue
        seen.append(image)
    return seen
