"""Digest-addressed cache of downloaded blobs (layers, configs).

Layout under the cache root:

    sha256/<hex>            a complete, verified blob (mode 0444, never modified again)
    sha256/<hex>.partial    a download in progress (kept after an interruption, so the
                            next attempt resumes with an HTTP Range request)
    sha256/<hex>.lock       flock(2) target serialising writers of one digest across
                            threads and processes

A blob becomes visible under its final name only after its digest and size were checked
and its data fsynced, by an atomic rename; a reader never sees a partial blob.
"""
import errno
import fcntl
import hashlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from hpcc.errors import ImageError, StoreError
from hpcc.reference import DIGEST_RE
from hpcc.store import makedirs_durable

_CHUNK = 1 << 20
_WRITEBACK_STEP = 16 << 20    # start writeback of a download every this many bytes
_start_writeback_fn = None


def _start_writeback(fd, offset, length):
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing [offset, offset+length) to disk
    now, asynchronously, so the fsync before publishing a blob has little left to do (a
    300 MB layer: 0.6 s less at the end of its download). Only a hint: no error."""
    global _start_writeback_fn
    if _start_writeback_fn is None:
        try:
            from hpcc.squashfs._sqfs import lib

            _start_writeback_fn = lib.hpcc_start_writeback
        except (ImportError, AttributeError):
            _start_writeback_fn = False
    if _start_writeback_fn:
        _start_writeback_fn(fd, offset, length)


def _split(digest):
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ImageError(f"unsupported or malformed digest '{digest}'",
                         hint="only sha256 digests are supported")
    return digest.split(":", 1)


class Ingest:
    """An open download of one blob into the cache: append data, then commit.

    Created by BlobCache.ingest(); `offset` is how many bytes a previous interrupted
    attempt already left in the partial file (0 when starting fresh). The hash of those
    bytes is recomputed from the file so the final check covers every byte.
    """

    def __init__(self, cache, digest, size):
        self.cache = cache
        self.digest = digest
        self.size = size
        self.partial = cache._partial(digest)
        self.final = cache.path(digest)
        self._hash = hashlib.sha256()
        self._file = None
        self.committed = False
        self.offset = 0
        self._flushed = 0
        self.resumed = False        # bytes of an earlier connection are part of the data

    def _open(self):
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.partial, flags, 0o644)
        self._file = os.fdopen(fd, "r+b")
        # Re-hash what a previous attempt left; drop it if it cannot be a prefix.
        have = os.fstat(fd).st_size
        if self.size is not None and have > self.size:
            have = 0
        done = 0
        while done < have:
            chunk = self._file.read(min(_CHUNK, have - done))
            if not chunk:
                break
            self._hash.update(chunk)
            done += len(chunk)
        self._file.truncate(done)
        self._file.seek(done)
        self.offset = done
        self._flushed = done
        self.resumed = done > 0

    def restart(self):
        """Discard the partial data (the server ignored a Range request)."""
        self.resumed = False
        self._file.seek(0)
        self._file.truncate(0)
        self._hash = hashlib.sha256()
        self.offset = 0
        self._flushed = 0

    def write(self, data):
        if self.size is not None and self.offset + len(data) > self.size:
            raise ImageError(f"blob {self.digest} is larger than the {self.size} bytes "
                             "its manifest declares; the registry served corrupt data")
        try:
            self._file.write(data)
        except OSError as e:
            raise self.cache._io_error("write to", e) from None
        self._hash.update(data)
        self.offset += len(data)
        if self.offset - self._flushed >= _WRITEBACK_STEP:
            try:
                self._file.flush()
            except OSError as e:
                raise self.cache._io_error("write to", e) from None
            _start_writeback(self._file.fileno(), self._flushed, self.offset - self._flushed)
            self._flushed = self.offset

    def flush(self):
        """Push buffered data to the partial file (before giving up on an interrupted
        download, so the next attempt resumes after it)."""
        if self._file and not self._file.closed:
            try:
                self._file.flush()
            except OSError as e:
                raise self.cache._io_error("write to", e) from None

    def commit(self, what=None):
        """Verify size and digest, fsync and publish the blob under its final name.

        A mismatch deletes the partial file (it can never become right) and raises
        ImageError naming `what` (e.g. "layer sha256:... of IMAGE").
        """
        what = what or f"blob {self.digest}"
        actual = "sha256:" + self._hash.hexdigest()
        if self.size is not None and self.offset != self.size:
            self._discard()
            raise ImageError(f"{what} has {self.offset} bytes instead of {self.size}; "
                             "the registry served corrupt data")
        if actual != self.digest:
            self._discard()
            raise ImageError(f"{what} has digest {actual} instead of {self.digest}; "
                             "the registry served corrupt data")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), 0o444)
            self._file.close()
            os.rename(self.partial, self.final)
            self.cache._fsync_dir()
        except OSError as e:
            raise self.cache._io_error("write to", e) from None
        self.committed = True
        return self.final

    def _discard(self):
        try:
            self._file.close()
        finally:
            try:
                os.unlink(self.partial)
            except FileNotFoundError:
                pass

    def close(self):
        if self._file and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass      # already reported by write/flush; the partial file may be short


class BlobCache:
    """Digest-addressed blob store; safe for concurrent threads and processes."""

    def __init__(self, root):
        self.root = Path(root)
        self.dir = self.root / "sha256"
        self._tlocks = {}
        self._tlocks_guard = threading.Lock()

    def _io_error(self, verb, e):
        why = e.strerror or str(e)
        hint = ("'gateway gc --blobs' removes the layer blobs no image uses (partial "
                "downloads too); or free space there, or set store.blob_cache in the config "
                "to another path"
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                "set store.blob_cache in the config to a writable path")
        return StoreError(f"cannot {verb} the blob cache {self.dir}: {why}", hint=hint)

    def _ensure(self):
        try:
            makedirs_durable(self.dir)
        except OSError as e:
            raise StoreError(f"cannot create the blob cache {self.dir}: {e.strerror}",
                             hint="set store.blob_cache in the config to a writable path") from None

    def path(self, digest):
        _, hexd = _split(digest)
        return self.dir / hexd

    def _partial(self, digest):
        return self.dir / (_split(digest)[1] + ".partial")

    def partial_path(self, digest):
        """Where an in-progress download of `digest` is written (readers may follow it)."""
        return self._partial(digest)

    def _lockpath(self, digest):
        return self.dir / (_split(digest)[1] + ".lock")

    def has(self, digest, size=None):
        """True if the blob is complete in the cache (and of the given size, if given)."""
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def partial_size(self, digest):
        try:
            return os.stat(self._partial(digest)).st_size
        except FileNotFoundError:
            return 0

    def _fsync_dir(self):
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def lock(self, digest):
        """Exclusive lock on one digest: a thread lock (flock is per open file, and
        threads of one process must not share a partial file) plus an flock on
        sha256/<hex>.lock against other processes."""
        self._ensure()
        with self._tlocks_guard:
            tlock = self._tlocks.setdefault(digest, threading.Lock())
        with tlock:
            try:
                fd = os.open(self._lockpath(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o644)
            except OSError as e:
                raise self._io_error("lock a file in", e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @contextmanager
    def ingest(self, digest, size=None):
        """Context for writing one blob; yields an Ingest, or None if the blob is
        already complete (another thread or process finished it while we waited).

        Hold the digest lock for the whole download. If the body raises, the partial
        file is kept (flushed) for a later Range resume, unless the error was a
        verification failure (which already removed it).
        """
        with self.lock(digest):
            if self.has(digest, size):
                yield None
                return
            ing = Ingest(self, digest, size)
            try:
                ing._open()
            except OSError as e:
                raise self._io_error("write to", e) from None
            try:
                yield ing
            finally:
                if not ing.committed:
                    ing.close()

    def put_bytes(self, digest, data, what=None):
        """Store an in-memory blob (a config, a manifest) after verifying it."""
        with self.ingest(digest, len(data)) as ing:
            if ing is None:
                return self.path(digest)
            ing.restart()
            ing.write(data)
            return ing.commit(what)

    def prune(self, keep_digests, dry_run=False):
        """Remove every blob and partial file whose digest is not in `keep_digests`.

        Returns the paths removed (or, with dry_run, that would be removed). A digest
        whose lock is held (a download in progress) is skipped.
        """
        keep = {_split(d)[1] for d in keep_digests}
        removed = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return removed
        hexes = {n.split(".", 1)[0] for n in names}
        for hexd in sorted(hexes - keep):
            if not (len(hexd) == 64 and all(c in "0123456789abcdef" for c in hexd)):
                continue
            lockp = self.dir / (hexd + ".lock")
            try:
                fd = os.open(lockp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # someone is downloading it right now
                    raise
                for name in (hexd, hexd + ".partial"):
                    p = self.dir / name
                    if not p.exists():
                        continue
                    if not dry_run:
                        try:
                            p.unlink()
                        except FileNotFoundError:
                            continue
                    removed.append(p)
                if not dry_run:
                    try:
                        lockp.unlink()
                    except FileNotFoundError:
                        pass
            finally:
                os.close(fd)
        return removed

    def usage(self):
        """Bytes the cache holds: complete blobs and partial downloads alike."""
        total = 0
        try:
            with os.scandir(self.dir) as it:
                for e in it:
                    if not e.name.endswith(".lock"):
                        try:
                            total += e.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            pass
        return total

    def make_room(self, need, cap, keep_digests):
        """Remove the least recently used blobs and partial files whose digest is not in
        `keep_digests` (nor locked by a download) until `need` more bytes fit under `cap`.
        Returns (bytes held after, paths removed)."""
        used = self.usage()
        removed = []
        if used + need <= cap:
            return used, removed
        keep = {_split(d)[1] for d in keep_digests}
        entries = []
        try:
            with os.scandir(self.dir) as it:
                for e in it:
                    hexd = e.name.split(".", 1)[0]
                    if e.name.endswith(".lock") or hexd in keep or len(hexd) != 64:
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append((max(st.st_atime, st.st_mtime), st.st_size, hexd))
        except FileNotFoundError:
            return used, removed
        for _when, size, hexd in sorted(entries):
            if used + need <= cap:
                break
            gone = self.prune_one(hexd)
            if gone:
                removed += gone
                used -= size
        return used, removed

    def prune_one(self, hexd):
        """Remove one digest's blob and partial file unless a download holds its lock."""
        lockp = self.dir / (hexd + ".lock")
        try:
            fd = os.open(lockp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return []
        removed = []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return []
            for name in (hexd, hexd + ".partial"):
                try:
                    os.unlink(self.dir / name)
                    removed.append(self.dir / name)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
        return removed

    def digests(self):
        """Digests of the complete blobs in the cache."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted("sha256:" + n for n in names if len(n) == 64 and "." not in n)


def blob_cache_dir(config, store_root=None):
    """The blob cache root from config store.blob_cache, else <store>/.blobs."""
    from hpcc.config import expand_path
    configured = (config.get("store", {}) or {}).get("blob_cache") or ""
    if configured:
        return Path(expand_path(configured))
    root = store_root or expand_path((config.get("store", {}) or {}).get("path", ""))
    return Path(root) / ".blobs"
