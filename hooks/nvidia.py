"""The NVIDIA GPU hook: the host driver's user-space files and the selected GPUs' devices.

No libnvidia-container: everything is found from files.
- Driver libraries: libcuda.so.1 is looked up in gpu.library_paths, the host's ld cache and
  the default directories; its real name gives the driver version (libcuda.so.535.104.05),
  and every `lib*.so.<that version>` beside it (and in gpu.library_paths) is the driver's
  user-space set, so libraries added by newer drivers are found without a list to maintain.
  NVIDIA_DRIVER_CAPABILITIES (default compute,utility) leaves out the libraries of families
  not asked for (graphics, video, ...); libraries of no known family are always injected.
- Binaries: nvidia-smi, nvidia-debugdump, nvidia-persistenced, nvidia-cuda-mps-*.
- Devices: /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools, /dev/nvidia-modeset and
  /dev/nvidiaN of the selected GPUs only; the other GPUs' /proc/driver/nvidia/gpus/<bus>
  entries in the container's /proc are masked; nvidia-persistenced's socket when present.
- GPU selection: annotation org.hpcc.gpu (`hpcc run --gpus all|0,1|GPU-uuid`), narrowed by
  the container's NVIDIA_VISIBLE_DEVICES and by Slurm's allocation (SLURM_STEP_GPUS /
  SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES inside a Slurm job), limited by gpu.allowed_devices.
- NVIDIA_REQUIRE_* of the image (space = or, comma = and; cuda, driver, arch, brand) is
  checked against the driver; NVIDIA_DISABLE_REQUIRE=1 skips the check.
"""
import ctypes
import os
import re
import stat

from hpcc.errors import HookError

from .elf import ElfInfo
from .libraries import ContainerLibraries, HostLibraries
from .plan import Plan, place_library

BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                   "/dev/nvidia-modeset")
# Library families by NVIDIA_DRIVER_CAPABILITIES (as the CUDA images use it). A library of a
# family the container did not ask for is left out; one in no family (new in some driver
# release) is always injected, so discovery never silently drops what a driver adds.
CAPABILITY_LIBS = {
    "compute": ("libcuda.", "libcudadebugger.", "libnvidia-ptxjitcompiler.", "libnvidia-nvvm.",
                "libnvidia-opencl.", "libnvidia-gpucomp.", "libnvidia-fatbinaryloader.",
                "libnvidia-compiler.", "libnvidia-pkcs11"),
    "utility": ("libnvidia-ml.", "libnvidia-cfg."),
    "video": ("libvdpau_nvidia.", "libnvidia-encode.", "libnvcuvid.", "libnvidia-opticalflow."),
    "graphics": ("libnvidia-eglcore.", "libnvidia-glcore.", "libnvidia-tls.", "libnvidia-glsi.",
                 "libnvidia-rtcore.", "libnvoptix.", "libGLX_nvidia.", "libEGL_nvidia.",
                 "libGLESv2_nvidia.", "libGLESv1_CM_nvidia.", "libnvidia-glvkspirv.",
                 "libnvidia-vulkan-producer.", "libnvidia-allocator.", "libnvidia-egl-gbm."),
    "display": ("libnvidia-fbc.", "libnvidia-ifr."),
    "ngx": ("libnvidia-ngx.",),
}
DEFAULT_CAPABILITIES = ("compute", "utility")


def capabilities(cenv):
    value = cenv.get("NVIDIA_DRIVER_CAPABILITIES", "").strip()
    if not value:
        return set(DEFAULT_CAPABILITIES)
    caps = {c.strip() for c in value.split(",") if c.strip()}
    if "all" in caps:
        return set(CAPABILITY_LIBS)
    return caps


def wanted_library(realname, caps):
    for cap, prefixes in CAPABILITY_LIBS.items():
        if realname.startswith(prefixes):
            return cap in caps
    return True


PERSISTENCED = ("/run/nvidia-persistenced/socket",)
BIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin")


class Gpu:
    def __init__(self, index, minor, uuid=None, bus=None, model=None):
        self.index, self.minor, self.uuid, self.bus, self.model = index, minor, uuid, bus, model

    def device(self):
        return f"/dev/nvidia{self.minor}"

    def __repr__(self):
        return f"Gpu({self.index}, minor={self.minor}, uuid={self.uuid})"


def _p(sysroot, path):
    return path if sysroot == "/" else os.path.join(sysroot, path.lstrip("/"))


def host_gpus(sysroot="/"):
    """GPUs in NVML/nvidia-smi order (PCI bus order) with their device minors and UUIDs."""
    base = _p(sysroot, "/proc/driver/nvidia/gpus")
    gpus = []
    try:
        buses = sorted(os.listdir(base))
    except OSError:
        buses = []
    for bus in buses:
        info = {}
        try:
            with open(os.path.join(base, bus, "information")) as f:
                for line in f:
                    k, sep, v = line.partition(":")
                    if sep:
                        info[k.strip()] = v.strip()
        except OSError:
            continue
        try:
            minor = int(info.get("Device Minor", ""))
        except ValueError:
            continue
        gpus.append(Gpu(len(gpus), minor, info.get("GPU UUID"), info.get("Bus Location", bus),
                        info.get("Model")))
    if gpus:
        return gpus
    # No procfs information: number the device nodes.
    try:
        minors = sorted(int(m.group(1)) for n in os.listdir(_p(sysroot, "/dev"))
                        if (m := re.fullmatch(r"nvidia(\d+)", n)))
    except OSError:
        minors = []
    return [Gpu(i, m) for i, m in enumerate(minors)]


def parse_gpu_list(value):
    """'all' -> 'all'; ''/'void' -> 'void'; 'none' -> []; '0,1,GPU-..' -> ['0', '1', 'GPU-..']."""
    v = (value or "").strip()
    if v.lower() == "all":
        return "all"
    if v == "" or v.lower() == "void":
        return "void"
    if v.lower() == "none":
        return []
    items = [x.strip() for x in v.split(",") if x.strip()]
    for x in items:
        if not (x.isdigit() or x.startswith(("GPU-", "MIG-"))):
            raise HookError(f"bad GPU selection {value!r}: use all, none, or a comma-separated "
                            "list of GPU indexes (0,1) or UUIDs (GPU-...)")
    return items


def _lookup(gpus, ident, source):
    for g in gpus:
        if (ident.isdigit() and g.index == int(ident)) or (g.uuid and g.uuid == ident):
            return g
    have = ", ".join(str(g.index) for g in gpus) or "none"
    raise HookError(f"GPU {ident} ({source}) does not exist on this node (GPUs: {have})")


def select_gpus(annotation, cenv, henv, gpus, allowed=()):
    """The GPUs to give the container, or raise HookError saying why not.

    annotation: value of org.hpcc.gpu (None when absent); cenv: container env; henv: the
    hook's own env (a runtime started from a Slurm step has the step's variables there).
    """
    if annotation is not None:
        sel, source = parse_gpu_list(annotation), "--gpus"
    elif "NVIDIA_VISIBLE_DEVICES" in cenv:
        sel, source = parse_gpu_list(cenv["NVIDIA_VISIBLE_DEVICES"]), "NVIDIA_VISIBLE_DEVICES"
    else:
        return "void"
    if sel == "all" and annotation is not None and "NVIDIA_VISIBLE_DEVICES" in cenv:
        narrowed = parse_gpu_list(cenv["NVIDIA_VISIBLE_DEVICES"])
        if narrowed != "void":
            sel, source = narrowed, "NVIDIA_VISIBLE_DEVICES"
    if sel == "void":
        return "void"
    slurm = None
    for env in (cenv, henv):
        for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            if env.get(key):
                slurm = (key, env[key])
                break
        if slurm:
            break
    if slurm is None:
        for env in (cenv, henv):
            if env.get("SLURM_JOB_ID") and env.get("CUDA_VISIBLE_DEVICES"):
                slurm = ("CUDA_VISIBLE_DEVICES", env["CUDA_VISIBLE_DEVICES"])
                break
    if slurm:
        ids = parse_gpu_list(slurm[1])
        if ids == "all":
            granted = list(gpus)
        elif ids == "void":
            granted = []
        else:
            granted = [_lookup(gpus, x, slurm[0]) for x in ids]
        if sel == "all":
            chosen = granted
        else:
            chosen = [_lookup(gpus, x, source) for x in sel]
            for g in chosen:
                if g not in granted:
                    raise HookError(f"GPU {g.index} ({source}) is not allocated to this Slurm job "
                                    f"({slurm[0]}={slurm[1]}); request it from Slurm "
                                    "(--gres/--gpus)")
    else:
        chosen = list(gpus) if sel == "all" else [_lookup(gpus, x, source) for x in sel]
    if allowed:
        ok = set(allowed)
        for g in chosen:
            if str(g.index) not in ok and (g.uuid not in ok):
                raise HookError(f"GPU {g.index} is not in gpu.allowed_devices of the site config; "
                                "ask the admins or choose another with --gpus")
    out, seen = [], set()
    for g in chosen:
        if g.minor not in seen:
            seen.add(g.minor)
            out.append(g)
    return out


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, version, libcuda, libraries, binaries, cuda):
        self.version = version        # "535.104.05"
        self.libcuda = libcuda        # host path
        self.libraries = libraries    # [(host path, soname, realname)]
        self.binaries = binaries      # [host path]
        self.cuda = cuda              # (12, 2) or None


def find_driver(config, sysroot="/"):
    paths = [_p(sysroot, d) for d in ((config.get("gpu") or {}).get("library_paths") or [])]
    hostlibs = HostLibraries(extra_dirs=paths, sysroot=sysroot)
    libcuda = hostlibs.find("libcuda.so.1")
    if libcuda is None:
        return None
    real = os.path.realpath(libcuda)
    name = os.path.basename(real)
    m = re.fullmatch(r"libcuda\.so\.(\d+(?:\.\d+)+)", name)
    version = m.group(1) if m else _proc_driver_version(sysroot)
    libraries = []
    if version:
        dirs = [os.path.dirname(real)] + [d for d in paths if d != os.path.dirname(real)]
        suffix = ".so." + version
        seen = set()
        for d in dirs:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for n in names:
                p = os.path.join(d, n)
                if not n.endswith(suffix) or not n.startswith("lib") or os.path.islink(p) \
                        or not os.path.isfile(p) or n in seen:
                    continue
                seen.add(n)
                try:
                    soname = ElfInfo.from_path(p).soname or n
                except HookError:
                    continue
                libraries.append((p, soname, n))
    else:
        libraries.append((libcuda, "libcuda.so.1", name))
    binaries = []
    for b in BINARIES:
        for d in BIN_DIRS:
            p = _p(sysroot, os.path.join(d, b))
            if os.path.isfile(p):
                binaries.append(p)
                break
    return Driver(version, libcuda, libraries, binaries, cuda_version(libcuda))


def _proc_driver_version(sysroot):
    for path in ("/proc/driver/nvidia/version", "/sys/module/nvidia/version"):
        try:
            with open(_p(sysroot, path)) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text.split("Kernel Module")[-1])
        if m:
            return m.group(1)
    return None


def cuda_version(libcuda):
    """(major, minor) from the driver's cuDriverGetVersion (needs no GPU, no cuInit)."""
    try:
        lib = ctypes.CDLL(libcuda)
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
        return v.value // 1000, (v.value % 1000) // 10
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------
# NVIDIA_REQUIRE_*
# ------------------------------------------------------------------------------------------

_COND = re.compile(r"^(cuda|driver|arch|brand)\s*(>=|<=|==|!=|=|>|<)\s*(\S+)$")


def _vt(s):
    return tuple(int(x) for x in re.findall(r"\d+", s))


def _cond_ok(cond, facts):
    m = _COND.match(cond.strip())
    if not m:
        raise HookError(f"bad NVIDIA_REQUIRE constraint {cond!r} in the image")
    key, op, val = m.groups()
    have = facts.get(key)
    if have is None:
        return False
    if key == "brand":
        a, b = str(have).lower(), val.lower()
        return a == b if op in ("=", "==") else a != b if op == "!=" else False
    a, b = _vt(str(have)), _vt(val)
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b, "=": a == b, "==": a == b,
            "!=": a != b}[op]


def requirement_met(expr, facts):
    """Space-separated alternatives (or) of comma-separated constraints (and)."""
    alts = expr.split()
    if not alts:
        return True
    return any(all(_cond_ok(c, facts) for c in alt.split(",") if c) for alt in alts)


def check_requirements(cenv, driver, gpus=()):
    if cenv.get("NVIDIA_DISABLE_REQUIRE", "").lower() in ("1", "true", "yes"):
        return
    cuda = f"{driver.cuda[0]}.{driver.cuda[1]}" if driver.cuda else None
    facts = {"cuda": cuda, "driver": driver.version, "brand": None, "arch": None}
    for key in sorted(k for k in cenv if k.startswith("NVIDIA_REQUIRE_")):
        expr = cenv[key]
        if requirement_met(expr, facts):
            continue
        m = re.search(r"(?:^|\s)cuda>=(\S+?)(?:\s|,|$)", expr)
        if m and cuda is None:
            raise HookError(f"the image requires CUDA >= {m.group(1)} ({key}) but the driver's "
                            f"CUDA version could not be read from {driver.libcuda}; set "
                            "NVIDIA_DISABLE_REQUIRE=1 to start it anyway")
        if m:
            raise HookError(f"the image requires CUDA >= {m.group(1)} ({key}={expr}) but the "
                            f"host's driver {driver.version} supports CUDA {cuda} at most; use an "
                            f"image built for CUDA {cuda} or older, or ask the admins for a newer "
                            "driver")
        raise HookError(f"the image's {key}={expr} is not met by this host (driver "
                        f"{driver.version}, CUDA {cuda}); use a matching image or set "
                        "NVIDIA_DISABLE_REQUIRE=1")


# ------------------------------------------------------------------------------------------
# The hook
# ------------------------------------------------------------------------------------------


def plan_nvidia(container, root, config, *, sysroot="/", henv=None):
    henv = dict(os.environ) if henv is None else henv
    plan = Plan()
    gcfg = config.get("gpu") or {}
    annotation = container.annotations.get("org.hpcc.gpu")
    gpus = host_gpus(sysroot)
    sel = select_gpus(annotation, container.env, henv, gpus, gcfg.get("allowed_devices") or ())
    if sel == "void":
        plan.note("no GPU requested (no org.hpcc.gpu annotation, NVIDIA_VISIBLE_DEVICES unset or "
                  "void)")
        return plan
    driver = find_driver(config, sysroot)
    ctl = _p(sysroot, "/dev/nvidiactl")
    if driver is None or not os.path.exists(ctl):
        missing = ("libcuda.so.1 (ld cache, gpu.library_paths)" if driver is None
                   else "/dev/nvidiactl")
        raise HookError(f"GPUs requested but this node has no NVIDIA driver: {missing} not found; "
                        "run without --gpus, or on a GPU node")
    if annotation is not None and annotation.strip().lower() != "none" and not sel:
        raise HookError("GPUs requested but this node has none")
    check_requirements(container.env, driver, sel)

    clibs = ContainerLibraries(root, container.env)
    caps = capabilities(container.env)
    skipped, placed = [], set()
    for path, soname, realname in driver.libraries:
        if not wanted_library(realname, caps):
            skipped.append(soname)
            continue
        place_library(plan, clibs, path, soname, "NVIDIA driver library", realname=realname)
        placed.add(soname)
    if skipped:
        plan.note(f"not asked for by NVIDIA_DRIVER_CAPABILITIES={','.join(sorted(caps))}: "
                  + ", ".join(sorted(skipped)))
    if clibs.libdir and "libcuda.so.1" in placed and clibs.find("libcuda.so") is None:
        plan.symlink("libcuda.so.1", f"{clibs.libdir}/libcuda.so",
                     why="development name of libcuda")
    for b in driver.binaries:
        plan.bind(b, f"/usr/bin/{os.path.basename(b)}", why="NVIDIA driver tool")
    for d in CONTROL_DEVICES:
        if os.path.exists(_p(sysroot, d)):
            plan.bind(_p(sysroot, d), d, device=True, why="NVIDIA control device")
    for g in sel:
        plan.bind(_p(sysroot, g.device()), g.device(), device=True,
                  why=f"GPU {g.index}" + (f" {g.uuid}" if g.uuid else ""))
    # The container's /proc (when already mounted) lists every GPU of the node; the others
    # are hidden so that nvidia-smi and NVML see only what was given.
    chosen = {g.minor for g in sel}
    for g in gpus:
        if g.minor not in chosen and g.bus:
            d = f"/proc/driver/nvidia/gpus/{g.bus}"
            st = root.stat(d)
            if st is not None and stat.S_ISDIR(st.st_mode):
                plan.mask(d, why=f"GPU {g.index} not selected")
    for sock in PERSISTENCED:
        if os.path.exists(_p(sysroot, sock)):
            plan.bind(_p(sysroot, sock), sock, why="nvidia-persistenced socket")
    cuda = f"{driver.cuda[0]}.{driver.cuda[1]}" if driver.cuda else "unknown"
    gpu_list = ",".join(str(g.index) for g in sel) or "none"
    plan.note(f"driver {driver.version}, CUDA {cuda}; GPUs {gpu_list}")
    return plan


def run(container, root, config, *, dry_run=False):
    plan = plan_nvidia(container, root, config)
    if not dry_run:
        plan.apply(root)
    return plan
