"""The image commands of `gateway` and `hpcc`: pull, import, images, inspect, rm, and the
JSON every one of them gives an image (etc/hpcc-output.schema.json, $defs/image). Which
store they act on is the group's choice (gateway.cli.Ctx)."""
import json
import os

import click

from hpcc.errors import HpccError
from hpcc.store import Store

from .cli import _common


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




IMAGE_COMMANDS = [pull, import_, images, inspect, rm]
