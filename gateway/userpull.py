"""`hpcc pull` for a user: through the gateway service when the site runs one (the image
lands in the site store, nothing in $HOME), otherwise into the user's own store, where

- an image the site store (or the user's private part of it) already holds is not converted
  again: the user's store only gets the tag;
- the layer blobs are dropped after the conversion, or kept up to `store.user_blob_cache_mb`
  (newest first), so a home quota holds images, not their downloads twice over.
"""
import os

from hpcc.store import Store

MB = 1000 * 1000


def pull_for_user(config, store, ref, *, platform=None, insecure=False, force=False,
                  reporter=None, auth_file=None):
    from .service_client import enabled

    if enabled(config):
        from hpcc.errors import UsageError

        from .service_client import pull as service_pull

        if insecure or force:
            raise UsageError(f"{'--insecure' if insecure else '--force'} is not for pulls "
                             "through the site's gateway service",
                             hint="the site's config decides which registries are insecure; "
                                  "ask the admins to convert an image again")

        res = service_pull(config, ref, platform=platform, reporter=reporter)
        return {k: res.get(k) for k in ("ref", "digest", "converted", "joined", "path", "size",
                                        "private", "store", "seconds", "conversion")} \
            | {"via": "service"}
    from .pull import pull  # the conversion's modules: only for a pull of one's own

    site = Store.site(config)
    shared = [Store.private(site.root, os.getuid()), site]
    store.ensure()
    res = pull(ref, store=store, config=config, platform=platform, insecure=insecure,
               force=force, reporter=reporter, shared=() if force else shared,
               auth_file=auth_file)
    if res.converted:
        trim_blobs(config, store)
    out = res.as_dict()
    out["store"] = res.record.store.root if res.record is not None else store.root
    out["via"] = "local"
    return out


def trim_blobs(config, store, cap=None):
    """Keep at most `cap` bytes (default store.user_blob_cache_mb) of the user's blob cache,
    newest blobs first; returns the paths removed."""
    from .blobcache import BlobCache, blob_cache_dir

    if cap is None:
        cap = int(config["store"].get("user_blob_cache_mb") or 0) * MB
    cache = BlobCache(blob_cache_dir(config, store.root))
    sized = []
    for digest in cache.digests():
        try:
            st = os.stat(cache.path(digest))
        except OSError:
            continue
        sized.append((st.st_mtime, st.st_size, digest))
    keep, used = set(), 0
    for _mtime, size, digest in sorted(sized, reverse=True):
        if used + size > cap:
            break
        keep.add(digest)
        used += size
    return cache.prune(keep)


def user_gc(config, store, dry_run=False):
    """`hpcc gc`: debris of the user's store, tags of images no store holds, and the blob
    cache down to its cap. Tags of images the site store holds stay."""
    site = Store.site(config)
    elsewhere = (Store.private(site.root, os.getuid()), site)
    removed = store.gc(dry_run=dry_run, elsewhere=elsewhere)
    if not dry_run:
        removed += [str(p) for p in trim_blobs(config, store)]
    return removed
