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


def load_config_cached(cache):
    """The site config (hpcc.config.load_config, not validated against the schema: a text
    that passed once is not checked again), through `cache`."""
    from .config import config_path, load_config
    path, _ = config_path()
    if not os.path.exists(path):
        return load_config(validate_schema=False)  # defaults, or the one-line error
    return cache.get(os.path.abspath(path), lambda: load_config(path, validate_schema=False))
