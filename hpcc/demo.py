"""`make demo`: the main job end to end on an embedded default, with nothing downloaded.

1. start a real registry (Debian's docker-registry) on 127.0.0.1,
2. build a small two-layer image from Debian's busybox-static and push it there,
3. `gateway pull` it into the site image store (one squashfs file),
4. `gateway images` / `gateway inspect` it,
5. `hpcc run` it (as root, and as an unprivileged user when the launcher is installed),
6. `srun --container=...` it on an embedded Slurm cluster (when the Slurm plugin is built).

Run as root on Debian 12 after `make install` (which `make demo` does).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def step(title):
    print(f"\n\033[1m==> {title}\033[0m" if sys.stdout.isatty() else f"\n==> {title}", flush=True)


def show(cmd, check=True, **kw):
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(map(str, cmd))}' failed with exit status "
                         f"{p.returncode}")
    return p


def tool(name):
    return str(BIN / name)


def main():
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (make demo), it starts a registry and uses the site "
                         "store")
    from hpcc.testkit.busybox import busybox_image
    from hpcc.testkit.registry import LocalRegistry

    step("starting a local OCI registry (docker-registry) on 127.0.0.1")
    with LocalRegistry(port=_demo_port()) as reg:
        print(f"registry at {reg.url}")
        step("building the demo image from busybox-static (2 layers) and pushing it")
        image = busybox_image()
        reg.push("hpcc/demo", "latest", image)
        ref = reg.ref("hpcc/demo", "latest")
        print(f"pushed {ref} ({len(image.layers)} layers, manifest {image.digest})")

        step("gateway pull: registry -> one squashfs file in the site store")
        show([tool("gateway"), "pull", ref])
        step("gateway images")
        show([tool("gateway"), "images"])
        step("gateway inspect")
        show([tool("gateway"), "inspect", ref])

        if _has_launcher():
            step("hpcc run (root, privileged mode: kernel squashfs mount)")
            show([tool("hpcc"), "run", ref, "--", "/app/hello.sh"])
            user = _demo_user()
            if user:
                step(f"hpcc run as the unprivileged user '{user}' (user namespace + squashfuse)")
                show(["runuser", "-u", user, "--", tool("hpcc"), "run", "--no-home", ref, "--",
                      "/app/hello.sh"], cwd="/")
        _slurm_demo(ref)
    step("done")


def _demo_port(preferred=5000):
    """A fixed port when free, so that repeated demos reuse one image name in the store."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return None
    return preferred


def _has_launcher():
    p = subprocess.run([tool("hpcc"), "run", "--help"], capture_output=True)
    return p.returncode == 0


def _demo_user():
    """An unprivileged account to show the rootless mode ('nobody' always exists)."""
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)  # what a distribution's udev rule does
    return "nobody" if shutil.which("runuser") else None


def _slurm_demo(ref):
    from hpcc.testkit import slurmcluster

    step("srun --container on an embedded Slurm cluster")
    slurmcluster.demo(ref, show)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("demo: interrupted")
