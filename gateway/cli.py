"""`gateway`: the admin's image gateway (site store); also serves `hpcc pull/images/inspect/rm`.

    gateway pull REF [--platform OS/ARCH] [--insecure] [--force] [--auth-file FILE]
    gateway import FILE|DIR [--tag REF]
    gateway images | inspect REF | rm REF... | gc [--blobs]
    gateway login REGISTRY | logout REGISTRY
    gateway prefetch            (images named by pending Slurm jobs)

Every command takes --json (machine output on stdout, schemas in etc/hpcc-output.schema.json),
-q/--quiet and -v/--verbose (before or after the command); errors are one line on stderr,
`gateway: what is wrong; what to do`, with the exit codes of hpcc.errors (1 user error,
2 usage, 3 registry/network).

This module is the group, its context and the error edge; the commands live in imagecmds
(pull, import, images, inspect, rm), authcmds (login, logout), admincmds (prefetch, gc) and
servecli (serve, status; hpcc gc). `hpcc` gets the same group in user mode: the user's own
store, the site's read as well, no admin commands.
"""
import json
import os
import sys

import click

from hpcc.config import load_config
from hpcc.errors import EXIT_USAGE, HpccError, StoreError
from hpcc.store import Store


class Ctx:
    """What the group hands its commands: config, the store written to, output mode. In
    user mode (`hpcc`) the store is the user's own and the site store is read as well."""

    def __init__(self, config, store, json_output, quiet, prog, user_mode):
        self.config = config
        self.store = store
        self.json = json_output
        self.quiet = quiet
        self.prog = prog
        self.user_mode = user_mode
        self.verbose = False

    def trace(self):
        """With -v: a callable printing one line per registry request."""
        if not self.verbose or self.quiet:
            return None
        return lambda line: click.echo(f"{self.prog}: {line}", err=True)

    def reporter(self):
        from .progress import make_reporter

        return make_reporter(quiet=self.quiet, json_output=self.json)

    def emit(self, obj):
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def report_removed(self, removed, dry_run, json_output, quiet):
        """What a gc removed (dry_run: would remove): JSON, or one line per path on stdout
        and the count on stderr."""
        if json_output:
            self.emit({"removed": removed, "dry_run": dry_run})
        elif not quiet:
            for p in removed:
                click.echo(("would remove " if dry_run else "removed ") + p)
            click.echo(f"{len(removed)} item(s) {'to remove' if dry_run else 'removed'}",
                       err=True)

    def read_stores(self):
        """The stores whose images are listed and found: the own one, then (user mode) the
        site store."""
        stores = [self.store]
        if self.user_mode:
            site = Store.site(self.config)
            if site.root != self.store.root:
                stores += [Store.private(site.root, os.getuid()), site]
        return stores

    def find(self, ref):
        """The image `ref` names in the read stores; ImageNotFound (with its hint) if none,
        or the first store's permission error when a store could not be read."""
        from hpcc.store import StoreAccessDenied

        denied = None
        for st in self.read_stores():
            try:
                rec = st.find(ref)
            except StoreAccessDenied as e:
                denied = denied or e
                continue
            if rec is not None:
                return rec
        if self.user_mode:  # the user's tag of an image the site store holds
            from hpcc.resolve import shared_image

            rec = shared_image(self.store, self.read_stores()[1:], ref)
            if rec is not None:
                return rec
        if denied is not None:
            raise denied
        return self.store.resolve(ref)  # raises ImageNotFound with the hint

    def store_label(self, st):
        """Which store an image is in, in a word: yours, private, site (gateway: the path)."""
        if not self.user_mode:
            return st.root
        if st.root == self.store.root:
            return "yours" if not getattr(self, "explicit_store", False) else st.root
        site = Store.site(self.config)
        return "site" if st.root == site.root else "private"

    def admin_store(self, instead):
        """A user who cannot write the site store gets one line, not a traceback."""
        if self.user_mode or os.geteuid() == 0:
            return
        d = self.store.root
        while not os.path.exists(d) and os.path.dirname(d) != d:
            d = os.path.dirname(d)
        if not os.access(d, os.W_OK):
            raise StoreError(f"the store {self.store.root} is the site admins' (you cannot "
                             "write it)", hint=f"use '{instead}' for your own images")


def _root_flag(name):
    """Default of a command's -q/-v: the same flag given before the command
    (`gateway -q pull X` and `gateway pull -q X` mean the same)."""
    def default():
        ctx = click.get_current_context(silent=True)
        return bool(ctx and ctx.find_root().params.get(name))
    return default


def _set_verbose(ctx, _param, value):
    obj = ctx.find_object(Ctx)
    if obj is not None and value:
        obj.verbose = True


def _common(f):
    f = click.option("--json", "json_output", is_flag=True,
                     help="Machine-readable JSON on stdout (schema: "
                          "etc/hpcc-output.schema.json).")(f)
    f = click.option("-q", "--quiet", is_flag=True, default=_root_flag("quiet"),
                     help="Print only errors.")(f)
    f = click.option("-v", "--verbose", is_flag=True, default=_root_flag("verbose"),
                     expose_value=False, callback=_set_verbose,
                     help="Say more: every registry request with its answer.")(f)
    return f



def _make_group(prog, user_mode):
    """The `gateway` command group (site store, admin commands) or, with user_mode, the
    image commands of `hpcc` (the user's own store; the site store is read as well)."""
    @click.group(name=prog, context_settings={"help_option_names": ["-h", "--help"]},
                 help=(_USER_HELP if user_mode else _ADMIN_HELP))
    @click.option("--config", "config_path", metavar="FILE", envvar="HPCC_CONFIG",
                  help="Site config (default $HPCC_CONFIG or /etc/hpcc/hpcc.toml).")
    @click.option("--store", "store_path", metavar="DIR",
                  help="Image store to use instead of the configured one.")
    @click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
    @click.option("-v", "--verbose", is_flag=True,
                  help="Say more: every registry request with its answer.")
    @click.version_option(package_name="hpcc", prog_name=prog, message="%(prog)s %(version)s")
    @click.pass_context
    def group(ctx, config_path, store_path, quiet, verbose):
        config = load_config(config_path)
        if store_path:
            store = Store(store_path)
        elif user_mode:
            store = Store.user(config)
        else:
            store = Store.site(config)
        ctx.obj = Ctx(config, store, False, quiet, prog, user_mode)
        ctx.obj.verbose = verbose
        ctx.obj.explicit_store = bool(store_path)

    from .admincmds import ADMIN_COMMANDS
    from .authcmds import AUTH_COMMANDS
    from .imagecmds import IMAGE_COMMANDS

    for cmd in IMAGE_COMMANDS + AUTH_COMMANDS + ([] if user_mode else ADMIN_COMMANDS):
        group.add_command(cmd)
    from .servecli import add_commands  # gateway serve/status, hpcc gc

    add_commands(group, _common, user_mode)
    return group



_ADMIN_HELP = ("hpcc image gateway: pull OCI/Docker images into the site image store as "
               "single squashfs files, and manage that store.")
_USER_HELP = ("hpcc image commands: pull images into your own store, list and inspect "
              "images of your store and the site store.")


def _run(group, argv, prog):
    try:
        rv = group.main(args=argv, prog_name=prog, standalone_mode=False)
        # Without standalone mode click returns the code of a click.exceptions.Exit
        # (`rm` or `prefetch` with a failure) instead of raising it.
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except HpccError as e:
        click.echo(f"{prog}: {e}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    except click.UsageError as e:
        # One line with the way out, not click's usage block.
        where = e.ctx.command_path if e.ctx is not None else prog
        click.echo(f"{prog}: {e.format_message()} (see '{where} --help')", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"{prog}: {e.format_message()}", err=True)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as e:
        # A store or file operation no handler above turned into an HpccError: still one
        # line, naming the path.
        where = f" {e.filename}" if e.filename else ""
        click.echo(f"{prog}: cannot access{where}: {e.strerror or e}", err=True)
        return 1


def main(argv=None):
    """Console script `gateway`."""
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(_run(_make_group("gateway", user_mode=False), argv, "gateway"))


def user_main(argv):
    """`hpcc pull|images|inspect|rm ...`: the same commands on the user's own store.
    Returns the exit status."""
    return _run(_make_group("hpcc", user_mode=True), argv, "hpcc")


if __name__ == "__main__":
    main()

__all__ = ["main", "user_main"]

