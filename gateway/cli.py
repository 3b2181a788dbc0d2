"""`gateway`: the admin's image gateway (site store); also serves `hpcc pull/images/inspect/rm`.

    gateway pull REF [--platform OS/ARCH] [--insecure] [--force]
    gateway import FILE|DIR [--tag REF]
    gateway images | inspect REF | rm REF... | gc
    gateway prefetch            (images named by pending Slurm jobs)

Every command takes --json (machine output on stdout) and -q/--quiet; errors are one line
on stderr with the exit codes of hpcc.errors (1 user error, 2 usage, 3 registry/network).
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
            from hpcc.store import shared_image

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


def image_json(rec, store_root, ref=None, tags=None):
    """The fields every command's JSON gives an image (etc/hpcc-output.schema.json,
    $defs/image): the name asked for, digest, tags, store, the squashfs file, drops."""
    meta = rec.meta or {}
    sq = meta.get("squashfs") or {}
    conv = meta.get("conversion") or {}
    return {
        "ref": ref,
        "digest": rec.digest,
        "tags": sorted(meta.get("tags", []) if tags is None else tags),
        "store": store_root,
        "squashfs": {"path": rec.sqfs_path, "size": meta.get("size"),
                     "compressor": sq.get("compressor"), "block_size": sq.get("block_size")},
        "drops": {"entries": dict(conv.get("dropped") or {}),
                  "xattrs": conv.get("dropped_xattrs", 0),
                  "stripped_mode_bits": conv.get("stripped_mode_bits", 0)},
    }


def _tags_of(rec, store_root):
    """Every tag of the store at `store_root` that names the image (scans its refs)."""
    return sorted(n for n, d in Store(store_root).iter_refs() if d == rec.digest)


def _store_of(rec, default):
    st = getattr(rec, "store", None)
    return st.root if st is not None else default


def _human(n):
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


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

    for cmd in _USER_COMMANDS + ([] if user_mode else _ADMIN_COMMANDS):
        group.add_command(cmd)
    from .servecli import add_commands  # gateway serve/status, hpcc gc

    add_commands(group, _common, user_mode)
    return group


# Commands of both `gateway` and `hpcc` (which store they act on is the group's choice) ----
@click.command(help="Pull an image from a registry and convert it to one squashfs file "
                    "in the store. REF is like Docker's: ubuntu, ubuntu:22.04, "
                    "host:port/ns/name@sha256:...")
@click.argument("ref")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="Platform to choose from a multi-platform image (default: this machine).")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP / unverified TLS for this registry.")
@click.option("--force", is_flag=True, help="Convert again even if the store has the digest.")
@click.option("--auth-file", metavar="FILE",
              help="Registry credentials to use first (docker config.json / auth.json).")
@_common
@click.pass_obj
def pull(obj, ref, platform, insecure, force, auth_file, json_output, quiet):
    obj.json, obj.quiet = json_output, quiet
    if obj.user_mode and not obj.explicit_store:
        from .userpull import pull_for_user

        res = pull_for_user(obj.config, obj.store, ref, platform=platform, insecure=insecure,
                            force=force, reporter=obj.reporter(), auth_file=auth_file)
        if json_output:
            st = Store(res.get("store") or obj.store.root)
            rec = st.get(res["digest"]) if res.get("digest") else None
            if rec is not None:   # the image may be the site's; the tag is the user's
                res = {**res, **image_json(rec, st.root, ref=ref,
                                           tags=_tags_of(rec, obj.store.root))}
            obj.emit(res)
        return
    from .pull import pull as do_pull

    obj.admin_store(f"hpcc pull {ref}")
    obj.store.ensure()
    res = do_pull(ref, store=obj.store, config=obj.config, platform=platform,
                  insecure=insecure, force=force, reporter=obj.reporter(), trace=obj.trace(),
                  auth_file=auth_file)
    if json_output:
        out = res.as_dict()
        if res.record is not None:
            st = _store_of(res.record, obj.store.root)
            out.update(image_json(res.record, st, ref=ref, tags=_tags_of(res.record, st)))
        obj.emit(out)


@click.command(name="import", help="Import a docker-archive (docker save), an oci-archive "
                                   "or an OCI layout directory into the store.")
@click.argument("path", type=click.Path())
@click.option("--tag", "tag", metavar="REF", help="Name to give the image in the store.")
@click.option("--platform", metavar="OS/ARCH", help="Platform to choose from an index.")
@_common
@click.pass_obj
def import_(obj, path, tag, platform, json_output, quiet):
    from .importer import import_image

    obj.json, obj.quiet = json_output, quiet
    obj.admin_store("hpcc pull REF")
    rec, report = import_image(path, store=obj.store, config=obj.config, tag=tag,
                               platform=platform, reporter=obj.reporter())
    if json_output:
        out = image_json(rec, obj.store.root, ref=tag, tags=_tags_of(rec, obj.store.root))
        out.update(path=rec.sqfs_path, size=rec.meta.get("size"), conversion=report)
        obj.emit(out)


@click.command(help="List the images in the store.")
@_common
@click.pass_obj
def images(obj, json_output, quiet):
    stores = obj.read_stores()
    rows = []
    for st in stores:
        if st is not obj.store and not os.path.isdir(st.root):
            continue
        kind = obj.store_label(st) if obj.user_mode else "site"
        for rec in st.images():
            row = image_json(rec, st.root)
            row.update(size=rec.meta.get("size"), created=rec.meta.get("created"),
                       converted_at=rec.meta.get("converted_at"), path=rec.sqfs_path,
                       store_kind=kind, broken=None)
            rows.append(row)
        for bad in st.broken_images():
            from hpcc.image import ImageRecord

            row = image_json(ImageRecord(bad["digest"], bad["path"], {"size": bad["size"]}),
                             st.root)
            row.update(size=bad["size"], created=None, converted_at=None, path=bad["path"],
                       store_kind=kind, broken=bad["error"])
            rows.append(row)
    if json_output:
        obj.emit(rows)
        return
    if not rows:
        if not quiet:
            click.echo(f"no images in {', '.join(s.root for s in stores)}", err=True)
        return
    header = ("IMAGE", "DIGEST", "SIZE", "CONVERTED") + (("STORE",) if obj.user_mode else ())
    lines = [header]
    for r in rows:
        names = r["tags"] or ["<broken>" if r["broken"] else "<none>"]
        for name in names:
            row = (name, r["digest"][7:19], _human(r["size"]),
                   (r["converted_at"] or "-").replace("T", " ").rstrip("Z"))
            lines.append(row + ((r["store_kind"],) if obj.user_mode else ()))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    broken = [r for r in rows if r["broken"]]
    if broken and not quiet:
        click.echo(f"{len(broken)} broken image(s) ({_human(sum(r['size'] or 0 for r in broken))}"
                   f"): their metadata is unreadable; 'gateway gc' removes them", err=True)
        for r in broken:
            click.echo(f"  {r['path']}: {r['broken']}", err=True)


@click.command(help="Show an image's metadata (config, layers, squashfs details).")
@click.argument("ref")
@_common
@click.pass_obj
def inspect(obj, ref, json_output, quiet):
    rec = obj.find(ref)
    info = dict(rec.meta)
    st = _store_of(rec, obj.store.root)
    common = image_json(rec, st, ref=ref, tags=_tags_of(rec, st))
    common["squashfs"] = {**(rec.meta.get("squashfs") or {}), **common["squashfs"]}
    info.update(common)
    info["path"] = rec.sqfs_path
    try:
        from hpcc.squashfs import SquashfsReader

        with SquashfsReader(rec.sqfs_path) as r:
            info["squashfs_info"] = r.info()
    except HpccError as e:
        info["squashfs_info"] = {"error": str(e)}
    if json_output:
        obj.emit(info)
        return
    c = info.get("config") or {}
    click.echo(f"Image:       {', '.join(info.get('tags') or []) or info.get('source', '-')}")
    click.echo(f"Digest:      {rec.digest}")
    click.echo(f"File:        {rec.sqfs_path} ({_human(info.get('size'))})")
    click.echo(f"Source:      {info.get('source', '-')}")
    sig = info.get("signature")
    if sig:
        click.echo(f"Signed by:   {sig.get('key')} ({sig.get('fingerprint')}) for "
                   f"{sig.get('digest')}")
    click.echo(f"Platform:    {info.get('platform') or '-'}   "
               f"Created: {info.get('created') or '-'}")
    click.echo(f"Entrypoint:  {json.dumps(c.get('Entrypoint'))}")
    click.echo(f"Cmd:         {json.dumps(c.get('Cmd'))}")
    click.echo(f"WorkingDir:  {c.get('WorkingDir') or '/'}   User: {c.get('User') or '-'}")
    click.echo("Env:")
    for e in c.get("Env") or []:
        click.echo(f"  {e}")
    if c.get("Labels"):
        click.echo("Labels:")
        for k, v in sorted(c["Labels"].items()):
            click.echo(f"  {k}={v}")
    layers = info.get("layers") or []
    click.echo(f"Layers:      {len(layers)}")
    for layer in layers:
        click.echo(f"  {layer.get('digest')}  {_human(layer.get('size'))}")
    sq = info.get("squashfs_info") or {}
    if sq and "error" not in sq:
        click.echo(f"Squashfs:    {sq.get('compressor')}, block {sq.get('block_size')}, "
                   f"{sq.get('inodes')} inodes")
    conv = info.get("conversion") or {}
    if conv.get("dropped"):
        click.echo("Dropped:     " + ", ".join(f"{k}: {v}" for k, v in conv["dropped"].items()))


@click.command(help="Remove images (by name: the tag; by digest: the image and its tags).")
@click.argument("refs", nargs=-1, required=True)
@_common
@click.pass_obj
def rm(obj, refs, json_output, quiet):
    obj.admin_store("hpcc rm REF")
    out = []
    failed = 0
    for ref in refs:
        try:
            tags, digest = _remove(obj, ref)
        except HpccError as e:
            # One bad name does not stop the others; each failure is one line.
            failed += 1
            out.append({"ref": ref, "untagged": [], "deleted": None, "error": str(e)})
            if not json_output:
                click.echo(f"{obj.prog}: {e}", err=True)
            continue
        out.append({"ref": ref, "untagged": tags, "deleted": digest, "error": None})
        if not json_output and not quiet:
            for t in tags:
                click.echo(f"untagged {t}")
            if digest:
                click.echo(f"deleted {digest}")
    if json_output:
        obj.emit(out)
    if failed:
        raise click.exceptions.Exit(1)


def _remove(obj, ref):
    """Remove `ref` from the store written to; in user mode, an image that is only in the
    site store is named as such (the user cannot remove it)."""
    from hpcc.errors import ImageNotFound

    try:
        return obj.store.remove(ref)
    except ImageNotFound:
        if obj.user_mode:
            for st in obj.read_stores()[1:]:
                try:
                    rec = st.find(ref)
                except HpccError:
                    continue
                if rec is not None and obj.store_label(st) == "private":
                    from .service_client import remove_private

                    return remove_private(obj.config, ref)  # the service owns that store
                if rec is not None:
                    raise ImageNotFound(
                        f"image '{ref}' is in the {obj.store_label(st)} store {st.root}, not "
                        "in yours; only the site's admins can remove it",
                        hint=f"they use 'gateway rm {ref}'") from None
        raise



# Admin-only commands (`gateway`) ---------------------------------------------------------

@click.command(help="Pull the images named by pending Slurm jobs (--container=IMAGE, "
                    "or #SBATCH --container-image=IMAGE in a batch script) that the "
                    "store lacks, so the jobs do not wait for a conversion when they "
                    "start. Run it as root from cron or a systemd timer (root reads "
                    "every job's batch script).")
@click.option("--dry-run", is_flag=True, help="Only list what would be pulled.")
@_common
@click.pass_obj
def prefetch(obj, dry_run, json_output, quiet):
    from hpcc.errors import HpccError as _E
    from hpcc.slurm.jobs import pending_job_images

    from .pull import pull as do_pull
    from .service_client import enabled as service_enabled
    from .service_client import pull as service_pull

    obj.json, obj.quiet = json_output, quiet
    results, failed = [], 0
    for image in pending_job_images():
        entry = {"image": image}
        try:
            if obj.store.find(image) is not None:
                entry["status"] = "present"
            elif dry_run:
                entry["status"] = "would pull"
            elif service_enabled(obj.config):
                res = service_pull(obj.config, image, reporter=obj.reporter())
                entry.update(status="pulled" if res.get("converted") else "present",
                             digest=res.get("digest"))
            else:
                obj.store.ensure()
                res = do_pull(image, store=obj.store, config=obj.config,
                              reporter=obj.reporter())
                entry.update(status="pulled", digest=res.digest)
        except _E as e:
            failed += 1
            entry.update(status="failed", error=str(e))
        results.append(entry)
        if not json_output and not quiet:
            click.echo(f"{entry['status']:>10}  {image}"
                       + (f"  ({entry['error']})" if "error" in entry else ""))
    if json_output:
        obj.emit(results)
    elif not quiet and not results:
        click.echo("no pending job names an image", err=True)
    if failed:
        raise click.exceptions.Exit(1)


@click.command(help="Remove debris of interrupted conversions, dangling tags and unused "
                    "locks; with --blobs also layer blobs no image uses.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--blobs", is_flag=True, help="Also prune the layer blob cache.")
@_common
@click.pass_obj
def gc(obj, dry_run, blobs, json_output, quiet):
    obj.admin_store("hpcc gc")
    removed = obj.store.gc(dry_run=dry_run)
    if blobs:
        from .blobcache import BlobCache, blob_cache_dir

        keep = {layer["digest"] for rec in obj.store.images()
                for layer in rec.meta.get("layers", [])}
        cache = BlobCache(blob_cache_dir(obj.config, obj.store.root))
        removed += [str(p) for p in cache.prune(keep, dry_run=dry_run)]
    if json_output:
        obj.emit({"removed": removed, "dry_run": dry_run})
    elif not quiet:
        for p in removed:
            click.echo(("would remove " if dry_run else "removed ") + p)
        click.echo(f"{len(removed)} item(s) {'to remove' if dry_run else 'removed'}",
                   err=True)



@click.command(help="Log in to a registry: check the credentials with it, then store them "
                    "in the auth file pulls read first (--auth-file, else $REGISTRY_AUTH_FILE, "
                    "else ~/.docker/config.json), in docker's format.")
@click.argument("registry")
@click.option("-u", "--username", metavar="USER", help="User name (asked for on a terminal).")
@click.option("--password-stdin", is_flag=True,
              help="Read the password (or token) from standard input.")
@click.option("--auth-file", metavar="FILE", help="Auth file to write instead.")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP / unverified TLS for this registry.")
@_common
@click.pass_obj
def login(obj, registry, username, password_stdin, auth_file, insecure, json_output, quiet):
    from .login import check_credentials, store_credentials

    interactive = sys.stdin.isatty()
    if not username:
        if not interactive or password_stdin:
            raise click.UsageError("give the user name with -u USER")
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif interactive:
        password = click.prompt("Password", hide_input=True, err=True)
    else:
        raise click.UsageError("no terminal to ask for the password: use --password-stdin")
    if not password:
        raise click.UsageError("the password is empty")
    note = check_credentials(obj.config, registry, username, password, insecure=insecure)
    path = store_credentials(registry, username, password, auth_file)
    if json_output:
        obj.emit({"registry": registry, "username": username, "auth_file": str(path)})
    elif not quiet:
        click.echo(f"logged in to {registry} as {username}; credentials in {path}"
                   + (f" ({note})" if note else ""), err=True)


@click.command(help="Remove a registry's credentials from the auth file.")
@click.argument("registry")
@click.option("--auth-file", metavar="FILE", help="Auth file to change instead.")
@_common
@click.pass_obj
def logout(obj, registry, auth_file, json_output, quiet):
    from .login import remove_credentials

    path, had = remove_credentials(registry, auth_file)
    if json_output:
        obj.emit({"registry": registry, "auth_file": str(path), "removed": had})
    elif not quiet:
        click.echo(f"removed the credentials for {registry} from {path}" if had else
                   f"no credentials for {registry} in {path}", err=True)


_USER_COMMANDS = [pull, import_, images, inspect, rm, login, logout]
_ADMIN_COMMANDS = [prefetch, gc]


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
