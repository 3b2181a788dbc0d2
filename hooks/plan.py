"""Plans: what a hook does, printable before it is done (`--dry-run`), then applied to the
root; and where a host library goes so that the container's linker loads it.
"""
import json

from hpcc.errors import HookError


class Plan:
    def __init__(self):
        self.actions = []   # dicts: {"op": "bind"|"symlink"|"mkdir"|"write", ...}
        self.notes = []

    def bind(self, src, dst, *, device=False, why=""):
        if any(a["op"] == "bind" and a["dst"] == dst for a in self.actions):
            return
        self.actions.append({"op": "bind", "src": src, "dst": dst, "device": device, "why": why})

    def symlink(self, target, dst, why=""):
        self.actions.append({"op": "symlink", "target": target, "dst": dst, "why": why})

    def mask(self, dst, why=""):
        self.actions.append({"op": "mask", "dst": dst, "why": why})

    def write(self, dst, text, why=""):
        self.actions.append({"op": "write", "dst": dst, "text": text, "why": why})

    def note(self, text):
        self.notes.append(text)

    def as_json(self):
        return json.dumps({"actions": self.actions, "notes": self.notes}, indent=1)

    def apply(self, root):
        for a in self.actions:
            if a["op"] == "bind":
                root.bind(a["src"], a["dst"], device=a["device"])
            elif a["op"] == "symlink":
                root.symlink(a["target"], a["dst"], replace=True)
            elif a["op"] == "write":
                root.write_file(a["dst"], a["text"].encode())
            elif a["op"] == "mask":
                root.mask(a["dst"])

    def summary(self):
        binds = [a for a in self.actions if a["op"] == "bind"]
        return ", ".join(f"{a['dst']}" for a in binds) or "nothing"


def place_library(plan, clibs, host_path, soname, why, *, realname=None):
    """Make the container's linker load host_path for `soname`.

    If the container has its own file for the soname, the host file is bound over it (so
    RPATH/RUNPATH users get it too); otherwise it is bound onto a new file in the directory
    of the container's libc, which the linker searches after its cache.
    """
    existing = clibs.find(soname)
    if existing:
        target = clibs.root.realpath(existing) or existing
        plan.bind(host_path, target, why=why)
        return target
    if not clibs.libdir:
        raise HookError("the container has no glibc (libc.so.6), so it cannot load the host's "
                        f"{soname}; use an image with a glibc-based distribution")
    if realname and realname != soname:
        target = f"{clibs.libdir}/{realname}"
        plan.bind(host_path, target, why=why)
        plan.symlink(realname, f"{clibs.libdir}/{soname}", why="soname link")
    else:
        target = f"{clibs.libdir}/{soname}"
        plan.bind(host_path, target, why=why)
    return target


def version_tuple(realname, soname):
    """(12, 2, 2) from libmpich.so.12.2.2 given soname libmpich.so.12; None if not versioned."""
    base = soname.split(".so")[0] + ".so."
    if not realname.startswith(base):
        return None
    try:
        return tuple(int(x) for x in realname[len(base):].split("."))
    except ValueError:
        return None
