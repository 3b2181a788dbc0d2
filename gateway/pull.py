"""`gateway pull` / `hpcc pull`: registry -> blob cache -> one squashfs in the store.

Downloads start for all layers at once (bounded by gateway.concurrent_downloads); the
conversion consumes them newest-first as soon as each is ready, so download and conversion
overlap. If the store already holds the image's manifest digest, nothing is downloaded or
converted: the tag is (re)pointed and the pull is done ("pull only if changed"). Concurrent
pulls of one image convert it once: the per-image lock serialises them and the later ones
find the image published.
"""
import gc
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from hpcc.errors import HpccError
from hpcc.reference import parse_reference

from .convert import convert_image
from .download import root_failure
from .layersource import LayerSource
from .progress import drop_summary, short


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
         client=None, check_size=None, shared=(), resolved=None, trace=None,
         auth_file=None):
    """`check_size(bytes)` may refuse the finished squashfs (raise) before it is published.
    `shared`: stores (the site's) whose copy of the image is used instead of converting.
    `resolved`: the ResolvedImage when the caller has resolved `ref_str` already."""
    from .blobcache import BlobCache, blob_cache_dir
    from .cosign import check_policy
    from .progress import Reporter
    from .registry import RegistryClient

    reporter = reporter or Reporter(quiet=True)
    t0 = time.monotonic()
    ref = parse_reference(ref_str)
    own_client = client is None
    client = client or RegistryClient(config, insecure=insecure, notice=reporter.line,
                                      trace=trace, auth_file=auth_file)
    try:
        img = resolved or client.resolve(ref, platform or config["gateway"]["platform"] or None)
        digest = img.manifest_digest
        total = sum(layer.size for layer in img.layers)
        reporter.resolved(ref.familiar, digest, len(img.layers), total)
        refs = [ref] if ref.tag else []
        signer = check_policy(config, client, ref, img)  # None: the policy requires none

        store.ensure()
        if not force:
            rec = store.get(digest)
            for other in shared:
                if rec is None:
                    rec = other.get(digest)  # the site store has it: only tag it here
            if rec is not None:
                for r in refs:
                    store.tag(r, digest)
                reporter.done(f"up to date: {ref.familiar} is {short(digest)}")
                return PullResult(rec, str(ref), digest, False, time.monotonic() - t0)

        cache = BlobCache(blob_cache_dir(config, store.root))
        cap_mb = (config.get("store") or {}).get("blob_cache_max_mb") or 0
        if cap_mb:
            _fit_cache(cache, store, img, cap_mb, reporter)
        with store.lock(digest):
            rec = None if force else store.get(digest)
            if rec is not None:  # another pull converted it while we waited for the lock
                for r in refs:
                    store.tag(r, digest)
                reporter.done(f"up to date: {ref.familiar} is {short(digest)} "
                              "(converted by another pull)")
                return PullResult(rec, str(ref), digest, False, time.monotonic() - t0)
            workers = max(1, min(config["gateway"]["concurrent_downloads"], len(img.layers) or 1))
            # Everything is imported by now: move those objects out of the garbage
            # collector's sight. Its full collections during the conversion (tens of
            # thousands of tar members and tree nodes) and the one at exit then skip them
            # (about 0.1 s of a 20k-entry pull).
            gc.freeze()
            abort = threading.Event()  # one failure stops the other downloads
            feeds = [_Feed(cache, layer, reporter) for layer in img.layers]
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpcc-dl") as pool:
                futures = [pool.submit(_fetch_layer, client, img, layer, cache, feed, abort)
                           for layer, feed in zip(img.layers, feeds)]
                reporter.converting(total)
                try:
                    try:
                        rec, stats, report = _convert(store, digest, img, ref, refs, config,
                                                      feeds, futures, reporter, check_size,
                                                      signer)
                    except _Restarted:
                        # A download threw away bytes the conversion had already read
                        # (they failed their check; the blob is fetched again): convert
                        # once more, from the verified blobs.
                        for f in futures:
                            f.result()
                        reporter.line("a layer was downloaded again; converting again")
                        rec, stats, report = _convert(store, digest, img, ref, refs, config,
                                                      feeds, futures, reporter, check_size,
                                                      signer)
                except BaseException as e:
                    abort.set()
                    for f in futures:
                        f.cancel()
                    if not isinstance(e, HpccError):
                        raise
                    # Data that failed to decompress may just be a download that failed its
                    # digest check: report the download's error, which says what happened,
                    # and the one that stopped the others (not a sibling's DownloadAborted).
                    wait(futures)
                    root = root_failure(futures)
                    if root is not None:
                        raise root from None
                    raise
        secs = time.monotonic() - t0
        drops = drop_summary(report)
        reporter.done(f"pulled {ref.familiar} -> {rec.sqfs_path} "
                      f"({rec.meta.get('size', 0) / 1e6:.1f} MB squashfs, "
                      f"{report['entries']} entries, {secs:.1f}s)"
                      + (f"; {drops}" if drops else ""))
        return PullResult(rec, str(ref), digest, True, secs, report)
    finally:
        reporter.close()
        if own_client:
            client.close()


def _fit_cache(cache, store, img, cap_mb, reporter):
    """Keep the blob cache (partial downloads counted) under store.blob_cache_max_mb:
    remove the least recently used blobs no image of the store uses; refuse the pull when
    what it still has to download does not fit even so."""
    from hpcc.errors import StoreError

    need = sum(max(0, layer.size - cache.partial_size(layer.digest))
               for layer in img.layers if not cache.has(layer.digest, layer.size))
    keep = {layer.digest for layer in img.layers}
    keep |= {layer["digest"] for rec in store.images() for layer in rec.meta.get("layers", [])}
    cap = cap_mb << 20
    used, removed = cache.make_room(need, cap, keep)
    if removed:
        reporter.line(f"blob cache: removed {len(removed)} unused blob file(s) to stay under "
                      f"{cap_mb} MB")
    if used + need > cap:
        raise StoreError(f"the blob cache {cache.dir} holds {used / 1e6:.1f} MB (partial "
                         f"downloads included) and this pull needs {need / 1e6:.1f} MB more, "
                         f"beyond store.blob_cache_max_mb = {cap_mb}",
                         hint="'gateway gc --blobs' removes blobs no image uses; or raise "
                              "store.blob_cache_max_mb")


def _convert(store, digest, img, ref, refs, config, feeds, futures, reporter, check_size,
             signer=None):
    return convert_image(store, digest, [feed.source for feed in feeds], config=config,
                         image_config=img.config, meta=_meta(img, ref, signer), refs=refs,
                         progress=reporter.converted_bytes, check_size=check_size,
                         before_publish=lambda: [f.result() for f in futures])


class _Restarted(Exception):
    """A layer's partial file was discarded while the converter was reading it."""


def _fetch_layer(client, img, layer, cache, feed, abort):
    what = f"layer {layer.digest} of {img.ref.familiar}"
    try:
        path = client.fetch_blob(img.ref, layer.digest, layer.size, cache, feed.progress,
                                 what, abort=abort)
        client.check_layer(layer, path, what)
    except BaseException as e:
        abort.set()
        feed.finish(error=e)
        raise
    feed.finish(path=path)
    return path


class _Feed:
    """One layer's download as the converter sees it. When the conversion reaches a layer
    whose blob is still arriving (typically the big base layer), it reads the blob cache's
    partial file as it grows instead of waiting for the end: download and conversion of that
    layer overlap. Nothing is published before every download has passed its digest check
    (`before_publish`), so bytes read early are never trusted early."""

    def __init__(self, cache, layer, reporter):
        self.cache = cache
        self.layer = layer
        self.reporter = reporter
        self.cond = threading.Condition()
        self.started = False
        self.generation = 0         # +1 each time the download drops its bytes
        self.done = False
        self.path = None
        self.error = None

    def progress(self, event, digest, done, total):
        self.reporter.download(event, digest, done, total)
        with self.cond:
            if event in ("start", "cached"):
                self.started = True
            elif event == "restart":
                self.generation += 1
            self.cond.notify_all()

    def finish(self, path=None, error=None):
        with self.cond:
            self.done, self.path, self.error = True, path, error
            self.cond.notify_all()

    def source(self):
        """The LayerSource the flattener reads (called when the converter reaches it)."""
        with self.cond:
            if self.done and self.error is None:
                return LayerSource(self.path, self.layer.compression, self.layer.digest)
        compression = self._sniffed() or self.layer.compression
        return LayerSource(self.cache.partial_path(self.layer.digest), compression,
                           self.layer.digest, opener=self._open_growing)

    def _sniffed(self):
        from .manifest import sniff_compression

        with _Growing(self) as f:
            head = f.read(512)
        return sniff_compression(head)

    def _open_growing(self):
        return io.BufferedReader(_Growing(self), 1 << 20)


class _Growing(io.RawIOBase):
    """Reads a blob that is still being downloaded: waits for more bytes until the download
    ends; raises the download's error if it failed, and _Restarted when the download
    dropped the bytes of the partial file this reader follows."""

    def __init__(self, feed):
        self.feed = feed
        self.f = None
        self.verified = False       # reading the final, verified blob
        with feed.cond:
            while True:
                self.generation = feed.generation
                if feed.done:
                    if feed.error is not None:
                        raise feed.error
                    self.f = open(feed.path, "rb")
                    self.verified = True
                    return
                if feed.started:
                    try:
                        self.f = open(feed.cache.partial_path(feed.layer.digest), "rb")
                        return
                    except FileNotFoundError:
                        pass  # renamed into place meanwhile: done is about to be set
                feed.cond.wait(0.2)

    def readable(self):
        return True

    def readinto(self, b):
        feed = self.feed
        while True:
            n = self.f.readinto(b)
            if feed.generation != self.generation and not self.verified:
                raise _Restarted()
            if n:
                return n
            with feed.cond:
                if feed.done:
                    if feed.error is not None:
                        raise feed.error
                    return self.f.readinto(b) or 0
                feed.cond.wait(0.2)

    def close(self):
        if self.f is not None:
            self.f.close()
        super().close()


def _meta(img, ref, signer=None):
    cfg = img.config or {}
    return {
        "signature": signer,
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
