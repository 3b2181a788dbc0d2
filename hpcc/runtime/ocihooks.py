"""OCI hooks: podman/crun `hooks.d` 1.0.0 configs, matched against a spec and run per stage.

A config file (`*.json` in launcher.hooks_dir, applied in file-name order):

    {"version": "1.0.0",
     "hook": {"path": "/usr/bin/hpcc-hook", "args": ["hpcc-hook", "mpi"],
              "env": ["K=V"], "timeout": 30},
     "when": {"always": true, "annotations": {"^org\\.hpcc\\.mpi$": "^1$"},
              "commands": ["^/usr/bin/python3$"], "hasBindMounts": true},
     "stages": ["createRuntime", "prestart", "createContainer", "startContainer",
                "poststart", "poststop"]}

`when` follows podman: every property given must match (annotations: a key regex and a
value regex, searched; commands: a regex on process.args[0], any one matches). A hook runs
with exactly its own argv and env, the OCI state JSON on stdin, and a timeout (default 60 s).
A failing createRuntime/prestart/createContainer/startContainer hook aborts the launch
(HookError, exit 125) with the last line of its stderr; poststart/poststop failures are
reported as warnings. Running as root, configs and hook executables that a non-root user
could modify are refused.
"""
import os
import stat

from ..errors import HookError

STAGES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
          "poststop")
FATAL_STAGES = ("prestart", "createRuntime", "createContainer", "startContainer")
DEFAULT_TIMEOUT = 60


def _check_owner(path, what):
    """Running as root: refuse a file (or its directory) that a non-root user may modify."""
    for p in (path, os.path.dirname(path)):
        st = os.stat(p)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise HookError(f"refusing {what} {path}: {p} is writable by a non-root user",
                            hint="make it owned by root and not group/other-writable")


def load_hooks(hooks_dir, *, privileged=None, cache=None):
    """Parse every *.json in hooks_dir (sorted by name); return a list of hook configs.

    `cache` (optional, with .get(path, load)) keeps the parsed JSON keyed by the file's
    identity, so a warm launch does not import json; ownership and validity are still
    checked on every launch."""
    if privileged is None:
        privileged = os.geteuid() == 0
    try:
        names = sorted(n for n in os.listdir(hooks_dir) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise HookError(f"cannot read hooks directory {hooks_dir}: {e.strerror}") from None
    if not names:
        return []
    out = []
    for n in names:
        path = os.path.join(hooks_dir, n)
        if privileged:
            _check_owner(path, "hook config")
        cfg = cache.get(path, lambda p=path: _read_json(p)) if cache else _read_json(path)
        out.append(_validate(cfg, path, privileged))
    return out


def _read_json(path):
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HookError(f"hook config {path} is not valid JSON: {e}") from None


def _validate(cfg, path, privileged):
    def bad(why):
        return HookError(f"hook config {path}: {why}",
                         hint="see the hooks.d 1.0.0 format in docs/launcher.md")
    if not isinstance(cfg, dict) or cfg.get("version") != "1.0.0":
        raise bad("'version' must be \"1.0.0\"")
    hook = cfg.get("hook")
    if not isinstance(hook, dict) or not isinstance(hook.get("path"), str) \
            or not hook["path"].startswith("/"):
        raise bad("'hook.path' must be an absolute path")
    for key in ("args", "env"):
        if key in hook and not (isinstance(hook[key], list)
                                and all(isinstance(x, str) for x in hook[key])):
            raise bad(f"'hook.{key}' must be a list of strings")
    timeout = hook.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int) or timeout <= 0:
        raise bad("'hook.timeout' must be a positive integer (seconds)")
    when = cfg.get("when")
    if not isinstance(when, dict) or not any(
            k in when for k in ("always", "annotations", "commands", "hasBindMounts")):
        raise bad("'when' needs at least one of always, annotations, commands, hasBindMounts")
    stages = cfg.get("stages")
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise bad(f"'stages' must be a non-empty list of {', '.join(STAGES)}")
    if privileged and os.path.exists(hook["path"]):
        _check_owner(hook["path"], "hook executable")
    return {"file": path, "hook": {"path": hook["path"], "args": hook.get("args", [hook["path"]]),
                                   "env": hook.get("env", []), "timeout": timeout},
            "when": when, "stages": stages}


def matches(when, spec):
    """podman's rule: every property present must match."""
    hits = 0
    if "always" in when:
        if not when["always"]:
            return False
        hits += 1
    if "hasBindMounts" in when:
        if not (when["hasBindMounts"] and spec.get("hpcc", {}).get("has_bind_mounts")):
            return False
        hits += 1
    ann = spec.get("annotations", {})
    wanted = when.get("annotations") or {}
    for kpat in wanted:
        # "^org\\.hpcc\\.mpi$"-style keys name one annotation: decide without importing
        # re (~8 ms) when the launch does not carry it, the common case.
        lit = _literal(kpat)
        if lit is not None and lit not in ann:
            return False
    cmds = when.get("commands") or []
    if wanted or cmds:
        import re
    for kpat, vpat in wanted.items():
        if not any(re.search(kpat, k) and re.search(vpat, v) for k, v in ann.items()):
            return False
        hits += 1
    if cmds:
        args = spec.get("process", {}).get("args") or [""]
        return any(re.search(p, args[0]) for p in cmds)
    return hits > 0


_META = set(".^$*+?{}[]\\|()")


def _literal(pattern):
    """The one string an anchored regex without metacharacters matches, else None."""
    if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 3:
        return None
    inner = pattern[1:-1].replace("\\.", "\0")
    if any(c in _META for c in inner):
        return None
    return inner.replace("\0", ".")


def select_hooks(hooks, spec):
    """{stage: [OCI hook entries]} for the hooks whose `when` matches the spec."""
    out = {}
    for h in hooks:
        if matches(h["when"], spec):
            for stage in h["stages"]:
                out.setdefault(stage, []).append(dict(h["hook"]))
    return out


def state(spec, status, pid, bundle, container_id):
    return {"ociVersion": spec.get("ociVersion", "1.0.2"), "id": container_id,
            "status": status, "pid": pid, "bundle": bundle,
            "annotations": spec.get("annotations", {})}


def run_hooks(spec, stage, state_obj, *, root_fd=None, warn=None):
    """Run the hooks of one stage in order; raise HookError when a fatal-stage hook fails.

    root_fd: an fd of the directory to chroot into before exec (the host's root, for
    poststart/poststop run after pivot_root); None runs in the current root.
    """
    hooks = spec.get("hooks", {}).get(stage) or []
    if not hooks:
        return
    import json
    import subprocess

    data = json.dumps(state_obj).encode()

    def enter_root():
        if root_fd is not None:
            os.fchdir(root_fd)
            os.chroot(".")

    for h in hooks:
        args = h.get("args") or [h["path"]]
        env = dict(e.partition("=")[::2] for e in h.get("env", []))
        name = os.path.basename(h["path"])
        try:
            p = subprocess.run(args, executable=h["path"], input=data, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=h.get("timeout", DEFAULT_TIMEOUT),
                               preexec_fn=enter_root if root_fd is not None else None)
            code, err = p.returncode, p.stderr.decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            code, err = None, f"timed out after {h.get('timeout', DEFAULT_TIMEOUT)} s"
        except OSError as e:
            code, err = None, f"cannot run {h['path']}: {e.strerror}"
        if code == 0:
            continue
        last = err.splitlines()[-1] if err else "(no message)"
        how = f"exit {code}" if code is not None and code >= 0 else (
            f"signal {-code}" if code is not None else "failed")
        msg = f"{stage} hook {name} failed ({how}): {last}"
        if stage in FATAL_STAGES:
            raise HookError(msg)
        if warn:
            warn(msg)
