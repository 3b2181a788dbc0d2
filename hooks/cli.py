"""`hpcc-hook`: the executable named by etc/hooks.d/*.json.

    hpcc-hook mpi|nvidia [--config FILE] [--dry-run] [-v]  < OCI state JSON

It runs on every launch that asks for it, so it stays light: argparse, no click/jsonschema
(the site config was validated by the admin tools), a small ELF reader of its own.
Failures print one line on stderr, `hpcc-hook <name>: <what is wrong; what to do>`, and exit 1
(the runtime reports that line and does not start the container).
"""
import argparse
import os
import sys

from hpcc.errors import HpccError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line with the way out (argparse prints its usage block and a second line)."""
        sys.stderr.write(f"hpcc-hook: {message} (see 'hpcc-hook --help')\n")
        raise SystemExit(2)


def _version():
    from hpcc import __version__
    return f"hpcc-hook {__version__}"


def _parser():
    p = _Parser(prog="hpcc-hook", description="hpcc's OCI hooks (MPI, NVIDIA GPU)")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("hook", choices=("mpi", "nvidia"), help="which hook to run")
    p.add_argument("--config", help="hpcc.toml to use (default: $HPCC_CONFIG, /etc/hpcc/hpcc.toml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be injected (JSON) and change nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="say on stderr what was injected")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors (the default)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        plan = _run(args)
    except HpccError as e:
        print(f"hpcc-hook {args.hook}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure still gets one line, not a traceback
        if os.environ.get("HPCC_HOOK_DEBUG"):
            raise
        print(f"hpcc-hook {args.hook}: internal error: {type(e).__name__}: {e} "
              "(set HPCC_HOOK_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    if args.dry_run:
        print(plan.as_json())
    elif args.verbose:
        binds = [a for a in plan.actions if a["op"] == "bind"]
        print(f"hpcc-hook {args.hook}: injected {len(binds)} host paths: {plan.summary()}"
              + ("; " + "; ".join(plan.notes) if plan.notes else ""), file=sys.stderr)
    return 0


def _run(args):
    from hpcc.config import load_config

    from .oci import enter_mount_namespace, read_state
    from .root import Root

    container = read_state(sys.stdin)
    config = load_config(args.config, validate_schema=False)
    if not args.dry_run:
        enter_mount_namespace(container.pid)
    root = Root(container.root, container.writable_devs)
    if args.hook == "mpi":
        from . import mpi
        return mpi.run(container, root, config, dry_run=args.dry_run)
    from . import nvidia
    return nvidia.run(container, root, config, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
