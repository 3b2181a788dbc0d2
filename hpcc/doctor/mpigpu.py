"""The MPI and NVIDIA checks, on the host and (--image) on an image as a launch would
mount it."""
import json
import os

from ..errors import HpccError
from .check import Check
from .probes import _fork_probe


class _NoLibraries:
    """A container with no libraries of its own: the MPI hook's closure then holds every
    host library it could inject."""

    @staticmethod
    def find(soname, **kw):
        return None


def check_mpi(config):
    from ..hooks.libraries import HostLibraries
    from ..hooks.mpi import _closure, _glibc_version, host_mpi_libraries
    from ..hooks.plan import Plan
    configured = bool((config.get("mpi") or {}).get("libraries"))
    hostlibs = HostLibraries()
    try:
        host = host_mpi_libraries(config, hostlibs)
        roots = list(host.values())
        members, glibc = _closure(roots, hostlibs, _NoLibraries(), Plan())
    except HpccError as e:
        return Check("mpi.host", "host MPI (MPICH ABI)", "fail" if configured else "off",
                     str(e), "set mpi.libraries in hpcc.toml to the host's libmpi.so.12"
                     if configured else "install the site's MPICH-ABI MPI (MPICH, Intel MPI, "
                     "Cray MPICH, MVAPICH) for --mpi", libraries={})
    libs = {fam: {"soname": h.soname, "path": h.path, "file": h.real}
            for fam, h in host.items()}
    deps = [{"soname": m.soname, "file": m.real} for m in members]
    need = _glibc_version({v for vs in glibc.values() for v in vs})
    need_s = ".".join(map(str, need[:2])) if need else None
    mcfg = config.get("mpi") or {}
    return Check("mpi.host", "host MPI (MPICH ABI)", "ok",
                 f"--mpi binds {host['c'].real} ({host['c'].soname})"
                 + "".join(f", {h.real}" for f, h in host.items() if f != "c")
                 + f" and up to {len(deps)} of its dependencies (those the image lacks in a "
                 "compatible version)" + (f"; images need glibc >= {need_s}" if need_s else ""),
                 libraries=libs, dependencies=deps, glibc_needed=need_s,
                 extra_files=mcfg.get("extra_files") or [], devices=mcfg.get("devices") or [])


def check_gpu(config):
    from ..hooks.nvidia import find_driver, host_gpus
    gpus = host_gpus()
    driver = find_driver(config)
    devs = sorted(f"/dev/{n}" for n in os.listdir("/dev") if n.startswith("nvidia"))
    details = {"driver": driver.version if driver else None,
               "cuda": ".".join(map(str, driver.cuda)) if driver and driver.cuda else None,
               "gpus": [{"index": g.index, "minor": g.minor, "uuid": g.uuid, "bus": g.bus,
                         "model": g.model} for g in gpus],
               "devices": devs,
               "libraries": [p for p, _, _ in driver.libraries] if driver else [],
               "binaries": driver.binaries if driver else []}
    if driver is None and not gpus and not devs:
        return Check("gpu.driver", "NVIDIA driver", "off", "no NVIDIA driver or GPU on this "
                     "host", **details)
    if driver is None:
        return Check("gpu.driver", "NVIDIA driver", "fail",
                     "NVIDIA devices exist but libcuda.so.1 is not in the ld cache",
                     "install the driver's user-space libraries, or name their directory in "
                     "gpu.library_paths", **details)
    if "/dev/nvidiactl" not in devs:
        return Check("gpu.driver", "NVIDIA driver", "fail",
                     f"driver {driver.version} libraries present but /dev/nvidiactl is missing",
                     "load the nvidia kernel module (nvidia-modprobe)", **details)
    cuda = details["cuda"] or "unknown"
    return Check("gpu.driver", "NVIDIA driver", "ok",
                 f"driver {driver.version} (CUDA {cuda}), {len(gpus)} GPU(s); --gpus injects "
                 f"{len(driver.libraries)} libraries, {len(driver.binaries)} tools and "
                 f"{len(devs)} devices", **details)


def _image_probe(image_arg, config):
    """In a child: the image mounted as `hpcc exec` would, then the MPI and GPU hooks'
    plans on it (nothing applied)."""
    from ..cli import resolve_image
    from ..hooks.mpi import plan_mpi
    from ..hooks.nvidia import plan_nvidia
    from ..hooks.oci import Container
    from ..hooks.root import Root
    from ..runtime import build_spec, enter_namespaces, setup_root

    privileged = os.geteuid() == 0
    image = resolve_image(image_arg, config)
    cfg = dict(config)
    cfg["launcher"] = dict(config.get("launcher") or {}, hooks_dir="", binds=[])
    spec = build_spec(image, mode="exec", command=["true"], bind_home=False, bind_cwd=False,
                      config=cfg, image_name=image_arg,
                      annotations={"org.hpcc.gpu": "all"})
    spec["hooks"] = {}
    out = {"image": image.sqfs_path}
    enter_namespaces(privileged)
    handle = setup_root(spec, privileged, pivot=False)
    try:
        out["mounted"] = "squashfuse_ll" if handle.fuse_pid else "kernel"
        container = Container({"id": handle.id, "annotations": spec.get("annotations")},
                              spec, handle.bundle, spec["root"]["path"])
        root = Root(spec["root"]["path"])
        for name, plan in (("mpi", plan_mpi), ("gpu", plan_nvidia)):
            try:
                p = plan(container, root, config)
                out[name] = {"ok": True, "plan": json.loads(p.as_json())}
            except HpccError as e:
                out[name] = {"ok": False, "error": str(e)}
        root.close()
    finally:
        handle.close()
    return out


def check_image(image_arg, config, mpi, gpu):
    res = _fork_probe(_image_probe, image_arg, config)
    if "error" in res:
        return [Check("image.mount", f"image {image_arg}", "fail",
                      f"cannot mount {image_arg}: {res['error']}",
                      "fix the problems above; check the image with `hpcc images`")]
    out = [Check("image.mount", f"image {image_arg}", "ok",
                 f"{res['image']} mounts ({res['mounted']})", path=res["image"],
                 mounted=res["mounted"])]
    m = res["mpi"]
    if mpi.status != "ok":
        out.append(Check("image.mpi", "MPI hook on the image", "off",
                         "no host MPI to inject (see mpi.host)", **m))
    elif m["ok"]:
        binds = [a for a in m["plan"].get("actions", []) if a.get("op") == "bind"]
        out.append(Check("image.mpi", "MPI hook on the image", "ok",
                         f"--mpi accepts the image's MPI; it would bind {len(binds)} host "
                         "paths", **m))
    else:
        out.append(Check("image.mpi", "MPI hook on the image", "warn",
                         f"--mpi would refuse this image: {m['error']}",
                         "run it without --mpi (its own MPI, inside one node), or rebuild "
                         "it on an MPICH-ABI MPI", **m))
    g = res["gpu"]
    if gpu.status != "ok":
        out.append(Check("image.gpu", "GPU hook on the image", "off",
                         "no NVIDIA driver to inject (see gpu.driver)", **g))
    elif g["ok"]:
        binds = [a for a in g["plan"].get("actions", []) if a.get("op") == "bind"]
        out.append(Check("image.gpu", "GPU hook on the image", "ok",
                         f"--gpus all would bind {len(binds)} host paths", **g))
    else:
        out.append(Check("image.gpu", "GPU hook on the image", "fail",
                         f"--gpus would refuse this image: {g['error']}",
                         "use an image whose NVIDIA_REQUIRE_CUDA this driver meets", **g))
    return out
