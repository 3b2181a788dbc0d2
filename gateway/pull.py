"""`gateway pull` / `hpcc pull`: registry -> blob cache -> one squashfs in the store.

Downloads start for all layers at once (bounded by gateway.concurrent_downloads); the
conversion consumes them newest-first as soon as each is ready, so download and conversion
overlap. If the store already holds the image's manifest digest, nothing is downloaded or
converted: the tag is (re)pointed and the pull is done ("pull only if changed"). Concurrent
pulls of one image convert it once: the per-image lock serialises them and the later ones
find the image published.
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hpcc.reference import parse_reference

from .convert import convert_image
from .flatten import LayerSource


@dataclass
class PullResult:
    record: object
    ref: str
    digest: str
    converted: bool
    seconds: float
    report: dict = field(default_factory=dict)

    def as_dict(self):
        meta = self.record.meta if self.record else {}
        return {
            "ref": self.ref,
            "digest": self.digest,
            "converted": self.converted,
            "path": self.record.sqfs_path if self.record else None,
            "size": meta.get("size"),
            "seconds": round(self.seconds, 3),
            "conversion": self.report or meta.get("conversion", {}),
        }


def pull(ref_str, *, store, config, platform=None, insecure=False, force=False, reporter=None,
         client=None):
    from .blobcache import BlobCache
    from .registry import RegistryClient, blob_cache_dir

    from .progress import Reporter

    reporter = reporter or Reporter(quiet=True)
    t0 = time.monotonic()
    ref = parse_reference(ref_str)
    own_client = client is None
    client = client or RegistryClient(config, insecure=insecure)
    try:
        img = client.resolve(ref, platform or config["gateway"]["platform"] or None)
        digest = img.manifest_digest
        total = sum(layer.size for layer in img.layers)
        reporter.resolved(ref.familiar, digest, len(img.layers), total)
        refs = [ref] if ref.tag else []

        store.ensure()
        if not force:
            rec = store.get(digest)
            if rec is not None:
                for r in refs:
                    store.tag(r, digest)
                reporter.done(f"up to date: {ref.familiar} is {digest}")
                return PullResult(rec, str(ref), digest, False, time.monotonic() - t0)

        cache = BlobCache(blob_cache_dir(config, store.root))
        with store.lock(digest):
            rec = None if force else store.get(digest)
            if rec is not None:  # another pull converted it while we waited for the lock
                for r in refs:
                    store.tag(r, digest)
                reporter.done(f"up to date: {ref.familiar} is {digest} (converted by another pull)")
                return PullResult(rec, str(ref), digest, False, time.monotonic() - t0)
            workers = max(1, min(config["gateway"]["concurrent_downloads"], len(img.layers) or 1))
            abort = threading.Event()  # one failure stops the other downloads
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpcc-dl") as pool:
                futures = [pool.submit(_fetch_layer, client, img, layer, cache, reporter, abort)
                           for layer in img.layers]
                getters = [_getter(f, layer) for f, layer in zip(futures, img.layers)]
                reporter.converting(total)
                try:
                    rec, stats, report = convert_image(
                        store, digest, getters, config=config, image_config=img.config,
                        meta=_meta(img, ref), refs=refs, progress=reporter.converted_bytes)
                except BaseException:
                    abort.set()
                    for f in futures:
                        f.cancel()
                    raise
        secs = time.monotonic() - t0
        reporter.done(f"pulled {ref.familiar} -> {rec.sqfs_path} "
                      f"({rec.meta.get('size', 0) / 1e6:.1f} MB squashfs, "
                      f"{report['entries']} entries, {secs:.1f}s)")
        return PullResult(rec, str(ref), digest, True, secs, report)
    finally:
        reporter.close()
        if own_client:
            client.close()


def _fetch_layer(client, img, layer, cache, reporter, abort):
    what = f"layer {layer.digest} of {img.ref.familiar}"
    try:
        path = client.fetch_blob(img.ref, layer.digest, layer.size, cache, reporter.download,
                                 what, abort=abort)
        client.check_layer(layer, path, what)
    except BaseException:
        abort.set()
        raise
    return path


def _getter(future, layer):
    def get():
        path = future.result()
        return LayerSource(path, layer.compression, layer.digest)
    return get


def _meta(img, ref):
    cfg = img.config or {}
    return {
        "source": str(ref.with_digest(None)) if ref.tag else str(ref),
        "repository": ref.repository,
        "manifest_media_type": img.media_type,
        "index_digest": img.index_digest,
        "config_digest": img.config_digest,
        "platform": img.platform,
        "created": cfg.get("created"),
        "architecture": cfg.get("architecture"),
        "os": cfg.get("os"),
        "layers": [{"digest": layer.digest, "size": layer.size, "media_type": layer.media_type}
                   for layer in img.layers],
        "compressed_size": sum(layer.size for layer in img.layers),
    }
