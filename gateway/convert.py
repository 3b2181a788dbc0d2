"""From layers to a published store image: the part `pull` and `import` share.

`convert_image()` takes the image's layer sources (oldest first, possibly still downloading:
each is a callable that returns a `LayerSource` when its blob is ready), flattens them
newest-first into a squashfs written under the store's .tmp/ directory, and publishes it
atomically with its metadata. The caller holds the store's per-image lock.
"""
import os
import time

from hpcc.errors import HpccError, SquashfsError
from hpcc.squashfs import SquashfsWriter

from .flatten import Flattener

# The gateway's levels for `level = 0` (README, "Compression defaults, and why"): with the
# default 128 KiB blocks, zstd 5 is the cheapest level whose image is no larger than
# mksquashfs's default (gzip 9); 128 KiB blocks start programs 10-20% faster than 512 KiB.
# The writer's own default stays the library's zstd 3.
DEFAULT_LEVEL = {"zstd": 5, "gzip": 6}


def writer_options(config):
    g = config["gateway"]
    compressor = g["compressor"]
    return {
        "compressor": compressor,
        "level": g["level"] or DEFAULT_LEVEL[compressor],
        "block_size": g["block_size"],
        "workers": g["workers"] or (os.cpu_count() or 1),
    }


def flatten_options(config):
    g = config["gateway"]
    return {
        "strip_setuid": g["strip_setuid"],
        "strip_sticky": g["strip_sticky"],
        "keep_user_xattrs": g["keep_user_xattrs"],
    }


def image_config_summary(image_config):
    """The parts of an OCI/Docker image config that the launcher uses."""
    c = (image_config or {}).get("config") or {}
    return {
        "Env": list(c.get("Env") or []),
        "Entrypoint": c.get("Entrypoint") or None,
        "Cmd": c.get("Cmd") or None,
        "WorkingDir": c.get("WorkingDir") or "",
        "User": c.get("User") or "",
        "Labels": dict(c.get("Labels") or {}),
        "StopSignal": c.get("StopSignal") or "",
    }


def created_epoch(image_config):
    """The image's creation time as seconds since the epoch (0 if unknown)."""
    created = (image_config or {}).get("created")
    if not created:
        return 0
    from datetime import datetime, timezone

    try:
        s = created.rstrip("Z")
        if "." in s:  # Go writes nanoseconds; Python parses at most microseconds
            head, frac = s.split(".", 1)
            digits = "".join(ch for ch in frac if ch.isdigit())[:6]
            s = f"{head}.{digits}" if digits else head
        return int(datetime.fromisoformat(s).replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        return 0


class _Syncer:
    """fdatasync the image being written every SYNC_STEP bytes, in a thread of its own.

    Publishing needs the image on stable storage (fsync, then rename). Flushing 300 MB at
    the end took 0.3 s on the development VM even with writeback already started (a
    virtual disk flushes its host's cache then); flushed as it grows, the final fsync is
    ~30 ms. The thread sleeps in the kernel, so it costs the conversion nothing."""

    SYNC_STEP = 32 << 20
    INTERVAL = 0.1

    def __init__(self, fd):
        import threading

        self.fd = fd
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hpcc-sync", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False

    def _run(self):
        synced = 0
        while not self.stop.wait(self.INTERVAL):
            try:
                size = os.fstat(self.fd).st_size
                if size - synced >= self.SYNC_STEP:
                    os.fdatasync(self.fd)
                    synced = size
            except OSError:
                return      # the final fsync reports what is wrong


def _size_checking(progress, check_size, path, every=0.25):
    """`progress` that also hands the growing image's size to `check_size` (every `every`
    seconds), whose exception stops the conversion early: a site's largest image is
    refused before the whole of an oversized one is written."""
    due = [0.0]

    def wrapped(n):
        if progress is not None:
            progress(n)
        now = time.monotonic()
        if now >= due[0]:
            due[0] = now + every
            try:
                size = os.path.getsize(path)
            except OSError:
                return
            check_size(size)
    return wrapped


def convert_image(store, digest, layer_getters, *, config, image_config, meta, refs=(),
                  progress=None, before_publish=None, check_size=None):
    """Flatten and publish. `layer_getters` (oldest first) return LayerSource objects.

    Returns (ImageRecord, stats, report). On any failure the temp file is removed and the
    exception propagates: nothing becomes visible in the store.
    """
    wopts = writer_options(config)
    tmp = store.temp_path(digest, ".sqfs")
    if check_size is not None:
        progress = _size_checking(progress, check_size, tmp)
    t0 = time.monotonic()
    try:
        with SquashfsWriter(tmp, **wopts) as writer, _Syncer(writer.fileno()):
            fl = Flattener(writer, default_mtime=created_epoch(image_config),
                           progress=progress, **flatten_options(config))
            for get in reversed(layer_getters):
                fl.add_layer(get())
            if before_publish is not None:
                before_publish()  # e.g. every download passed its digest check
            stats = writer.finish(fl.root)
            writer.sync()
        if check_size is not None:
            check_size(os.path.getsize(tmp))  # e.g. the site's largest image
        report = fl.report.as_dict()
        report["seconds"] = round(time.monotonic() - t0, 3)
        full_meta = dict(meta)
        full_meta["config"] = image_config_summary(image_config)
        full_meta["size"] = os.path.getsize(tmp)
        full_meta["squashfs"] = {k: wopts[k] for k in ("compressor", "level", "block_size")}
        full_meta["squashfs"].update({k: v for k, v in (stats or {}).items()
                                      if isinstance(v, (int, float, str))})
        full_meta["conversion"] = report
        full_meta["converted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rec = store.publish(digest, tmp, full_meta, refs)
        return rec, stats, report
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (HpccError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(e, OSError):
            raise SquashfsError(f"writing the image into {store.root} failed: "
                                f"{e.strerror or e}") from None
        raise
