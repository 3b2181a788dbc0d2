"""`hpcc doctor`'s command line: options, JSON output, exit status."""
import json
import os
import pwd
import sys

from ..errors import UsageError
from .check import SCHEMA
from .report import render, run_checks

USAGE = """\
usage: hpcc doctor [--json] [--image IMAGE]

Check that this host can run hpcc containers: unprivileged user namespaces (sysctls,
AppArmor), /dev/fuse, squashfuse_ll, kernel squashfs with zstd, overlayfs in a user
namespace, loop devices, openat2 and the new mount API, the image stores, the gateway
service, the setuid mount helper, the Slurm plugin, the host's MPI and NVIDIA driver. Each
problem comes with its fix.

options:
  --image IMAGE   also mount IMAGE as a launch would, and say whether the MPI hook accepts
                  its MPI (and why not) and what the GPU hook would inject
  --json          print the report as JSON (schema: docs/doctor.md)
  -h, --help      show this help

Exit status: 0 when every check passed (or is not set up here), 1 when one failed.
"""


def main(argv):
    as_json, image = False, None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if a == "--json":
            as_json = True
        elif a == "--image" or a.startswith("--image="):
            if "=" in a:
                image = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                image = argv[i]
            else:
                raise UsageError("option --image needs a value (see hpcc doctor --help)")
        else:
            raise UsageError(f"unknown argument {a} for hpcc doctor (see hpcc doctor --help)")
        i += 1
    from ..config import load_config
    config = load_config(validate_schema=False)
    checks = run_checks(config, image)
    ok = not any(c.status == "fail" for c in checks)
    if as_json:
        try:
            name = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            name = None
        json.dump({"schema": SCHEMA, "ok": ok, "user": {"uid": os.getuid(), "name": name},
                   "checks": [c.as_dict() for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(checks, sys.stdout)
    return 0 if ok else 1
