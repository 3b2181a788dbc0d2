"""The gateway service's commands: `gateway serve` (the service) and `gateway status`
(ask it what it is doing), added to the `gateway` group by gateway/cli.py."""
import os

import click

from hpcc.errors import UsageError


def add_commands(group, common, user_mode):
    if user_mode:
        _add_user_gc(group, common)
        return

    @group.command(help="Run the gateway service in the foreground: users put images into "
                        "the site store through it (hpcc pull) within the site's policy. "
                        "Run it as the unprivileged account that owns the store "
                        "(etc/hpcc-gateway.service); never as root.")
    @click.option("--socket", "socket_path", metavar="PATH",
                  help="UNIX socket to listen on (default: service.socket).")
    @click.option("--listen", metavar="HOST:PORT",
                  help="Also accept munge-authenticated TCP requests here "
                       "(default: service.listen).")
    @click.option("--munge-socket", metavar="PATH", help="munged's socket (default: "
                  "service.munge_socket, else libmunge's default).")
    @click.option("--allow-root", is_flag=True, hidden=True)
    @click.pass_obj
    def serve(obj, socket_path, listen, munge_socket, allow_root):
        from .service import Service

        if os.geteuid() == 0 and not allow_root:
            raise UsageError("gateway serve does not run as root",
                             hint="run it as the account that owns the site store "
                                  "(User= in etc/hpcc-gateway.service)")
        Service(obj.config, socket_path=socket_path, listen=listen,
                munge_socket=munge_socket, store=obj.store).serve_forever()

    @group.command(help="Ask the gateway service what it is doing (pulls in progress); "
                        "with --images, the images it serves you.")
    @click.option("--images", is_flag=True, help="List the site store's images and your "
                  "private ones.")
    @common
    @click.pass_obj
    def status(obj, images, json_output, quiet):
        from .service_client import call

        res = call(obj.config, {"op": "list" if images else "status"})
        if json_output:
            obj.emit(res.get("images") if images else res.get("status"))
            return
        if images:
            for im in res.get("images") or []:
                names = ", ".join(im.get("tags") or []) or "<none>"
                click.echo(f"{names}  {im['digest'][7:19]}  {im.get('size') or 0:>12}"
                           + ("  (private)" if im.get("private") else ""))
            return
        st = res.get("status") or {}
        click.echo(f"gateway service pid {st.get('pid')} as {st.get('user')}, store "
                   f"{st.get('store')}, up {st.get('uptime')}s")
        for p in st.get("pulls") or []:
            click.echo(f"  {p['phase']:<12} {p['ref']}  ({p['requesters']} requester(s), "
                       f"{p['seconds']}s)")
        if not st.get("pulls") and not quiet:
            click.echo("  no pull in progress")


def _add_user_gc(group, common):
    @group.command(help="Clean your own store: debris of interrupted pulls, tags of images "
                        "no store holds any more, and the layer blob cache (down to "
                        "store.user_blob_cache_mb).")
    @click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
    @common
    @click.pass_obj
    def gc(obj, dry_run, json_output, quiet):
        from .userpull import user_gc

        removed = user_gc(obj.config, obj.store, dry_run=dry_run)
        obj.report_removed(removed, dry_run, json_output, quiet)
