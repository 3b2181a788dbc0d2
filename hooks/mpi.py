"""The MPI hook: replace the container's MPICH-ABI MPI with the host's.

MPICH, Intel MPI, Cray MPICH and MVAPICH share one ABI (soname major 12). The initiative's
name is libmpi.so.12 (+ libmpicxx.so.12, libmpifort.so.12); Debian's MPICH ships the same ABI
as libmpich.so.12 (+ libmpichcxx.so.12, libmpichfort.so.12). Programs record either name, so
both are served. Open MPI (libmpi.so.40, .20, .1) is a different ABI and is refused.

What gets injected:
- the host's MPI library of each family the container uses (C always; C++/Fortran when the
  container has them), bound over the container's own copies, and the other ABI name
  pointing at it;
- the host library's dependency closure (ELF DT_NEEDED, resolved like the host's linker),
  minus glibc (the container's glibc must be new enough: checked) and minus every library the
  container already has in a compatible version: one that defines every symbol and symbol
  version the host's libraries take from it;
- the run-time loaded modules `ldd` does not show (UCX transports in <libdir>/ucx, libfabric
  providers, libibverbs providers) with their own dependencies, when their owner library is
  injected;
- `mpi.extra_files` (same path inside) and `mpi.devices` from hpcc.toml;
- in an unprivileged (user-namespace) launch with UCX, /etc/ucx/ucx.conf gets
  UCX_POSIX_USE_PROC_LINK=n and UCX_TLS=^cma: ranks in sibling user namespaces can neither
  open each other's /proc/PID/fd nor process_vm_readv each other.
"""
import os
import re
import stat

from hpcc.errors import HookError

from .elf import ElfInfo, elf_header, is_glibc
from .libraries import ContainerLibraries, HostLibraries
from .plan import Plan, place_library, version_tuple

# (ABI initiative name, Debian's name) per language binding.
FAMILIES = {
    "c": ("libmpi.so.12", "libmpich.so.12"),
    "cxx": ("libmpicxx.so.12", "libmpichcxx.so.12"),
    "fort": ("libmpifort.so.12", "libmpichfort.so.12"),
}
ABI_SONAMES = {name: fam for fam, names in FAMILIES.items() for name in names}

# Libraries that load modules at run time from a directory next to themselves
# (UCX, libfabric) or from a directory fixed at build time (libibverbs: same path inside).
PLUGIN_DIRS = {
    "libucs.so.0": ("ucx",),
    "libfabric.so.1": ("libfabric",),
    "libibverbs.so.1": ("libibverbs",),
}
PLUGIN_CONFIG = {"libibverbs.so.1": ("/etc/libibverbs.d",), "librdmacm.so.1": ("/etc/rdma",)}


UCX_CONF = "/etc/ucx/ucx.conf"


def in_user_namespace():
    """True when this process is not in the initial user namespace (unprivileged launch)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


class HostLib:
    def __init__(self, soname, path, elf, plugin_dir=None):
        self.soname = soname
        self.path = path
        self.real = os.path.realpath(path)
        self.elf = elf
        self.plugin_dir = plugin_dir   # set for modules found in a plugin directory


def host_mpi_libraries(config, hostlibs):
    """{family: HostLib} of the host's MPICH-ABI libraries (config mpi.libraries or the ld
    cache)."""
    out = {}
    configured = (config.get("mpi") or {}).get("libraries") or []
    if configured:
        for path in configured:
            if not os.path.isfile(path):
                raise HookError(f"mpi.libraries in hpcc.toml names {path}, which does not exist on "
                                "this node; fix the site config")
            elf = ElfInfo.from_path(path)
            soname = elf.soname or os.path.basename(path)
            fam = ABI_SONAMES.get(soname)
            if fam is None:
                raise HookError(f"mpi.libraries: {path} has soname {soname}, which is not an "
                                "MPICH-ABI library (libmpi.so.12, libmpich.so.12 and their "
                                "C++/Fortran siblings)")
            out.setdefault(fam, HostLib(soname, path, elf))
    else:
        for fam, names in FAMILIES.items():
            for name in names:
                p = hostlibs.find(name)
                if p:
                    out[fam] = HostLib(name, p, ElfInfo.from_path(p))
                    break
    if "c" not in out:
        raise HookError("--mpi requested but this host has no MPICH-ABI MPI library (libmpi.so.12 "
                        "or libmpich.so.12 in the ld cache); install one or set mpi.libraries in "
                        "hpcc.toml")
    return out


def detect_container_mpi(clibs):
    """(found, other): found = {soname: container path} of MPICH-ABI libraries;
    other = (description, soname, path) of an incompatible MPI, or None."""
    found = {}
    for names in FAMILIES.values():
        for name in names:
            p = clibs.find(name)
            if p:
                found[name] = p
    other = None
    for name in sorted(clibs.sonames_with_prefix("libmpi.so.")):
        if re.fullmatch(r"libmpi\.so\.\d+", name) and name != "libmpi.so.12":
            p = clibs.find(name)
            if p is None:
                continue
            openmpi = name in ("libmpi.so.40", "libmpi.so.20", "libmpi.so.1") or bool(
                clibs.sonames_with_prefix("libopen-pal.so."))
            other = ("Open MPI" if openmpi else "an MPI with a non-MPICH ABI", name, p)
            break
    return found, other


def check_abi_versions(host, container_real, container_soname):
    """Refuse when the container's MPI is a newer ABI revision than the host's."""
    hv = version_tuple(os.path.basename(host.real), host.soname)
    cv = version_tuple(os.path.basename(container_real), container_soname)
    if not hv or not cv or len(hv) < 2 or len(cv) < 2:
        return None  # unversioned file names: the soname major (12) is all we can check
    if cv[0] != hv[0]:
        raise HookError(f"--mpi: the container's MPI ABI {cv[0]} differs from the host's {hv[0]}")
    if cv[1] > hv[1]:
        raise HookError(
            f"--mpi: the container's MPI ({os.path.basename(container_real)}, ABI {cv[0]}.{cv[1]}) "
            f"is newer than the host's ({os.path.basename(host.real)}, ABI {hv[0]}.{hv[1]}); "
            "programs built against it may call functions the host's MPI lacks: use an image "
            "built with an MPICH-ABI MPI no newer than the host's, or run without --mpi to use "
            "the container's own MPI")
    if cv != hv:
        return (f"container MPI {'.'.join(map(str, cv))} replaced by host MPI "
                f"{'.'.join(map(str, hv))}")
    return None


def program_path(container, root):
    """Container path of the command (process.args[0], looked up in the container's PATH)."""
    args = (container.config.get("process") or {}).get("args") or []
    if not args or not isinstance(args[0], str) or not args[0]:
        return None
    a0 = args[0]
    if a0.startswith("/"):
        return a0
    if "/" in a0:
        cwd = (container.config.get("process") or {}).get("cwd") or "/"
        return os.path.join(cwd, a0)
    path = container.env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for d in path.split(":"):
        if d.startswith("/"):
            st = root.stat(f"{d.rstrip('/')}/{a0}")
            if st is not None and stat.S_ISREG(st.st_mode):
                return f"{d.rstrip('/')}/{a0}"
    return None


MPI_PREFIXES = ("MPI_", "PMPI_", "MPIX_", "mpi_", "pmpi_")


def check_program_symbols(container, root, clibs, host):
    """Refuse when the command is linked against the MPICH ABI and calls MPI functions the
    host's MPI does not have (a program built against a newer MPI than the host's)."""
    p = program_path(container, root)
    if p is None:
        return
    try:
        elf = clibs.elf(p)
    except HookError:
        return          # a script or something else: nothing to read
    if elf is None or not any(n in ABI_SONAMES for n in elf.needed):
        return
    have = set()
    for h in host.values():
        have |= h.elf.symbols()[0]
    missing = sorted(s for s in elf.symbols()[1] if s.startswith(MPI_PREFIXES) and s not in have)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise HookError(
            f"--mpi: {p} calls {len(missing)} MPI function(s) that the host's MPI "
            f"({os.path.basename(host['c'].real)}) lacks ({shown}): the host's MPI is older than "
            "the program needs; run without --mpi to use the container's own MPI, or build the "
            "program against an MPI no newer than the host's")


def _glibc_version(verdefs):
    best = None
    for v in verdefs:
        m = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?", v)
        if m:
            t = tuple(int(x or 0) for x in m.groups())
            best = max(best, t) if best else t
    return best


def check_glibc(clibs, needs):
    """needs: {glibc soname: {versions}} required by the injected host libraries."""
    for soname, versions in sorted(needs.items()):
        p = clibs.find(soname)
        if p is None:
            if soname.startswith("ld-"):
                continue  # the interpreter is not always in the cache; libc's check covers it
            raise HookError(f"--mpi: the host's MPI needs {soname}, which the container lacks; use "
                            "an image with a full glibc")
        elf = clibs.elf(p)
        missing = sorted(v for v in versions if v not in elf.verdef)
        if missing:
            need = _glibc_version(missing)
            have = _glibc_version(elf.verdef)
            need_s = ".".join(map(str, need[:2])) if need else missing[-1]
            have_s = ".".join(map(str, have[:2])) if have else "unknown"
            raise HookError(f"--mpi: the host's MPI needs glibc {need_s} ({', '.join(missing)} "
                            f"from {soname}) but the container has glibc {have_s}; use an image "
                            f"with glibc >= {need_s}, or run without --mpi")


def _plugin_modules(owner, hostlibs):
    """Modules in the plugin directories of `owner` (a HostLib), as HostLibs."""
    out = []
    for sub in PLUGIN_DIRS.get(owner.soname, ()):
        d = os.path.join(os.path.dirname(owner.real), sub)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if ".so" not in name or os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as f:
                    if elf_header(f.read(20)) is None:
                        continue
            except OSError:
                continue
            elf = ElfInfo.from_path(p)
            out.append(HostLib(elf.soname or name, p, elf, plugin_dir=d))
    return out


def plan_mpi(container, root, config, *, hostlibs=None):
    """Compute everything the MPI hook does; raise HookError to refuse."""
    hostlibs = hostlibs or HostLibraries()
    clibs = ContainerLibraries(root, container.env)
    plan = Plan()
    if clibs.musl():
        raise HookError("--mpi: the container uses musl libc; the host's MPI is built for glibc. "
                        "Use a glibc-based image, or run without --mpi")
    host = host_mpi_libraries(config, hostlibs)
    found, other = detect_container_mpi(clibs)
    if other and not any(ABI_SONAMES[n] == "c" for n in found):
        desc, soname, path = other
        raise HookError(
            f"--mpi requested but the container has {desc} ({soname} at {path}), which is not "
            f"compatible with the host's MPICH-ABI MPI ({host['c'].soname}); run without --mpi to "
            "use the container's own MPI, or use an image built with MPICH, Intel MPI, Cray MPICH "
            "or MVAPICH")
    if not clibs.libdir:
        raise HookError("--mpi: the container has no glibc (libc.so.6), so it cannot load the "
                        "host's MPI; use an image with a glibc-based distribution")
    if not found:
        plan.note("the container has no MPI library; the host's is added under both MPICH-ABI "
                  "names")

    # Which families to serve: C always, C++/Fortran when the container has them.
    fams = ["c"] + [f for f in ("cxx", "fort")
                    if f in host and any(n in found for n in FAMILIES[f])]
    for fam in ("cxx", "fort"):
        if fam not in host and any(n in found for n in FAMILIES[fam]):
            plan.note(f"the container has {fam} MPI bindings but the host has none; the "
                      "container's stay")

    abi_check = (config.get("mpi") or {}).get("abi_check", "minor")
    for fam in fams:
        for name in FAMILIES[fam]:
            if name in found:
                real = root.realpath(found[name]) or found[name]
                if abi_check == "minor":
                    msg = check_abi_versions(host[fam], real, name)
                    if msg:
                        plan.note(msg)
    check_program_symbols(container, root, clibs, host)

    roots = [host[f] for f in fams]
    members, glibc_needs = _closure(roots, hostlibs, clibs, plan)
    check_glibc(clibs, glibc_needs)

    # The MPI libraries themselves: bound over the container's copies, served under both names.
    for fam in fams:
        h = host[fam]
        names = FAMILIES[fam]
        served = [n for n in names if n in found]
        placed = None
        for name in served:
            placed = place_library(plan, clibs, h.path, name, f"host MPI ({h.soname})")
        if placed is None:
            placed = place_library(plan, clibs, h.path, h.soname, f"host MPI ({h.soname})",
                                   realname=os.path.basename(h.real))
            served = [h.soname]
        for name in names:
            if name not in served:
                plan.symlink(placed, f"{clibs.libdir}/{name}", why=f"MPICH-ABI name for {h.soname}")

    for lib in members:
        if lib.plugin_dir:
            continue
        place_library(plan, clibs, lib.path, lib.soname,
                      f"dependency of the host MPI ({lib.soname})",
                      realname=os.path.basename(lib.real))
        for sub in PLUGIN_DIRS.get(lib.soname, ()):
            d = os.path.join(os.path.dirname(lib.real), sub)
            if os.path.isdir(d):
                inside = f"{clibs.libdir}/{sub}"
                existing = clibs.find(lib.soname)
                if existing:
                    inside = os.path.join(os.path.dirname(root.realpath(existing)), sub)
                plan.bind(d, inside, why=f"run-time modules of {lib.soname}")
                if d != inside:
                    plan.bind(d, d, why=f"run-time modules of {lib.soname} (build-time path)")
        for cfg in PLUGIN_CONFIG.get(lib.soname, ()):
            if os.path.isdir(cfg):
                plan.bind(cfg, cfg, why=f"configuration of {lib.soname}")

    ucx = clibs.find("libucs.so.0") or any(lib.soname == "libucs.so.0" for lib in members)
    if ucx and in_user_namespace():
        # Ranks started as separate unprivileged containers live in sibling user namespaces,
        # where the kernel refuses one rank ptrace-class access to another: UCX's shared
        # memory transport cannot open a peer's /proc/PID/fd/N (MPI_Init fails with "Shared
        # memory error") and CMA's process_vm_readv gets EPERM (large messages abort).
        # Named segments in the shared /dev/shm work. UCX reads /etc/ucx/ucx.conf; the
        # user's environment still wins.
        old = root.read(UCX_CONF) or b""
        add = [line for key, line in (("UCX_POSIX_USE_PROC_LINK", "UCX_POSIX_USE_PROC_LINK=n"),
                                      ("UCX_TLS", "UCX_TLS=^cma"))
               if key.encode() not in old]
        if add:
            text = old.decode("utf-8", "replace")
            if text and not text.endswith("\n"):
                text += "\n"
            plan.write(UCX_CONF, text + "# added by hpcc-hook mpi (unprivileged container)\n"
                       + "".join(a + "\n" for a in add),
                       why="UCX shared memory across user namespaces")

    mpi_cfg = config.get("mpi") or {}
    for path in mpi_cfg.get("extra_files") or []:
        if not os.path.exists(path):
            raise HookError(f"mpi.extra_files in hpcc.toml names {path}, which does not exist on "
                            "this node; fix the site config")
        plan.bind(path, path, why="mpi.extra_files")
    for dev in mpi_cfg.get("devices") or []:
        if not os.path.exists(dev):
            plan.note(f"mpi.devices: {dev} does not exist on this node, skipped")
            continue
        plan.bind(dev, dev, device=True, why="mpi.devices")
    return plan


def _closure(roots, hostlibs, clibs, plan):
    """Host libraries to inject besides the roots, and glibc version needs of all injected ones."""
    want = None
    with open(roots[0].path, "rb") as f:
        want = elf_header(f.read(20))
    libs = {}          # soname -> HostLib (host side, resolved lazily)
    for r in roots:
        libs[r.soname] = r

    def resolve(soname, parent):
        if soname in libs:
            return libs[soname]
        p = hostlibs.find(soname, origin=os.path.dirname(parent.real), rpath=parent.elf.rpath,
                          runpath=parent.elf.runpath, want=want)
        if p is None:
            raise HookError(f"the host's {parent.soname} needs {soname}, which is not found on "
                            "this host; the host MPI installation is incomplete")
        libs[soname] = HostLib(soname, p, ElfInfo.from_path(p))
        return libs[soname]

    injected = {id(r): r for r in roots}
    compat_cache = {}
    changed = True
    while changed:
        changed = False
        # requirements of the injected set on every non-glibc soname
        reqs = {}
        queue = list(injected.values())
        seen = set()
        while queue:
            lib = queue.pop()
            if id(lib) in seen:
                continue
            seen.add(id(lib))
            for n in lib.elf.needed:
                if is_glibc(n):
                    continue
                reqs.setdefault(n, []).append(lib)
            if lib.soname in PLUGIN_DIRS and not lib.plugin_dir:
                for m in _plugin_modules(lib, hostlibs):
                    if m.soname not in libs:
                        libs[m.soname] = m
                    if id(libs[m.soname]) not in injected:
                        injected[id(libs[m.soname])] = libs[m.soname]
                        changed = True
        for soname, users in reqs.items():
            dep = resolve(soname, users[0])
            if id(dep) in injected:
                continue
            key = (soname, tuple(sorted(id(u) for u in users)))
            if key not in compat_cache:
                compat_cache[key] = _container_compatible(clibs, dep, users)
            if not compat_cache[key]:
                injected[id(dep)] = dep
                changed = True
    members = [lib for lib in injected.values() if lib not in roots]
    members.sort(key=lambda lib: lib.soname)
    glibc_needs = {}
    for lib in injected.values():
        for soname, versions in lib.elf.verneed.items():
            if is_glibc(soname):
                glibc_needs.setdefault(soname, set()).update(versions)
    kept = sorted(s for s in {n for lib in injected.values() for n in lib.elf.needed}
                  if not is_glibc(s) and s in libs and id(libs[s]) not in injected)
    if kept:
        plan.note("container's own compatible copies kept: " + ", ".join(kept))
    return members, glibc_needs


def _container_compatible(clibs, dep, users):
    """Does the container's copy of dep.soname give everything `users` take from the host's?"""
    path = clibs.find(dep.soname)
    if path is None:
        return False
    try:
        celf = clibs.elf(path)
    except HookError:       # not an ELF file: certainly not a usable copy
        return False
    if celf is None:
        return False
    if celf.machine != dep.elf.machine or celf.elfclass != dep.elf.elfclass:
        return False
    versions = set()
    for u in users:
        versions |= u.elf.verneed.get(dep.soname, set())
    if not versions <= celf.verdef:
        return False
    host_defined, _ = dep.elf.symbols()
    needed = set()
    for u in users:
        needed |= u.elf.symbols()[1] & host_defined
    cdefined, _ = celf.symbols()
    return needed <= cdefined


def run(container, root, config, *, dry_run=False):
    plan = plan_mpi(container, root, config)
    if not dry_run:
        plan.apply(root)
    return plan
