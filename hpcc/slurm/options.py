"""srun's container options as pyxis defines them, checked and put in the runtime's terms.

spank_hpcc.so hands the helper each setting as key=value, with `from_KEY` naming what the
user typed (`--container-mounts`, `PYXIS_CONTAINER_MOUNTS`...), so that every message names
it. The plugin already refused empty values and malformed lists; what needs the job's
working directory or the image is checked here.

    mounts     SRC[:DST[:FLAGS]],...   FLAGS joined by '+': ro, rw, noexec, bind, rbind,
                                       private, rprivate, slave, rslave, unbindable,
                                       runbindable; tmpfs:DST; umount:DST
    workdir    DIR                     relative: taken from the container's / (as pyxis);
                                       default: the image's WorkingDir
    save       PATH                    relative: the job's working directory's

Only `os` is imported at module level.
"""
import os

from ..errors import UsageError

# Bind flags as pyxis/enroot spell them. A bind is private unless slave (the host's later
# mounts below it show inside: the runtime clones it from the host's mount namespace) or
# unbindable; shared is refused: the container's mounts would show on the host.
PROPAGATIONS = ("slave", "rslave", "unbindable", "runbindable")
BIND_FLAGS = {"ro", "rw", "noexec", "nosuid", "nodev", "bind", "rbind", "private", "rprivate",
              *PROPAGATIONS}
REFUSED = {"shared", "rshared"}

# Keys of the settings that the runtime implements (hpcc.runtime: named containers,
# remap-root, unshare, entrypoint, save). Values as the plugin sends them.
RUNTIME_KEYS = ("name", "name_mode", "remap_root", "unshare", "entrypoint", "entrypoint_log",
                "save")

# Locale variables reach the container only when --container-env names them (pyxis).
LOCALE_VARS = ("LANG", "LANGUAGE", "LC_ALL")


def origin(args, key, default):
    """What the user typed for `key` (an option or a variable name)."""
    return args.get("from_" + key) or default


class Mounts:
    """binds: 'SRC:DST:ro|rw' strings for build_spec plus {DST: extra options};
    tmpfs: destinations; umount: destinations."""

    def __init__(self):
        self.binds, self.options, self.tmpfs, self.umount = [], {}, [], []


def parse_mounts(text, cwd, opt="--container-mounts"):
    from ..runtime.spec import clean_dest

    out = Mounts()
    for item in text.split(","):
        if not item:
            raise UsageError(f"{opt}={text}: an empty item (a stray comma)")
        parts = item.split(":")
        if parts[0] in ("tmpfs", "umount") and len(parts) == 2:
            dst = parts[1]
            if not dst.startswith("/"):
                raise UsageError(f"{opt}: '{item}': the destination must be an absolute path "
                                 "inside the container")
            (out.tmpfs if parts[0] == "tmpfs" else out.umount).append(clean_dest(dst))
            continue
        if len(parts) > 3 or not all(parts[:2]):
            raise UsageError(f"{opt}: bad entry '{item}': expected SRC[:DST[:FLAGS]], "
                             "tmpfs:DST or umount:DST")
        src = parts[0]
        dst = parts[1] if len(parts) > 1 else src
        flags = [f for f in parts[2].split("+")] if len(parts) == 3 else []
        readonly = False
        extra = []
        for f in flags:
            if f in REFUSED:
                raise UsageError(f"{opt}: '{item}': mount propagation '{f}' is refused (mounts "
                                 "made for the container would show on the host); slave "
                                 "gives the host's new mounts to the container")
            if f not in BIND_FLAGS:
                raise UsageError(f"{opt}: '{item}': unknown flag '{f}' (known: "
                                 f"{', '.join(sorted(BIND_FLAGS))}, joined by '+')")
            if f in ("ro", "rw"):
                readonly = f == "ro"
            elif f in ("noexec", "bind", *PROPAGATIONS):
                extra.append(f)
        if not dst.startswith("/"):
            raise UsageError(f"{opt}: '{item}': the destination '{dst}' must be an absolute "
                             "path inside the container")
        src = os.path.normpath(os.path.join(cwd, src))
        out.binds.append(f"{src}:{dst}:{'ro' if readonly else 'rw'}")
        if extra:
            out.options[clean_dest(dst)] = extra
    return out


def check_sources(mounts, user_ctx, opt="--container-mounts"):
    """Every bind source exists and the job user may read it (checked with their rights)."""
    with user_ctx:
        for item in mounts.binds:
            src = item.split(":")[0]
            try:
                st = os.stat(src)
            except FileNotFoundError:
                raise UsageError(f"{opt}: the source {src} does not exist") from None
            except PermissionError:
                raise UsageError(f"{opt}: you cannot read {src}") from None
            import stat as _stat
            want = os.R_OK | (os.X_OK if _stat.S_ISDIR(st.st_mode) else 0)
            if not os.access(src, want, effective_ids=True):
                raise UsageError(f"{opt}: you cannot read {src}")


def apply_mounts(spec, mounts, opt="--container-mounts"):
    """Flags beyond ro/rw, tmpfs mounts and removed mounts, on a built spec."""
    for m in spec["mounts"]:
        extra = mounts.options.get(m["destination"]) if m.get("x-hpcc-origin") == "user" else None
        if extra:
            if "bind" in extra:
                m["options"] = ["bind" if o == "rbind" else o for o in m["options"]]
            for o in ("noexec", *PROPAGATIONS):
                if o in extra and o not in m["options"]:
                    m["options"].append(o)
    for dst in mounts.umount:
        kept = [m for m in spec["mounts"] if m["destination"] != dst]
        if len(kept) == len(spec["mounts"]):
            raise UsageError(f"{opt}: umount:{dst}: nothing is mounted on {dst} in this "
                             "container")
        spec["mounts"] = kept
    for dst in mounts.tmpfs:
        spec["mounts"].append({"destination": dst, "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777"],
                               "x-hpcc-origin": "user"})
    # parents before what lies beneath them, among the user's own mounts
    user = [m for m in spec["mounts"] if m.get("x-hpcc-origin") == "user"]
    rest = [m for m in spec["mounts"] if m.get("x-hpcc-origin") != "user"]
    user.sort(key=lambda m: m["destination"].rstrip("/").count("/"))
    spec["mounts"] = rest + user


def workdir(args, meta_config):
    """The working directory inside: --container-workdir (relative: from /), else the
    image's WorkingDir, else /."""
    from ..runtime.spec import clean_dest

    w = args.get("workdir")
    if w is None:
        return clean_dest(meta_config.get("WorkingDir") or "/")
    return clean_dest(w if w.startswith("/") else "/" + w)


def save_path(args, cwd):
    p = args.get("save")
    if p is None:
        return None
    return os.path.normpath(os.path.join(cwd, p))


def check_flags(args):
    """Contradictions between settings."""
    if args.get("writable") == "1" and args.get("readonly") == "1":
        raise UsageError(f"{origin(args, 'writable', '--container-writable')} and "
                         f"{origin(args, 'readonly', '--container-readonly')} contradict each "
                         "other: give one")
