"""The OCI side of a hook: the container state on stdin, the bundle's config.json, and the
container's mount namespace.

- `read_state`: the OCI state on stdin plus the bundle's config.json -> `Container`.
- `enter_mount_namespace`: a hook started by crun/runc/podman runs in the runtime's
  namespace; it joins the container's mount namespace (state `pid`) before touching the root.
  Under hpcc the hook already runs there and nothing happens.
"""
import json
import os

from hpcc.errors import HookError
from hpcc.runtime import _sys


class Container:
    """What a hook knows about the container it runs for."""

    def __init__(self, state, config, bundle, root):
        self.state = state
        self.config = config
        self.bundle = bundle
        self.root = root
        self.id = state.get("id", "")
        self.pid = state.get("pid") or 0
        ann = dict(config.get("annotations") or {})
        ann.update(state.get("annotations") or {})
        self.annotations = ann
        env = {}
        for item in (config.get("process") or {}).get("env") or []:
            k, sep, v = item.partition("=")
            if sep:
                env[k] = v
        self.env = env
        # the runtime's own record of the container's writable layer (hpcc only)
        devs = (config.get("hpcc") or {}).get("writable_devs")
        self.writable_devs = [d for d in devs if isinstance(d, int)] if isinstance(devs, list) \
            else None


def read_state(stream):
    """Parse the OCI state JSON from `stream` and load `<bundle>/config.json`."""
    raw = stream.read(4 << 20)
    try:
        state = json.loads(raw or "null")
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise HookError("no OCI state on standard input: an OCI hook must be started by a "
                        "runtime (hpcc, crun, runc) that writes the container state to its stdin")
    bundle = state.get("bundle")
    if not isinstance(bundle, str) or not os.path.isabs(bundle):
        raise HookError("the OCI state has no absolute 'bundle' path")
    cfg_path = os.path.join(bundle, "config.json")
    try:
        with open(cfg_path, "rb") as f:
            config = json.loads(f.read())
    except OSError as e:
        raise HookError(f"cannot read the bundle's {cfg_path}: {e.strerror}") from None
    except ValueError:
        raise HookError(f"{cfg_path} is not valid JSON") from None
    root = ((config.get("root") or {}).get("path")) if isinstance(config, dict) else None
    if not isinstance(root, str) or not root:
        raise HookError(f"{cfg_path} has no root.path")
    root = os.path.normpath(os.path.join(bundle, root))  # OCI allows a path relative to the bundle
    return Container(state, config, bundle, root)


def enter_mount_namespace(pid):
    """Join the mount namespace of `pid` if it is not ours (hook started by crun/runc)."""
    if not pid:
        return False
    try:
        theirs = os.stat(f"/proc/{int(pid)}/ns/mnt")
        ours = os.stat("/proc/self/ns/mnt")
    except (OSError, ValueError):
        raise HookError(
            f"the container process {pid} named in the OCI state does not exist") from None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return False
    fd = os.open(f"/proc/{int(pid)}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _sys.setns(fd, _sys.CLONE_NEWNS)
    except OSError as e:
        raise HookError(f"cannot join the container's mount namespace: {e.strerror}") from None
    finally:
        os.close(fd)
    return True
