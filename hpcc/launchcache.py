"""One small cache for what every launch would otherwise parse again: the site config (TOML)
and image metadata (JSON), keyed by the file's (inode, size, mtime, device).

Kept with marshal (built in), so a warm launch imports neither tomllib nor json (~8 ms).
`hpcc run` keeps it in the caller's staging directory; the Slurm helper (root) keeps it in
its root-only directory /run/hpcc-stepd. Only the owner (or root) can write either, and the
file holds nothing but plain dicts, lists and strings. Only `os` is imported here.
"""
import os


class LaunchCache:
    """A dict {path: (stat key, value)} loaded from, and saved to, `path`. With no path the
    caller's staging directory is used; when none can be had the cache is a no-op."""

    LIMIT = 64

    def __init__(self, path=None):
        self.path = path
        self.data = {}
        self.dirty = False
        try:
            if self.path is None:
                from .runtime.namespaces import stage_dir
                self.path = os.path.join(stage_dir(os.geteuid() == 0), "launch-cache")
            import marshal
            with open(self.path, "rb") as f:
                self.data = marshal.load(f)
            if not isinstance(self.data, dict):
                self.data = {}
        except Exception:  # noqa: BLE001 - a cache that cannot be read is an empty one
            self.data = {}

    @staticmethod
    def key(path):
        st = os.stat(path)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)

    def get(self, path, load):
        """The cached value for the file at `path`, else load() (then remembered)."""
        try:
            key = self.key(path)
        except OSError:
            return load()
        hit = self.data.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = load()
        self.data[path] = (key, value)
        self.dirty = True
        return value

    def save(self):
        if not (self.dirty and self.path):
            return
        import marshal
        tmp = f"{self.path}.{os.getpid()}"
        try:
            if len(self.data) > self.LIMIT:
                self.data = dict(list(self.data.items())[-(self.LIMIT // 2):])
            with open(tmp, "wb") as f:
                marshal.dump(self.data, f)
            os.rename(tmp, self.path)
            self.dirty = False
        except (OSError, ValueError):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_config_cached(cache, warn=None):
    """The site config (hpcc.config.load_config, not validated against the schema: a text
    that passed once is not checked again), through `cache`. When the file is read (a new
    or changed text), `warn` (a callable) gets one line per unknown key or wrong type: so
    each text is warned about once, and a warm launch costs nothing."""
    from .config import config_path, load_config
    path, _ = config_path()
    if not os.path.exists(path):
        return load_config(validate_schema=False)  # defaults, or the one-line error

    def load():
        cfg = load_config(path, validate_schema=False)
        if warn is not None:
            from .config import quick_check
            for problem in quick_check(cfg):
                warn(f"warning: {path}: {problem}; 'hpcc config check' validates the file")
        return cfg
    return cache.get(os.path.abspath(path), load)


def _state(path):
    """What a resolution saw at `path`: its stat key, or None when it is absent (an error
    other than absence is kept as its errno, so that it is seen again next time)."""
    try:
        return LaunchCache.key(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return e.errno


def resolve_cached(name, config, cache):
    """The ImageRecord of a store name (NAME[:TAG]) as hpcc.resolve.resolve_image finds it,
    through `cache`: a warm launch checks the files that resolution read (the tag files in
    every store it looks in, the image's metadata) by stat and reuses the answer, so it
    imports neither the store (json, re, enum: ~10 ms) nor parses anything. When one of
    those files changed, the store resolves the name again."""
    from .image import ImageRecord
    env = os.environ
    key = "\0resolve\0" + "\0".join((
        name, str(os.getuid()), env.get("HPCC_USER_STORE", ""), env.get("HPCC_STORE", ""),
        env.get("XDG_DATA_HOME", ""), env.get("HOME", ""),
        str(config["store"].get("path")), str(config["store"].get("user_path"))))
    hit = cache.data.get(key)
    if hit is not None:
        checks, digest, sqfs, meta_path = hit[1]
        if all(_state(p) == k for p, k in checks):
            meta = cache.data.get(meta_path)
            if meta is not None and meta[0] == checks[-1][1]:
                return ImageRecord(digest, sqfs, meta[1], None)
    from .resolve import resolution_paths, resolve_image
    rec = resolve_image(name, config)
    paths = resolution_paths(name, config)
    if rec.store is None or not paths:
        return rec
    meta_path = rec.store.meta_path(rec.digest)
    checks = [(p, _state(p)) for p in paths] + [(meta_path, _state(meta_path))]
    if not isinstance(checks[-1][1], tuple):
        return rec
    cache.data[meta_path] = (checks[-1][1], rec.meta)
    cache.data[key] = (None, (checks, rec.digest, rec.sqfs_path, meta_path))
    cache.dirty = True
    return rec
