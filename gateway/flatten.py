"""Flatten an image's layers into a squashfs in one streaming pass.

Layers are read newest-first, each as a decompressing tar stream. For every entry we decide
at once whether an upper layer shadows it; if not, it is added to the in-memory tree and
(for regular files) its data flows straight from the tar stream into libsquashfs's block
processor. Nothing of the root filesystem is ever written to disk. When the last (oldest)
layer is done, the writer serialises the tree (inodes, directories, tables).

Shadowing rules (OCI image spec, "Applying Changesets"), for an entry at path P of layer N:
- an upper layer has an entry at P: it wins (two directories merge: the upper's metadata
  wins, unless the upper directory was only implied by a deeper entry);
- an upper layer deleted P or one of its parents (`.wh.<name>`), or made a parent opaque
  (`.wh..wh..opq`): P is hidden;
- an upper layer put a non-directory at one of P's parents: P is hidden.
Whiteouts and opaque markers apply to lower layers only, never to their own layer. Within one
layer a later entry at the same path replaces an earlier one, as tar extraction would.

Untrusted input, handled so that nothing escapes and nothing privileged enters:
- leading "/" is stripped (as tar and umoci do); any ".." component refuses the image;
- an entry below a symbolic link of the image is dropped (it would be written through the
  link by an extracting tool), as is a hard link to a missing or non-file target;
- device nodes are dropped; setuid/setgid (and optionally sticky) bits are stripped;
- only user.* extended attributes are kept (security.capability never enters an image).
Every drop is counted and reported in the conversion report.
"""
import gzip
import stat
import tarfile
import zlib

from hpcc.errors import ImageError
from hpcc.squashfs.tree import Dir, Fifo, File, Symlink

from .layersource import LayerSource
from .tarstream import TarReader

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def iter_tar(stream):
    """(reader, members) of a layer stream: the TarReader and an iterator of its members,
    in order; the current member's data can be taken from the reader before the next one is
    requested. (None, empty iterator) for a zero-byte layer."""
    tr = TarReader(stream)
    try:
        first = tr.next()
    except tarfile.ReadError as e:
        if str(e) == "empty file":  # a zero-byte layer: nothing in it
            return None, iter(())
        raise

    def members():
        m = first
        while m is not None:
            yield m
            m = tr.next()

    return tr, members()


class Report:
    """What the conversion did besides copying: counts of dropped or altered entries."""

    def __init__(self):
        self.entries = 0
        self.files = 0
        self.bytes = 0
        self.shadowed = 0
        self.dropped = {}
        self.stripped_bits = 0
        self.dropped_xattrs = 0
        self.warnings = []

    def drop(self, why, path):
        self.dropped[why] = self.dropped.get(why, 0) + 1
        if len(self.warnings) < 50:
            self.warnings.append(f"{why}: /{path}")

    def as_dict(self):
        return {
            "entries": self.entries, "files": self.files, "bytes": self.bytes,
            "shadowed": self.shadowed, "dropped": dict(self.dropped),
            "stripped_mode_bits": self.stripped_bits, "dropped_xattrs": self.dropped_xattrs,
            "warnings": list(self.warnings),
        }


def normalize_path(name, layer):
    """Tar member name -> relative path ('' for the root). Refuse traversal."""
    if "/." not in name and "//" not in name and name[:1] not in ("/", ".", "") and \
            name[-1] != "/":
        return name     # no empty, "." or ".." component: already normal
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise ImageError(
                f"layer {layer} contains the path '{name}', which leaves the image root; "
                "refusing this image (it is broken or malicious)")
        parts.append(comp)
    return "/".join(parts)


class Flattener:
    """Builds the flattened tree of an image, streaming file data into a SquashfsWriter."""

    def __init__(self, writer, *, strip_setuid=True, strip_sticky=False, keep_user_xattrs=True,
                 default_mtime=0, progress=None):
        self.writer = writer
        self.strip_mask = 0
        if strip_setuid:
            self.strip_mask |= stat.S_ISUID | stat.S_ISGID
        if strip_sticky:
            self.strip_mask |= stat.S_ISVTX
        self.keep_user_xattrs = keep_user_xattrs
        self.default_mtime = int(default_mtime)
        self.progress = progress
        self.root = Dir(mode=0o755, uid=0, gid=0, mtime=self.default_mtime, xattrs=None,
                        children={})
        self.report = Report()
        # Shadow state left by the layers above the current one.
        self._deleted = set()     # paths whited out (the path and all below it)
        self._opaque = set()      # directories whose lower content is hidden
        # Directories that exist only because a deeper entry needed them: a lower layer's
        # explicit entry for them still supplies their metadata.
        self._implied = {""}
        self._root_explicit = False
        self._hides_below = {}    # directory -> _hides_children(directory)
        self._last_parent = None  # the last directory _parent_dir() found, and its Dir
        self._last_parent_dir = None

    # ---- public --------------------------------------------------------------------
    def add_layers(self, layers):
        """Flatten `layers`, given oldest first (image order)."""
        for layer in reversed(layers):
            self.add_layer(layer)
        return self.root

    def add_layer(self, layer):
        label = layer.digest or layer.path
        pending_deleted, pending_opaque = set(), set()
        in_layer = {}             # path -> node written from this layer
        shadowed_files = set()    # regular files of this layer hidden by upper layers
        wanted = {}               # hidden target path -> [link paths] needing its data
        try:
            stream = layer.open()
        except OSError as e:
            raise ImageError(f"cannot open layer {label}: {e.strerror}") from None
        try:
            with stream:
                tf, members = iter_tar(stream)
                for member in members:
                    self._entry(tf, member, label, pending_deleted, pending_opaque, in_layer,
                                shadowed_files, wanted)
        except ImageError:
            raise
        except _corrupt_errors() as e:
            raise ImageError(f"layer {label} is truncated or corrupt ({_why(e)}); "
                             "pull it again, or report the image to its publisher") from None
        if wanted:
            self._recover_hidden_link_targets(layer, label, wanted)
        self._deleted |= pending_deleted
        self._opaque |= pending_opaque
        self._hides_below.clear()

    # ---- one tar entry ----------------------------------------------------------------
    def _entry(self, tf, m, label, pending_deleted, pending_opaque, in_layer, shadowed_files,
               wanted):
        rep = self.report
        rep.entries += 1
        path = normalize_path(m.name, label)
        parent, _, base = path.rpartition("/")

        # Whiteouts: record for the layers below; they are never entries themselves.
        if base.startswith(WH_PREFIX):
            if base == WH_OPAQUE:
                if not self._hidden(parent):
                    pending_opaque.add(parent)
            else:
                target = base[len(WH_PREFIX):]
                if target in ("", ".", ".."):
                    rep.drop("malformed whiteout", path)
                else:
                    pending_deleted.add(f"{parent}/{target}" if parent else target)
            return

        if path == "":
            if m.isdir() and not self._root_explicit:
                self._set_meta(self.root, m, path)
                self._root_explicit = True
            return

        if self._hidden(path):
            rep.shadowed += 1
            if m.type in _FILE_TYPES:
                shadowed_files.add(path)
            return

        parent_dir = self._parent_dir(parent, path)
        if parent_dir is None:
            return
        existing = parent_dir.children.get(base)
        if existing is not None and path not in in_layer:
            # An upper layer decided this path.
            if isinstance(existing, Dir) and m.isdir() and path in self._implied:
                self._set_meta(existing, m, path)
                self._implied.discard(path)
                in_layer[path] = existing
                return
            rep.shadowed += 1
            if m.type in _FILE_TYPES:
                shadowed_files.add(path)
            return

        node = self._make_node(tf, m, path, label, in_layer, shadowed_files, wanted)
        if node is None:
            return
        if existing is not None and isinstance(existing, Dir) and isinstance(node, Dir):
            # Same directory twice in one layer: keep children, take the later metadata.
            self._copy_meta(existing, node)
            self._implied.discard(path)
            return
        if existing is not None and isinstance(existing, Dir):
            self._forget_subtree(path)
        parent_dir.children[base] = node
        in_layer[path] = node
        self._implied.discard(path)

    def _hidden(self, path):
        """Is `path` hidden by a whiteout or opaque directory of an upper layer?"""
        if not self._deleted and not self._opaque:
            return False
        if path in self._deleted:
            return True
        return self._hides_children(path.rpartition("/")[0])

    def _hides_children(self, d):
        """Does an upper layer hide what lies below directory path `d` (d or one of its
        parents whited out or opaque)? Cached per directory: a layer's entries come
        directory by directory."""
        hidden = self._hides_below.get(d)
        if hidden is None:
            hidden = d in self._opaque or (d != "" and (
                d in self._deleted or self._hides_children(d.rpartition("/")[0])))
            self._hides_below[d] = hidden
        return hidden

    def _parent_dir(self, parent, path):
        """The Dir for `parent`, creating implied directories; None if the entry must go."""
        node = self.root
        if not parent:
            return node
        if parent == self._last_parent:   # entries come directory by directory
            return self._last_parent_dir
        walked = []
        for comp in parent.split("/"):
            walked.append(comp)
            child = node.children.get(comp)
            if child is None:
                child = Dir(mode=0o755, uid=0, gid=0, mtime=self.default_mtime, xattrs=None,
                            children={})
                node.children[comp] = child
                self._implied.add("/".join(walked))
            elif not isinstance(child, Dir):
                if isinstance(child, Symlink):
                    self.report.drop("entry below a symbolic link", path)
                else:
                    self.report.shadowed += 1
                return None
            node = child
        self._last_parent, self._last_parent_dir = parent, node
        return node

    def _forget_subtree(self, path):
        """A directory at `path` is being replaced: forget what was known below it."""
        prefix = path + "/"
        self._implied = {p for p in self._implied if not p.startswith(prefix)}
        self._last_parent = self._last_parent_dir = None

    def _make_node(self, tf, m, path, label, in_layer, shadowed_files, wanted):
        rep = self.report
        if m.type in _FILE_TYPES:
            node = File(mode=0, uid=0, gid=0, mtime=0, xattrs=None, data=None)
            self._set_meta(node, m, path)
            if m.size:
                node.data = self._write_data(tf, m)
            rep.files += 1
            rep.bytes += m.size
            return node
        if m.isdir():
            node = Dir(mode=0, uid=0, gid=0, mtime=0, xattrs=None, children={})
            self._set_meta(node, m, path)
            return node
        if m.issym():
            if not m.linkname:
                rep.drop("symbolic link with an empty target", path)
                return None
            node = Symlink(mode=0o777, uid=0, gid=0, mtime=0, xattrs=None, target=m.linkname)
            self._set_meta(node, m, path)
            node.mode = 0o777
            return node
        if m.islnk():
            target = normalize_path(m.linkname, label)
            node = in_layer.get(target)
            if node is not None and not isinstance(node, Dir):
                return node
            if node is None and target in shadowed_files:
                wanted.setdefault(target, []).append(path)
                return None
            rep.drop("hard link to a target outside its layer or to a directory", path)
            return None
        if m.isfifo():
            node = Fifo(mode=0, uid=0, gid=0, mtime=0, xattrs=None)
            self._set_meta(node, m, path)
            return node
        if m.ischr() or m.isblk():
            rep.drop("device node", path)
            return None
        rep.drop(f"unsupported tar entry type {m.type!r}", path)
        return None

    def _write_data(self, tr, m):
        """The data of regular member m, straight from the reader's buffer for small files
        (no copy on the Python side), else streamed."""
        size = m.size
        view = tr.small_data(m)
        if view is not None:
            data = self.writer.add_bytes(view)
        else:
            data = self.writer.add_file_data(tr.data_reader(), size)
        if self.progress:
            self.progress(size)
        return data

    def _set_meta(self, node, m, path):
        mode = m.mode & 0o7777
        if mode & self.strip_mask and not isinstance(node, Symlink):
            mode &= ~self.strip_mask
            self.report.stripped_bits += 1
        node.mode = mode
        node.uid = m.uid
        node.gid = m.gid
        node.mtime = max(0, min(int(m.mtime), 0xFFFFFFFF))
        node.xattrs = self._xattrs(m, path)

    @staticmethod
    def _copy_meta(dst, src):
        dst.mode, dst.uid, dst.gid, dst.mtime, dst.xattrs = (src.mode, src.uid, src.gid,
                                                             src.mtime, src.xattrs)

    def _xattrs(self, m, path):
        pax = m.pax_headers
        if not pax:
            return None
        out = None
        for key, value in pax.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if self.keep_user_xattrs and name.startswith("user."):
                if out is None:
                    out = {}
                out[name] = value.encode("utf-8", "surrogateescape") if isinstance(value, str) \
                    else bytes(value)
            else:
                self.report.dropped_xattrs += 1
                if name.startswith("security."):
                    self.report.drop(f"xattr {name}", path)
        return out

    # ---- hard links whose target an upper layer hid ---------------------------------
    def _recover_hidden_link_targets(self, layer, label, wanted):
        """Second read of one layer, only for hard links whose target path an upper layer
        replaced or deleted: the link keeps this layer's content (rare in practice)."""
        try:
            with layer.open() as stream:
                tf, members = iter_tar(stream)
                for m in members:
                    try:
                        path = normalize_path(m.name, label)
                    except ImageError:
                        continue
                    links = wanted.pop(path, None)
                    if not links or m.type not in _FILE_TYPES:
                        continue
                    node = File(mode=0, uid=0, gid=0, mtime=0, xattrs=None, data=None)
                    self._set_meta(node, m, path)
                    if m.size:
                        node.data = self._write_data(tf, m)
                    for link in links:
                        parent, _, base = link.rpartition("/")
                        parent_dir = self._parent_dir(parent, link)
                        if parent_dir is not None and base not in parent_dir.children:
                            parent_dir.children[base] = node
                    if not wanted:
                        break
        except _corrupt_errors() as e:
            raise ImageError(f"layer {label} is truncated or corrupt ({_why(e)})") from None
        for target, links in wanted.items():
            for link in links:
                self.report.drop("hard link to a missing target", link)


def _corrupt_errors():
    """Exception types that mean "this layer's bytes are not a valid compressed tar"."""
    errors = [tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError]
    try:
        from isal import isal_zlib
        errors.append(isal_zlib.error)
    except ImportError:
        pass
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _why(e):
    s = str(e) or type(e).__name__
    return s.splitlines()[0][:200]


__all__ = ["LayerSource", "Flattener", "normalize_path", "Report"]
