"""The AppArmor profile that lets hpcc's interpreter create user namespaces where AppArmor
restricts them (Ubuntu >= 23.10: kernel.apparmor_restrict_unprivileged_userns = 1).

Under that restriction an unconfined program may still call unshare(CLONE_NEWUSER), but the
namespace it gets has no capabilities, so hpcc's first mount in it fails. A profile that
attaches to the program and carries the `userns` rule lifts the restriction for that program
alone; Ubuntu ships such profiles for the browsers, and enroot and Apptainer for their own
binaries. hpcc's launcher is a Python script, and AppArmor attaches by the path of the
executable the kernel runs, the interpreter: so `make install` makes the venv's `python3` a
real file (a symlink would resolve to the system's python3, which every Python program on
the host runs) and this module writes a profile naming that file only. The profile is
`flags=(unconfined)`: it grants user namespaces and confines nothing else.

    python3 -m hpcc.apparmor install EXE   what `make install` runs (does nothing where the
                                           restriction is absent)
    python3 -m hpcc.apparmor show EXE      print the profile
"""
import os
import re
import subprocess
import sys

from .runtime.userns import APPARMOR_RESTRICT, read_sysctl

PROFILE_DIR = "/etc/apparmor.d"
PROFILE_PREFIX = "hpcc-"


def restricted(sysctl=APPARMOR_RESTRICT, profile_dir=PROFILE_DIR):
    """True where AppArmor restricts unprivileged user namespaces and profiles can be
    installed: the sysctl exists and is 1, and the profile directory exists."""
    return read_sysctl(sysctl) == 1 and os.path.isdir(profile_dir)


def profile_name(exe):
    """hpcc-<path with / as .>: one profile per installation (several venvs may coexist)."""
    return PROFILE_PREFIX + os.path.abspath(exe).strip("/").replace("/", ".")


def profile_path(exe, profile_dir=PROFILE_DIR):
    return os.path.join(profile_dir, profile_name(exe))


def profile_text(exe):
    """The profile granting `userns` to exactly the file `exe` (absolute, not a symlink)."""
    path = os.path.abspath(exe)
    if os.path.islink(path):
        raise ValueError(f"{path} is a symlink: AppArmor attaches profiles to the file it "
                         "resolves to, which other programs run too; make it a real file")
    if re.search(r'[\s"*?\[\]{}^\\,#]', path):
        raise ValueError(f"{path}: AppArmor would read characters of this path as a pattern; "
                         "install hpcc under a plain path")
    name = profile_name(path)
    return (
        "# Written by hpcc's `make install`: lets hpcc's launcher interpreter (this file only)\n"
        "# create user namespaces where kernel.apparmor_restrict_unprivileged_userns=1.\n"
        "# flags=(unconfined): it grants that and confines nothing else.\n"
        "abi <abi/4.0>,\n"
        "include <tunables/global>\n"
        "\n"
        f"profile {name} {path} flags=(unconfined) {{\n"
        "  userns,\n"
        "\n"
        "  # site additions, kept across reinstalls\n"
        f"  include if exists <local/{name}>\n"
        "}\n")


def install(exe, profile_dir=PROFILE_DIR, parser="apparmor_parser", load=True):
    """Write the profile (atomically) and load it; return its path."""
    text = profile_text(exe)
    path = profile_path(exe, profile_dir)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
    if load:
        p = subprocess.run([parser, "-r", "-W", path], capture_output=True, text=True,
                           check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{parser} -r {path} failed: {p.stderr.strip()}")
    return path


def main(argv):
    if len(argv) != 2 or argv[0] not in ("install", "show"):
        sys.stderr.write("usage: python3 -m hpcc.apparmor install|show EXE\n")
        return 2
    cmd, exe = argv
    try:
        if cmd == "show":
            sys.stdout.write(profile_text(exe))
            return 0
        if not restricted():
            return 0
        path = install(exe)
    except (ValueError, RuntimeError, OSError) as e:
        sys.stderr.write(f"hpcc apparmor: {e}\n")
        return 1
    print(f"AppArmor restricts user namespaces here: installed {path} "
          f"(userns for {os.path.abspath(exe)} only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
