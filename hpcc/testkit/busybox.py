"""The busybox test image, from the host's busybox-static, in the two forms the tests and the
demo need:

- busybox_image(): the demo image built in memory as a two-layer Docker or OCI image, to push
  to a registry or write as an archive (what `gateway pull` / `gateway import` read);
- busybox_tree() + squash(): the same root as a directory, squashed with mksquashfs straight
  into a .sqfs file (what the launcher and the Slurm plugin run), when the test is not about
  the gateway.

Both start from the same /etc files (BASE_ETC).
"""
import os
import shutil
import subprocess
from pathlib import Path

from .images import ImageBuilder, directory, file, hardlink, symlink, whiteout

BUSYBOX = "/bin/busybox"

# The root's identity files, shared by both forms.
BASE_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}
TREE_OS_RELEASE = 'NAME="hpcc test image"\nID=hpcctest\n'

# =========================================================================================
# In memory: the demo image
# =========================================================================================
# A fixed list of applets (not `busybox --list`), so the image's layers do not depend on how
# the host's busybox was configured.
BUSYBOX_SYMLINKS = ("sh", "ls", "cat", "echo", "id", "true", "false", "uname", "mkdir",
                    "rm", "cp", "mv", "ln", "pwd", "sleep", "grep", "sed", "head", "tail",
                    "wc", "touch", "test", "[", "printf", "hostname", "ps", "whoami",
                    "stat", "chmod", "readlink", "find", "sort", "tr", "cut", "date", "df",
                    "mount", "dirname", "basename", "expr", "seq", "kill", "xargs", "awk",
                    "md5sum", "sha256sum", "du", "tee", "which", "vi", "less", "nproc")
BUSYBOX_HARDLINKS = ("env",)     # one applet as a hardlink, so images carry one


def busybox_image(*, oci=False, compression="gzip", labels=None):
    """The demo image: Debian's static busybox in two layers (`labels`, extra config labels,
    make an image of its own: a store holding the plain one does not have it).

    Layer 1: /bin/busybox, applets as symlinks (and `env` as a hardlink), /etc/passwd,
    /etc/group, /etc/os-release, /etc/motd, /tmp (1777), /root, /home.
    Layer 2: /app/hello.sh and /app/README, and a whiteout deleting /etc/motd.
    Config: PATH, Cmd ["/bin/sh"], WorkingDir "/", labels.
    """
    data = Path(BUSYBOX).read_bytes()
    base = [directory("bin"), file("bin/busybox", data, 0o755)]
    base += [symlink(f"bin/{a}", "busybox") for a in BUSYBOX_SYMLINKS]
    base += [hardlink(f"bin/{a}", "bin/busybox") for a in BUSYBOX_HARDLINKS]
    base += [directory("usr"), directory("usr/bin"), symlink("usr/bin/env", "../../bin/env"),
             directory("etc")]
    base += [file(name, content) for name, content in BASE_ETC.items()]
    base += [
        file("etc/os-release", 'NAME="hpcc busybox"\nID=hpcc-busybox\n'
                               'PRETTY_NAME="hpcc demo image (busybox)"\nVERSION_ID=1\n'),
        file("etc/motd", "this file is deleted by a whiteout in layer 2\n"),
        directory("tmp", 0o1777), directory("root", 0o700), directory("home"),
        directory("proc"), directory("sys"), directory("dev"),
    ]
    app = [
        directory("app"),
        file("app/hello.sh", "#!/bin/sh\necho \"hello from $(uname -s) in an hpcc container, "
                             "uid $(id -u)\"\n", 0o755),
        file("app/README", "hpcc demo image\n"),
        whiteout("etc/motd"),
    ]
    b = (ImageBuilder(oci=oci)
         .layer(base, compression=compression, comment="busybox base")
         .layer(app, compression=compression, comment="demo app")
         .env("PATH=/usr/local/bin:/usr/bin:/bin", "HPCC_DEMO=1")
         .cmd(["/bin/sh"]).workdir("/")
         .label("org.opencontainers.image.title", "hpcc busybox demo")
         .label("org.opencontainers.image.source", "hpcc.testkit.busybox.busybox_image"))
    for k, v in (labels or {}).items():
        b.label(k, v)
    return b.build()


# =========================================================================================
# On disk: a busybox root squashed with mksquashfs
# =========================================================================================
def install_busybox(root, applets=None):
    """/bin/busybox in the tree at `root`, with `applets` (default: every applet the binary
    has) as symlinks to it in /bin."""
    root = Path(root)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    if applets is None:
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
    for a in applets:
        if a != "busybox" and not (root / "bin" / a).exists():
            os.symlink("busybox", root / "bin" / a)


def busybox_tree(root, *, os_release=TREE_OS_RELEASE, files=None, extra_dirs=()):
    """A minimal root at `root`: static busybox with every applet it has as a symlink,
    BASE_ETC, /etc/os-release, and bin etc tmp (1777) proc sys dev root; `extra_dirs` adds
    directories, `files` ({relative path: str or bytes}) adds or replaces files."""
    root = Path(root)
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", *extra_dirs):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    install_busybox(root)
    etc = dict(BASE_ETC)
    if os_release is not None:
        etc["etc/os-release"] = os_release
    etc.update(files or {})
    for rel, content in etc.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return root


def squash(tree, out, *, mode=0o644):
    """mksquashfs `tree` into the file `out` (files owned by root), readable by `mode`."""
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-all-root", "-quiet",
                    "-no-progress"], check=True, capture_output=True)
    os.chmod(out, mode)
    return Path(out)
