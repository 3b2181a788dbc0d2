"""The image store: one squashfs file and one JSON file per image, on a shared filesystem.

Layout of a store root::

    sha256-<hex>.sqfs            the flattened image (published last-but-one)
    sha256-<hex>.json            its metadata; its presence is what makes the image visible
    refs/<domain>/<path>/@<tag>  "sha256:<hex>\\n": tag index, so a name resolves in O(1)
    .tmp/                        images being written (removed by `gateway gc` when abandoned)
    .locks/sha256-<hex>.lock     flock held while an image is converted
    .blobs/                      default layer blob cache (gateway only)

`<hex>` is the manifest digest of the (platform-specific) image. Tags live in files named
`@<tag>` because `@` never occurs in a repository path, so `a/b:c` and `a/b/c:x` cannot
collide. Publishing is temp file + fsync + rename; a crash or kill leaves only debris under
.tmp/ (and possibly a .sqfs without its .json), which is invisible to resolution and removed
by `gc()`.

This module is one store and nothing else (which of several stores answers a name is
hpcc.resolve); it is long because a store's operations (lookup, publish, tag, remove, gc)
share its layout and locking, which one class keeps in one place. It is on the launch path:
it imports only the standard library.
"""
import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager

from .errors import ImageNotFound, StoreError
from .image import ImageRecord
from .reference import DIGEST_RE, local_alternative, parse_reference

META_SCHEMA = 1
PRIVATE_DIR = ".private"   # <site store>/.private/<uid>/: images only <uid> may read


class StoreAccessDenied(StoreError):
    """A store path the caller may not read (an image or tag there is not "missing")."""


def store_os_error(verb, path, e, root=None):
    """StoreError for an OSError on a store path: one line naming the path and the cause,
    with what to do about it."""
    why = e.strerror or str(e)
    if e.errno == errno.EROFS:
        hint = "the store is on a read-only filesystem; use another store (--store DIR)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = (f"you may not write to the store {root or os.path.dirname(path)}: run this as "
                "its owner, or use your own store (hpcc pull, or --store DIR)")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space there ('gateway gc' removes debris and unused images' blobs)"
    else:
        hint = None
    return StoreError(f"cannot {verb} {path}: {why}", hint=hint)


def digest_stem(digest):
    """'sha256:abc...' -> 'sha256-abc...' (file name stem)."""
    return digest.replace(":", "-", 1)


def _stem_digest(stem):
    return stem.replace("-", ":", 1)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def makedirs_durable(path, mode=0o755):
    """os.makedirs, and each directory it creates is fsynced in its parent, so that a file
    published under it after a crash still has its path (refs/<registry>/..., .blobs)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
        _fsync_dir(os.path.dirname(d))


def write_atomic(path, data, mode=0o644, tmpdir=None):
    """Write bytes to `path` via a temp file in `tmpdir` (same filesystem) + fsync + rename."""
    d = tmpdir or os.path.dirname(path)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))


class Store:
    """An image store rooted at a directory (the site store or a user's own)."""

    def __init__(self, root, *, create=False):
        self.root = os.path.abspath(root)
        if create:
            self.ensure()

    # ---- construction -------------------------------------------------------------
    @classmethod
    def site(cls, config, *, create=False):
        from .config import expand_path

        root = os.environ.get("HPCC_STORE") or config["store"]["path"]
        return cls(expand_path(root), create=create)

    @classmethod
    def user(cls, config, *, create=False):
        from .config import expand_path

        root = os.environ.get("HPCC_USER_STORE") or config["store"]["user_path"]
        return cls(expand_path(root), create=create)

    @classmethod
    def private(cls, site_root, uid):
        """The store of images pulled for `uid` with its own registry credentials (only
        that user can enter it; see gateway/private.py)."""
        return cls(os.path.join(site_root, PRIVATE_DIR, str(int(uid))))

    def ensure(self):
        for d in (self.root, self.tmp_dir, self.lock_dir, self.refs_dir):
            try:
                makedirs_durable(d)
            except OSError as e:
                raise store_os_error("create", e.filename or d, e, self.root) from None

    # ---- paths --------------------------------------------------------------------
    @property
    def tmp_dir(self):
        return os.path.join(self.root, ".tmp")

    @property
    def lock_dir(self):
        return os.path.join(self.root, ".locks")

    @property
    def refs_dir(self):
        return os.path.join(self.root, "refs")

    def sqfs_path(self, digest):
        return os.path.join(self.root, digest_stem(digest) + ".sqfs")

    def meta_path(self, digest):
        return os.path.join(self.root, digest_stem(digest) + ".json")

    def ref_path(self, ref):
        """Index file for a tagged Reference."""
        return os.path.join(self.refs_dir, ref.domain, *ref.path.split("/"), "@" + ref.tag)

    # ---- resolution (launch path: O(1) file operations) ------------------------------
    def get(self, digest):
        """ImageRecord for a digest, or None when the image is not (fully) published."""
        try:
            with open(self.meta_path(digest), "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return None
        except PermissionError:
            raise StoreAccessDenied(f"cannot read {self.meta_path(digest)}: permission denied "
                                    f"(image {digest} is in {self.root})",
                                    hint="ask the store's owner for access") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"image metadata {self.meta_path(digest)} is unreadable: {e}",
                             hint="'gateway gc' removes the broken image; then pull it "
                                  "again") from None
        return ImageRecord(digest, self.sqfs_path(digest), meta, self)

    def lookup_tag(self, ref):
        """Digest a tag points to in this store, or None."""
        try:
            with open(self.ref_path(ref), "r") as f:
                digest = f.read().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError as e:
            raise StoreAccessDenied(f"cannot read {e.filename or self.ref_path(ref)}: "
                                    f"permission denied (looking up {ref} in {self.root})",
                                    hint="ask the store's owner for access") from None
        if not DIGEST_RE.match(digest):
            raise StoreError(f"corrupt reference file {self.ref_path(ref)}",
                             hint="run 'gateway gc' or pull the image again")
        return digest

    def find(self, name):
        """ImageRecord for a name (ref, digest, sha256-<hex>) or None. Raises on a bad name."""
        if name.startswith("sha256-"):
            name = _stem_digest(name)
        if DIGEST_RE.match(name):
            return self.get(name)
        ref = parse_reference(name)
        digest = ref.digest or self._tagged(name, ref)[1]
        if digest is None:
            return None
        return self.get(digest)

    def _tagged(self, name, ref):
        """(the tag's Reference, its digest or None) for a name without a digest; an
        imported image's local name (localhost/NAME) answers to the short NAME."""
        digest = self.lookup_tag(ref)
        if digest is None:
            local = local_alternative(name)
            if local is not None:
                local_digest = self.lookup_tag(local)
                if local_digest is not None:
                    return local, local_digest
        return ref, digest

    def resolve(self, name):
        rec = self.find(name)
        if rec is None:
            raise ImageNotFound(f"image '{name}' not found in the store {self.root}",
                                hint=f"pull it with 'gateway pull {name}' (or 'hpcc pull {name}')")
        return rec

    # ---- publication --------------------------------------------------------------
    @contextmanager
    def lock(self, digest, *, blocking=True):
        """Exclusive per-image lock (flock). Yields True, or False if non-blocking and busy."""
        self.ensure()
        path = os.path.join(self.lock_dir, digest_stem(digest) + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise store_os_error("open the lock file", path, e, self.root) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def temp_path(self, digest, suffix):
        self.ensure()
        return os.path.join(self.tmp_dir,
                            f"{digest_stem(digest)}.{os.getpid()}.{time.monotonic_ns()}{suffix}")

    def publish(self, digest, sqfs_tmp, meta, refs=()):
        """Move a finished squashfs into place and write its metadata, then the tag refs.

        The caller holds `lock(digest)`. `sqfs_tmp` must be in this store's .tmp directory.
        """
        meta = dict(meta)
        meta.setdefault("schema", META_SCHEMA)
        meta["digest"] = digest
        if isinstance(meta.get("squashfs"), dict):   # the writer saw the temporary name
            meta["squashfs"] = dict(meta["squashfs"], path=self.sqfs_path(digest))
        try:
            fd = os.open(sqfs_tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(sqfs_tmp, 0o644)
            os.rename(sqfs_tmp, self.sqfs_path(digest))
            write_atomic(self.meta_path(digest),
                          json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n",
                          tmpdir=self.tmp_dir)
        except OSError as e:
            raise store_os_error("publish", e.filename or self.sqfs_path(digest), e,
                                 self.root) from None
        for ref in refs:
            self.tag(ref, digest)
        return self.get(digest)

    def tag(self, ref, digest):
        if not ref.tag:
            return
        path = self.ref_path(ref)
        try:
            makedirs_durable(os.path.dirname(path))
            write_atomic(path, (digest + "\n").encode(), tmpdir=self.tmp_dir)
        except OSError as e:
            raise store_os_error("write the tag file", e.filename or path, e, self.root) from None

    # ---- listing, removal, garbage collection (admin operations; may scan) ----------
    def iter_refs(self):
        """(Reference string, digest) for every tag in the index."""
        base = self.refs_dir
        for dirpath, _dirs, files in os.walk(base):
            for fname in files:
                if not fname.startswith("@"):
                    continue
                rel = os.path.relpath(dirpath, base).split(os.sep)
                if len(rel) < 2:
                    continue
                name = f"{rel[0]}/{'/'.join(rel[1:])}:{fname[1:]}"
                try:
                    with open(os.path.join(dirpath, fname)) as f:
                        digest = f.read().strip()
                except OSError:
                    continue
                yield name, digest

    def images(self):
        """Every published image, with the tags that point to it."""
        tags = {}
        for name, digest in self.iter_refs():
            tags.setdefault(digest, []).append(name)
        out = []
        for fname in self._listdir():
            if not (fname.startswith("sha256-") and fname.endswith(".json")):
                continue
            digest = _stem_digest(fname[:-5])
            try:
                rec = self.get(digest)
            except StoreError:
                continue            # listed by broken_images()
            if rec is None or not os.path.exists(rec.sqfs_path):
                continue
            rec.meta["tags"] = sorted(tags.get(digest, []))
            out.append(rec)
        return out

    def _listdir(self):
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise store_os_error("list the store", self.root, e, self.root) from None

    def broken_images(self):
        """Images whose metadata cannot be read or parsed: dicts of digest, metadata path,
        squashfs path, its size (or None), the error, and whether it is only that the caller
        may not read it ("denied"). `gc()` removes the others."""
        out = []
        for fname in self._listdir():
            if not (fname.startswith("sha256-") and fname.endswith(".json")):
                continue
            digest = _stem_digest(fname[:-5])
            if not DIGEST_RE.match(digest):
                continue
            try:
                self.get(digest)
                continue
            except StoreAccessDenied as e:
                error, denied = e.message, True
            except StoreError as e:
                error, denied = e.message, False
            sqfs = self.sqfs_path(digest)
            try:
                size = os.stat(sqfs).st_size
            except OSError:
                size = None
            out.append({"digest": digest, "metadata": self.meta_path(digest), "path": sqfs,
                        "size": size, "error": error, "denied": denied})
        return out

    def remove(self, name):
        """Remove a tag (and the image if no tag is left), or an image by digest with its tags.

        Returns (removed_tags, removed_digest_or_None).
        """
        if name.startswith("sha256-"):
            name = _stem_digest(name)
        removed_tags = []
        if DIGEST_RE.match(name):
            digest = name
            try:
                missing = self.get(digest) is None
            except StoreAccessDenied:
                raise
            except StoreError:
                missing = False             # broken metadata: removing it is the cure
            if missing:
                raise ImageNotFound(f"image '{name}' not found in the store {self.root}")
            for ref_name, d in list(self.iter_refs()):
                if d == digest:
                    self._unlink_ref(parse_reference(ref_name))
                    removed_tags.append(ref_name)
            self._remove_image(digest)
            return removed_tags, digest
        ref = parse_reference(name)
        if ref.digest:
            return self.remove(ref.digest)
        ref, digest = self._tagged(name, ref)
        if digest is None:
            raise ImageNotFound(f"image '{name}' not found in the store {self.root}")
        self._unlink_ref(ref)
        removed_tags.append(str(ref))
        if not any(d == digest for _n, d in self.iter_refs()):
            self._remove_image(digest)
            return removed_tags, digest
        return removed_tags, None

    def _unlink(self, path, what="remove"):
        """Remove one file of the store: False if it was gone already; any other failure is
        one StoreError line ("cannot <what> <path>: ...")."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise store_os_error(what, path, e, self.root) from None

    def _unlink_ref(self, ref):
        path = self.ref_path(ref)
        if not self._unlink(path, "remove the tag file"):
            return
        # prune empty parent directories up to refs/
        d = os.path.dirname(path)
        while d.startswith(self.refs_dir + os.sep):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def _remove_image(self, digest):
        # metadata first: the image disappears atomically for resolvers
        for p in (self.meta_path(digest), self.sqfs_path(digest)):
            self._unlink(p)

    def gc(self, *, dry_run=False, elsewhere=()):
        """Remove debris: abandoned temp files, squashfs files without metadata, dangling
        refs, unused lock files. Never touches an image whose lock is held. A tag of an
        image that one of the `elsewhere` stores holds is not dangling (a user's tag of a
        site image)."""
        removed = []

        def rm(path):
            removed.append(path)
            if not dry_run:
                self._unlink(path)

        # images whose metadata is unreadable (invisible to images(), holding their space)
        for bad in self.broken_images():
            if bad["denied"]:
                continue            # not ours to judge: we cannot even read it
            with self.lock(bad["digest"], blocking=False) as got:
                if got:
                    rm(bad["metadata"])
                    if bad["size"] is not None:
                        rm(bad["path"])

        # temp files: <stem>.<pid>.<ns>.<suffix>; free lock => abandoned
        if os.path.isdir(self.tmp_dir):
            for fname in os.listdir(self.tmp_dir):
                stem = fname.split(".", 1)[0]
                if fname.startswith(".") or not stem.startswith("sha256-"):
                    # atomic-write temps of refs/metadata: abandoned if older than a minute
                    p = os.path.join(self.tmp_dir, fname)
                    try:
                        if time.time() - os.lstat(p).st_mtime > 60:
                            rm(p)
                    except FileNotFoundError:
                        pass
                    continue
                with self.lock(_stem_digest(stem), blocking=False) as got:
                    if got:
                        rm(os.path.join(self.tmp_dir, fname))
        # squashfs without metadata (crash between the two renames)
        for fname in os.listdir(self.root) if os.path.isdir(self.root) else ():
            if fname.startswith("sha256-") and fname.endswith(".sqfs"):
                digest = _stem_digest(fname[:-5])
                if not os.path.exists(self.meta_path(digest)):
                    with self.lock(digest, blocking=False) as got:
                        if got:
                            rm(os.path.join(self.root, fname))
        # dangling tags
        for name, digest in list(self.iter_refs()):
            if not DIGEST_RE.match(digest) or not any(
                    os.path.exists(st.meta_path(digest)) for st in (self, *elsewhere)):
                ref = parse_reference(name)
                removed.append(self.ref_path(ref))
                if not dry_run:
                    self._unlink_ref(ref)
        # lock files of images that no longer exist and are not being converted
        if os.path.isdir(self.lock_dir):
            for fname in os.listdir(self.lock_dir):
                if not fname.endswith(".lock"):
                    continue
                digest = _stem_digest(fname[:-5])
                if os.path.exists(self.meta_path(digest)):
                    continue
                with self.lock(digest, blocking=False) as got:
                    if got:
                        rm(os.path.join(self.lock_dir, fname))
        return removed
