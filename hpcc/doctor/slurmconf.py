"""Slurm: which srun and slurm.conf this host uses, its plugstack.conf (includes followed),
and the check that hpcc's SPANK plugin is configured."""
import os
import shutil
import subprocess

from .check import Check


def _slurm_conf():
    return os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"


def _conf_value(text, key):
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        k, sep, v = line.partition("=")
        if sep and k.strip().lower() == key.lower():
            return v.strip()
    return None


def _plugstack_lines(path, depth=0):
    """(spank_hpcc lines, files read) of a plugstack.conf, following `include` globs."""
    import glob
    lines, files = [], [path]
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return lines, []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "include" and len(words) > 1 and depth < 4:
            pattern = words[1]
            if not pattern.startswith("/"):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for p in sorted(glob.glob(pattern)):
                more, seen = _plugstack_lines(p, depth + 1)
                lines += more
                files += seen
        elif len(words) > 1 and os.path.basename(words[1]).startswith("spank_hpcc"):
            lines.append({"file": path, "line": line, "plugin": words[1],
                          "args": words[2:], "required": words[0] == "required"})
    return lines, files


def slurm_facts():
    conf = _slurm_conf()
    srun = shutil.which("srun")
    facts = {"slurm_conf": conf, "srun": srun, "lines": [], "plugstack": None,
             "plugstack_files": []}
    try:
        with open(conf) as f:
            text = f.read()
    except OSError:
        facts["slurm_conf"] = None
        return facts
    plug = _conf_value(text, "PlugStackConfig") or os.path.join(os.path.dirname(conf),
                                                               "plugstack.conf")
    facts["plugstack"] = plug
    facts["lines"], facts["plugstack_files"] = _plugstack_lines(plug)
    facts["oci_conf"] = os.path.join(os.path.dirname(conf), "oci.conf")
    return facts


def check_slurm(facts):
    out = []
    if not facts["srun"] and not facts["slurm_conf"]:
        return [Check("slurm.plugin", "Slurm plugin", "off", "no Slurm on this host (no srun, "
                      f"no {_slurm_conf()})")]
    if not facts["slurm_conf"]:
        what = "is not readable" if os.path.exists(_slurm_conf()) else "does not exist"
        return [Check("slurm.plugin", "Slurm plugin", "skip",
                      f"srun is installed but {_slurm_conf()} {what} (configless Slurm, or "
                      "set SLURM_CONF): the plugin was not checked")]
    lines = facts["lines"]
    if not lines:
        out.append(Check("slurm.plugstack", "Slurm plugstack line", "off",
                         f"{facts['plugstack']} does not load spank_hpcc.so: "
                         "srun --container-image is not set up on this host",
                         "add `required /usr/lib/hpcc/spank_hpcc.so python=/opt/hpcc/venv/bin/"
                         "python3` to it on every node (docs/slurm.md)",
                         plugstack=facts["plugstack"], files=facts["plugstack_files"]))
    else:
        problems = []
        for ln in lines:
            if not os.path.isfile(ln["plugin"]):
                problems.append(f"{ln['plugin']} (in {ln['file']}) does not exist")
            args = dict(a.split("=", 1) for a in ln["args"] if "=" in a)
            py = args.get("python", "/opt/hpcc/venv/bin/python3")
            if not os.access(py, os.X_OK):
                problems.append(f"python={py} is not an executable")
            cfg = args.get("config")
            if cfg and not os.path.isfile(cfg):
                problems.append(f"config={cfg} does not exist")
        if len(lines) > 1:
            problems.append(f"spank_hpcc.so is loaded {len(lines)} times")
        st = "fail" if problems else "ok"
        out.append(Check("slurm.plugstack", "Slurm plugstack line", st,
                         "; ".join(problems) if problems else
                         f"{lines[0]['file']}: {lines[0]['line']}",
                         "fix the line in plugstack.conf (docs/slurm.md)" if problems else None,
                         plugstack=facts["plugstack"], lines=lines))
        if facts["srun"]:
            env = dict(os.environ, SLURM_CONF=_slurm_conf())
            try:
                p = subprocess.run([facts["srun"], "--help"], capture_output=True, text=True,
                                   env=env, timeout=30, check=False)
                text = p.stdout + p.stderr
            except (OSError, subprocess.SubprocessError) as e:
                text = f"srun --help failed: {e}"
            if "--container-image" in text and "[hpcc]" in text:
                out.append(Check("slurm.plugin", "Slurm plugin", "ok",
                                 "srun --help shows hpcc's --container-* options"))
            else:
                tail = " ".join(line.strip() for line in text.splitlines()
                                if "spank" in line.lower() or "error" in line.lower())[:300]
                out.append(Check("slurm.plugin", "Slurm plugin", "fail",
                                 "srun --help does not show hpcc's options: Slurm did not "
                                 "load spank_hpcc.so" + (f" ({tail})" if tail else ""),
                                 "check the plugstack line and that the .so was built for "
                                 "this Slurm (make -C spank)", srun_messages=tail))
    oci = facts.get("oci_conf")
    if oci and os.path.exists(oci):
        out.append(Check("slurm.oci_conf", "Slurm oci.conf", "warn" if lines else "off",
                         f"{oci} exists: Slurm handles --container=X itself (its OCI "
                         "bundles), so users must write --container-image=X for hpcc",
                         f"remove {oci} if --container should mean hpcc images "
                         "(docs/slurm.md)", path=oci))
    elif oci:
        out.append(Check("slurm.oci_conf", "Slurm oci.conf", "ok", "no oci.conf: "
                         "--container=IMAGE reaches hpcc", path=oci))
    return out
