"""`gateway` commands for the site's admins only: prefetch (images of pending jobs) and gc."""
import click

from .cli import _common


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
    obj.report_removed(removed, dry_run, json_output, quiet)




ADMIN_COMMANDS = [prefetch, gc]
