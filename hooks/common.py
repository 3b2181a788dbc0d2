"""The helper layer shared by hpcc's OCI hooks.

- `read_state`: the OCI state on stdin plus the bundle's config.json -> `Container`.
- `enter_mount_namespace`: a hook started by crun/runc/podman runs in the runtime's
  namespace; it joins the container's mount namespace (state `pid`) before touching the root.
  Under hpcc the hook already runs there and nothing happens.
- `Root`: every path inside the container root is resolved with openat2(RESOLVE_IN_ROOT) (or
  an O_NOFOLLOW walk that clamps at the root where openat2 is missing), so a symlink in the
  image can never lead a bind mount or a new file outside the root.
- `bind_mount`: attach a clone of a host file/directory (opened O_PATH) onto a resolved
  target fd with the new mount API (open_tree/mount_setattr/move_mount), read-only, nosuid,
  nodev, falling back to mount(2) through /proc/self/fd.
- `LdCache`, `ElfInfo`, `HostLibraries`, `ContainerLibraries`: what the dynamic linkers on
  both sides would load, and whether the container's copy of a library is compatible.
- `Plan`: the list of actions a hook wants; `--dry-run` prints it, `apply` performs it.
"""
import ctypes
import errno
import json
import os
import platform
import stat
import struct

from hpcc.errors import HookError

# ------------------------------------------------------------------------------------------
# OCI state
# ------------------------------------------------------------------------------------------


class Container:
    """What a hook knows about the container it runs for."""

    def __init__(self, state, config, bundle, root):
        self.state = state
        self.config = config
        self.bundle = bundle
        self.root = root
        self.id = state.get("id", "")
        self.pid = state.get("pid") or 0
        ann = dict(config.get("annotations") or {})
        ann.update(state.get("annotations") or {})
        self.annotations = ann
        env = {}
        for item in (config.get("process") or {}).get("env") or []:
            k, sep, v = item.partition("=")
            if sep:
                env[k] = v
        self.env = env


def read_state(stream):
    """Parse the OCI state JSON from `stream` and load `<bundle>/config.json`."""
    raw = stream.read(4 << 20)
    try:
        state = json.loads(raw or "null")
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise HookError("no OCI state on standard input: an OCI hook must be started by a "
                        "runtime (hpcc, crun, runc) that writes the container state to its stdin")
    bundle = state.get("bundle")
    if not isinstance(bundle, str) or not os.path.isabs(bundle):
        raise HookError("the OCI state has no absolute 'bundle' path")
    cfg_path = os.path.join(bundle, "config.json")
    try:
        with open(cfg_path, "rb") as f:
            config = json.loads(f.read())
    except OSError as e:
        raise HookError(f"cannot read the bundle's {cfg_path}: {e.strerror}") from None
    except ValueError:
        raise HookError(f"{cfg_path} is not valid JSON") from None
    root = ((config.get("root") or {}).get("path")) if isinstance(config, dict) else None
    if not isinstance(root, str) or not root:
        raise HookError(f"{cfg_path} has no root.path")
    root = os.path.normpath(os.path.join(bundle, root))  # OCI allows a path relative to the bundle
    return Container(state, config, bundle, root)


# ------------------------------------------------------------------------------------------
# System calls through ctypes
# ------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

# Generic syscall numbers (the same on x86_64, aarch64, ppc64le for these new calls).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
CLONE_NEWNS = 0x00020000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _oserror(what):
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


_have_openat2 = True
_have_new_mount_api = True


def openat2(dirfd, path, flags, resolve):
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        raise _oserror("openat2")
    return fd


def enter_mount_namespace(pid):
    """Join the mount namespace of `pid` if it is not ours (hook started by crun/runc)."""
    if not pid:
        return False
    try:
        theirs = os.stat(f"/proc/{int(pid)}/ns/mnt")
        ours = os.stat("/proc/self/ns/mnt")
    except (OSError, ValueError):
        raise HookError(f"the container process {pid} named in the OCI state does not exist") from None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return False
    fd = os.open(f"/proc/{int(pid)}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNS) != 0:
            e = _oserror("setns")
            raise HookError(f"cannot join the container's mount namespace: {e.strerror}")
    finally:
        os.close(fd)
    return True


# ------------------------------------------------------------------------------------------
# The container root
# ------------------------------------------------------------------------------------------


class Root:
    """The assembled container root, addressed only by paths resolved inside it."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise HookError(f"container root {self.path} is not accessible: {e.strerror}") from None

    def close(self):
        os.close(self.fd)

    # -- resolution --------------------------------------------------------------------
    def open(self, cpath, flags=os.O_PATH, *, follow=True):
        """fd of container path `cpath`; symlinks are resolved as if the root were /."""
        global _have_openat2
        rel = cpath.lstrip("/") or "."
        if not follow:
            flags |= os.O_NOFOLLOW
        if _have_openat2:
            try:
                return openat2(self.fd, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: seccomp filter
                    raise
                _have_openat2 = False
        return self._walk_open(rel, flags, follow)

    def _walk_open(self, rel, flags, follow):
        """openat2(RESOLVE_IN_ROOT) for kernels without it: one O_NOFOLLOW step at a time."""
        todo = [c for c in rel.split("/") if c not in ("", ".")]
        stack = [os.dup(self.fd)]
        links = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                last = not todo
                fd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode) and (follow or not last):
                    os.close(fd)
                    links += 1
                    if links > 40:
                        raise OSError(errno.ELOOP, "too many symlinks")
                    target = os.readlink(comp, dir_fd=stack[-1])
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo = [c for c in target.split("/") if c not in ("", ".")] + todo
                    continue
                if last and (flags & ~os.O_NOFOLLOW) != os.O_PATH:
                    os.close(fd)
                    fd = os.open(comp, (flags | os.O_NOFOLLOW | os.O_CLOEXEC), dir_fd=stack[-1])
                stack.append(fd)
            if (flags & ~os.O_NOFOLLOW) != os.O_PATH and len(stack) == 1:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)
            return os.dup(stack[-1])
        finally:
            for fd in stack:
                os.close(fd)

    def exists(self, cpath):
        try:
            os.close(self.open(cpath))
            return True
        except OSError:
            return False

    def stat(self, cpath):
        """os.stat_result of cpath (symlinks followed inside the root) or None."""
        try:
            fd = self.open(cpath)
        except OSError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def realpath(self, cpath):
        """The container-absolute path cpath resolves to (None if it does not exist)."""
        try:
            fd = self.open(cpath)
        except OSError:
            return None
        try:
            return self._cpath_of_fd(fd)
        finally:
            os.close(fd)

    def _cpath_of_fd(self, fd):
        host = os.readlink(f"/proc/self/fd/{fd}")
        if host == self.path:
            return "/"
        if not host.startswith(self.path.rstrip("/") + "/"):
            raise HookError(f"path resolution left the container root ({host})")
        return host[len(self.path.rstrip("/")):]

    def read(self, cpath, limit=64 << 20):
        """Bytes of a regular file inside the root, or None if absent."""
        try:
            fd = self.open(cpath, os.O_RDONLY)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit)
        finally:
            os.close(fd)

    def listdir(self, cpath):
        try:
            fd = self.open(cpath, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    # -- creation (lands in the writable upper layer, never in the image) --------------
    def _parent(self, cpath, create=True):
        parent, name = os.path.split(os.path.normpath("/" + cpath.lstrip("/")))
        if not name or name in (".", ".."):
            raise HookError(f"bad container path {cpath!r}")
        if create:
            self.makedirs(parent)
        return self.open(parent, os.O_PATH | os.O_DIRECTORY), name

    def makedirs(self, cpath, mode=0o755):
        done = ""
        for comp in [c for c in cpath.split("/") if c]:
            done += "/" + comp
            try:
                os.close(self.open(done, os.O_PATH | os.O_DIRECTORY))
                continue
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                raise HookError(f"{done} exists in the container but is not a directory") from None
            pfd, name = self._parent(done, create=False)
            try:
                os.mkdir(name, mode, dir_fd=pfd)
            except FileExistsError:
                pass
            except OSError as e:
                raise HookError(f"cannot create {done} in the container: {e.strerror} "
                                "(is the container root writable, e.g. an overlay?)") from None
            finally:
                os.close(pfd)

    def create_file(self, cpath, mode=0o644):
        """Make sure a file exists at cpath (a bind target); new files are empty."""
        pfd, name = self._parent(cpath)
        try:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             mode, dir_fd=pfd)
                os.close(fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise HookError(f"cannot create {cpath} in the container: {e.strerror}") from None
        finally:
            os.close(pfd)

    def symlink(self, target, cpath, *, replace=False):
        pfd, name = self._parent(cpath)
        try:
            try:
                os.symlink(target, name, dir_fd=pfd)
            except FileExistsError:
                if not replace:
                    return False
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise HookError(f"{cpath} is a directory in the container") from None
                os.unlink(name, dir_fd=pfd)
                os.symlink(target, name, dir_fd=pfd)
            return True
        finally:
            os.close(pfd)

    def write_file(self, cpath, data, mode=0o644):
        pfd, name = self._parent(cpath)
        try:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=pfd)  # never write through a link from the image
            except FileNotFoundError:
                pass
            fd = os.open(name, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode, dir_fd=pfd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.close(pfd)

    # -- binds ---------------------------------------------------------------------------
    def bind(self, src, cpath, *, readonly=True, device=False):
        """Bind host path `src` (file, device or directory) onto cpath inside the root."""
        try:
            sfd = os.open(src, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise HookError(f"cannot open host path {src}: {e.strerror}") from None
        try:
            sst = os.fstat(sfd)
            is_dir = stat.S_ISDIR(sst.st_mode)
            if is_dir:
                self.makedirs(cpath)
            elif self.stat(cpath) is None:
                # missing, or a symlink leading nowhere inside the root: a new empty file
                # in the writable layer takes its place (the symlink is never followed out)
                if self._dangling(cpath):
                    self._unlink(cpath)
                self.create_file(cpath)
            try:
                dfd = self.open(cpath, os.O_PATH)
            except OSError as e:
                raise HookError(f"cannot resolve {cpath} in the container: {e.strerror}") from None
            try:
                dst = os.fstat(dfd)
                if stat.S_ISDIR(dst.st_mode) != is_dir:
                    kind = "directory" if is_dir else "file"
                    raise HookError(f"cannot bind host {kind} {src} onto {cpath}: the container "
                                    f"has a {'file' if is_dir else 'directory'} there")
                if device:
                    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC
                else:
                    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0)
                bind_mount(sfd, dfd, attrs, recursive=is_dir)
            finally:
                os.close(dfd)
            # Re-resolve: the path must now lead to the host object (no swapped symlink).
            after = self.stat(cpath)
            if after is None or (after.st_dev, after.st_ino) != (sst.st_dev, sst.st_ino):
                raise HookError(f"bind of {src} onto {cpath} did not take effect")
        finally:
            os.close(sfd)

    def mask(self, cpath):
        """Hide a directory of the container (e.g. an unselected GPU's /proc entry) under an
        empty read-only tmpfs."""
        try:
            fd = self.open(cpath, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise HookError(f"cannot resolve {cpath} in the container: {e.strerror}") from None
        try:
            if _libc.mount(b"tmpfs", f"/proc/self/fd/{fd}".encode(), b"tmpfs",
                           MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"mode=0555,size=4k") != 0:
                raise HookError(f"cannot mask {cpath}: mount: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def _dangling(self, cpath):
        try:
            pfd, name = self._parent(cpath, create=False)
        except OSError:
            return False
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            return stat.S_ISLNK(st.st_mode)
        except OSError:
            return False
        finally:
            os.close(pfd)

    def _unlink(self, cpath):
        pfd, name = self._parent(cpath, create=False)
        try:
            os.unlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)


def bind_mount(src_fd, dst_fd, attrs, *, recursive=False):
    """Clone the mount of src_fd and attach it on dst_fd with mount attributes `attrs`."""
    global _have_new_mount_api
    if _have_new_mount_api:
        flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
        tree = _libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(src_fd), ctypes.c_char_p(b""),
                             ctypes.c_uint(flags))
        if tree < 0 and ctypes.get_errno() == errno.ENOSYS:
            _have_new_mount_api = False
        elif tree < 0:
            raise HookError(f"cannot bind: open_tree: {os.strerror(ctypes.get_errno())}")
        else:
            try:
                attr = _MountAttr(attrs, 0, 0, 0)
                r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(tree), ctypes.c_char_p(b""),
                                  ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
                                  ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
                if r < 0:
                    raise HookError(f"cannot bind: mount_setattr: {os.strerror(ctypes.get_errno())}")
                r = _libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(tree), ctypes.c_char_p(b""),
                                  ctypes.c_int(dst_fd), ctypes.c_char_p(b""),
                                  ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
                if r < 0:
                    raise HookError(f"cannot bind: move_mount: {os.strerror(ctypes.get_errno())}")
                return
            finally:
                os.close(tree)
    # mount(2) through the fds' magic links, then a remount for the flags.
    src = f"/proc/self/fd/{src_fd}".encode()
    dst = f"/proc/self/fd/{dst_fd}".encode()
    if _libc.mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0), None) != 0:
        raise HookError(f"cannot bind: mount: {os.strerror(ctypes.get_errno())}")
    ms = ((MS_RDONLY if attrs & MOUNT_ATTR_RDONLY else 0) | (MS_NOSUID if attrs & MOUNT_ATTR_NOSUID else 0)
          | (MS_NODEV if attrs & MOUNT_ATTR_NODEV else 0) | (MS_NOEXEC if attrs & MOUNT_ATTR_NOEXEC else 0))
    # dst_fd still names the covered file; the new mount is reached by a fresh path walk.
    real = os.readlink(dst).encode()
    if ms and _libc.mount(None, real, None, MS_REMOUNT | MS_BIND | ms, None) != 0:
        raise HookError(f"cannot bind: remount: {os.strerror(ctypes.get_errno())}")


# ------------------------------------------------------------------------------------------
# ld.so.cache
# ------------------------------------------------------------------------------------------

_OLD_MAGIC = b"ld.so-1.7.0"
_NEW_MAGIC = b"glibc-ld.so.cache1.1"


def parse_ld_cache(data):
    """{soname: [path, ...]} in cache order from the bytes of an ld.so.cache (glibc formats).

    The cache comes from the image (untrusted): anything malformed ends the parse with what
    was read so far, never an exception."""
    out = {}
    try:
        _parse_ld_cache(data or b"", out)
    except struct.error:
        pass
    return out


def _parse_ld_cache(data, out):
    base = 0
    if data.startswith(_OLD_MAGIC):
        (n,) = struct.unpack_from("<I", data, 12)
        n = min(n, len(data) // 12)
        off = 16 + n * 12
        off = (off + 7) & ~7
        if data[off:off + len(_NEW_MAGIC)] == _NEW_MAGIC:
            base = off
        else:  # old format only: strings follow the entries
            strings = 16 + n * 12
            for i in range(n):
                flags, key, value = struct.unpack_from("<iII", data, 16 + i * 12)
                _add(out, data, strings + key, strings + value)
            return
    if data[base:base + len(_NEW_MAGIC)] != _NEW_MAGIC:
        return
    (n, _strlen) = struct.unpack_from("<II", data, base + 20)
    n = min(n, len(data) // 24)
    # String offsets are relative to the start of the new-format header (the file start
    # when the cache has only the new format).
    ent = base + 48
    for i in range(n):
        flags, key, value, _osv, _hw = struct.unpack_from("<iIIIQ", data, ent + i * 24)
        _add(out, data, base + key, base + value)


def _add(out, data, koff, voff):
    try:
        key = data[koff:data.index(b"\0", koff)].decode()
        val = data[voff:data.index(b"\0", voff)].decode()
    except (ValueError, UnicodeDecodeError):
        return
    out.setdefault(key, []).append(val)


# ------------------------------------------------------------------------------------------
# ELF
# ------------------------------------------------------------------------------------------

GLIBC_SONAMES = frozenset({
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2",
    "libutil.so.1", "libanl.so.1", "libmvec.so.1", "libBrokenLocale.so.1", "libnss_files.so.2",
    "libnss_dns.so.2", "libthread_db.so.1", "libc_malloc_debug.so.0",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld64.so.2", "ld-linux.so.2", "ld64.so.1",
})


def is_glibc(soname):
    return soname in GLIBC_SONAMES


SHT_DYNSYM, SHT_DYNAMIC = 11, 6
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 14, 15, 29


class ElfInfo:
    """Dynamic-linking facts of one ELF file: soname, DT_NEEDED, RPATH/RUNPATH, the symbol
    versions it needs (per soname) and defines, and its dynamic symbols.

    A small reader of its own over an mmap (section headers, .dynamic, .gnu.version_r/_d,
    .dynsym): the hook runs on every launch, and this is ~50x faster than pyelftools for the
    same facts (tests check that both agree)."""

    def __init__(self, data_or_file, name="?"):
        import mmap
        self.name = name
        self._syms = None
        try:
            if isinstance(data_or_file, (bytes, bytearray)):
                self._m = bytes(data_or_file)
            else:
                self._m = mmap.mmap(data_or_file.fileno(), 0, prot=mmap.PROT_READ)
            self._parse()
        except (struct.error, IndexError, ValueError, OverflowError, OSError) as e:
            raise HookError(f"{name} is not a valid ELF file ({e})") from None

    @classmethod
    def from_path(cls, path):
        try:
            with open(path, "rb") as f:
                return cls(f, name=path)
        except OSError as e:
            raise HookError(f"cannot read {path}: {e.strerror}") from None

    def _parse(self):
        m = self._m
        if m[:4] != b"\x7fELF" or m[4] not in (1, 2) or m[5] not in (1, 2):
            raise ValueError("no ELF header")
        self.elfclass = 64 if m[4] == 2 else 32
        o = self._o = "<" if m[5] == 1 else ">"
        if self.elfclass == 64:
            (self.machine,) = struct.unpack_from(o + "H", m, 18)
            shoff, = struct.unpack_from(o + "Q", m, 40)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", m, 58)
            shfmt = o + "IIQQQQIIQQ"
        else:
            (self.machine,) = struct.unpack_from(o + "H", m, 18)
            shoff, = struct.unpack_from(o + "I", m, 32)
            shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", m, 46)
            shfmt = o + "IIIIIIIIII"
        secs = []
        for i in range(shnum):
            n, t, _fl, _addr, off, size, link, info, _al, ent = struct.unpack_from(shfmt, m, shoff + i * shentsize)
            secs.append((t, off, size, link, info, ent))
        self._secs = secs
        self.soname = None
        self.needed, self.rpath, self.runpath = [], [], []
        self.verneed, self.verdef = {}, set()
        for t, off, size, link, info, ent in secs:
            if t == SHT_DYNAMIC:
                stroff = secs[link][1]
                fmt = o + ("qQ" if self.elfclass == 64 else "iI")
                step = struct.calcsize(fmt)
                for i in range(size // step):
                    tag, val = struct.unpack_from(fmt, m, off + i * step)
                    if tag == 0:
                        break
                    if tag == DT_NEEDED:
                        self.needed.append(self._str(stroff, val))
                    elif tag == DT_SONAME:
                        self.soname = self._str(stroff, val)
                    elif tag == DT_RPATH:
                        self.rpath += [p for p in self._str(stroff, val).split(":") if p]
                    elif tag == DT_RUNPATH:
                        self.runpath += [p for p in self._str(stroff, val).split(":") if p]
            elif t == SHT_GNU_VERNEED:
                stroff = secs[link][1]
                pos = off
                for _ in range(info):
                    _v, cnt, file_, aux, nxt = struct.unpack_from(o + "HHIII", m, pos)
                    names = self.verneed.setdefault(self._str(stroff, file_), set())
                    apos = pos + aux
                    for _ in range(cnt):
                        _h, _f, _oth, vname, anext = struct.unpack_from(o + "IHHII", m, apos)
                        names.add(self._str(stroff, vname))
                        apos += anext
                    if not nxt:
                        break
                    pos += nxt
            elif t == SHT_GNU_VERDEF:
                stroff = secs[link][1]
                pos = off
                for _ in range(info):
                    _v, flags, _ndx, cnt, _h, aux, nxt = struct.unpack_from(o + "HHHHIII", m, pos)
                    if cnt and not flags & 0x1:    # VER_FLG_BASE names the file itself
                        vname, = struct.unpack_from(o + "I", m, pos + aux)
                        self.verdef.add(self._str(stroff, vname))
                    if not nxt:
                        break
                    pos += nxt

    def _str(self, stroff, idx):
        start = stroff + idx
        end = self._m.find(b"\0", start)
        return bytes(self._m[start:end]).decode("utf-8", "replace")

    def symbols(self):
        """(defined, undefined-strong) sets of dynamic symbol names (empty for a malformed
        symbol table: files from images are untrusted)."""
        if self._syms is None:
            try:
                self._syms = self._read_symbols()
            except (struct.error, IndexError, ValueError, OverflowError):
                self._syms = (set(), set())
        return self._syms

    def _read_symbols(self):
        defined, undefined = set(), set()
        m, o = self._m, self._o
        for t, off, size, link, info, ent in self._secs:
            if t != SHT_DYNSYM:
                continue
            stroff = self._secs[link][1]
            if self.elfclass == 64:
                fmt, ni, nb, ns = o + "IBBHQQ", 0, 1, 3
            else:
                fmt, ni, nb, ns = o + "IIIBBH", 0, 3, 5
            step = struct.calcsize(fmt)
            for rec in struct.iter_unpack(fmt, m[off:off + (size // step) * step]):
                if not rec[ni]:
                    continue
                bind = rec[nb] >> 4
                if rec[ns] == 0:
                    if bind == 1:
                        undefined.add(self._str(stroff, rec[ni]))
                elif bind in (1, 2, 10):
                    defined.add(self._str(stroff, rec[ni]))
        return defined, undefined


def elf_header(data):
    """(class, machine) from the first bytes of an ELF file, or None."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        return None
    order = "<" if data[5] == 1 else ">"
    return data[4], struct.unpack_from(order + "H", data, 18)[0]


def multiarch_triplet():
    m = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
            "ppc64le": "powerpc64le-linux-gnu"}.get(m, f"{m}-linux-gnu")


def default_lib_dirs():
    t = multiarch_triplet()
    return [f"/lib/{t}", f"/usr/lib/{t}", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


# ------------------------------------------------------------------------------------------
# Library lookup on the host and in the container
# ------------------------------------------------------------------------------------------


class HostLibraries:
    """Resolve sonames as the host's dynamic linker would (RPATH/RUNPATH, cache, defaults)."""

    def __init__(self, extra_dirs=(), cache_path="/etc/ld.so.cache", sysroot="/"):
        self.sysroot = sysroot
        try:
            with open(self._p(cache_path), "rb") as f:
                self.cache = parse_ld_cache(f.read())
        except OSError:
            self.cache = {}
        self.extra_dirs = list(extra_dirs)
        self._header = None

    def _p(self, path):
        return path if self.sysroot == "/" else os.path.join(self.sysroot, path.lstrip("/"))

    def _matches(self, path, want):
        if want is None:
            return True
        try:
            with open(path, "rb") as f:
                return elf_header(f.read(20)) == want
        except OSError:
            return False

    def find(self, soname, *, origin=None, rpath=(), runpath=(), want=None):
        def expand(d):
            if origin:
                d = d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            return d
        cands = [os.path.join(expand(d), soname) for d in (rpath if not runpath else ())]
        cands += [os.path.join(expand(d), soname) for d in runpath]
        cands += [os.path.join(d, soname) for d in self.extra_dirs]
        cands += [self._p(p) for p in self.cache.get(soname, [])]
        cands += [os.path.join(self._p(d), soname) for d in default_lib_dirs()]
        for c in cands:
            if os.path.isfile(c) and self._matches(c, want):
                return c
        return None


class ContainerLibraries:
    """Where the container's dynamic linker finds a soname (its cache, LD_LIBRARY_PATH, defaults)."""

    def __init__(self, root, env):
        self.root = root
        self.cache = parse_ld_cache(root.read("/etc/ld.so.cache"))
        self.ld_library_path = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d.startswith("/")]
        self.default_dirs = default_lib_dirs()
        libc = self.find("libc.so.6", use_env=False)
        self.libc = libc
        self.libdir = os.path.dirname(root.realpath(libc)) if libc else None

    def find(self, soname, *, use_env=True):
        dirs = list(self.ld_library_path) if use_env else []
        for d in dirs:
            p = f"{d.rstrip('/')}/{soname}"
            if self._is_file(p):
                return p
        for p in self.cache.get(soname, []):
            if self._is_file(p):
                return p
        for d in self.default_dirs:
            p = f"{d}/{soname}"
            if self._is_file(p):
                return p
        return None

    def _is_file(self, cpath):
        st = self.root.stat(cpath)
        return st is not None and stat.S_ISREG(st.st_mode)

    def sonames_with_prefix(self, prefix):
        """Sonames starting with prefix that the container's cache or lib dirs know."""
        found = {k for k in self.cache if k.startswith(prefix)}
        for d in self.ld_library_path + self.default_dirs:
            for name in self.root.listdir(d):
                if name.startswith(prefix):
                    found.add(name)
        return found

    def elf(self, cpath):
        try:
            fd = self.root.open(cpath, os.O_RDONLY)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return ElfInfo(os.fdopen(fd, "rb"), name=cpath)

    def musl(self):
        return any(n.startswith("ld-musl-") for d in ("/lib", "/usr/lib") for n in self.root.listdir(d))


# ------------------------------------------------------------------------------------------
# Plans: what a hook does, printable before it is done
# ------------------------------------------------------------------------------------------


class Plan:
    def __init__(self):
        self.actions = []   # dicts: {"op": "bind"|"symlink"|"mkdir"|"write", ...}
        self.notes = []

    def bind(self, src, dst, *, device=False, why=""):
        if any(a["op"] == "bind" and a["dst"] == dst for a in self.actions):
            return
        self.actions.append({"op": "bind", "src": src, "dst": dst, "device": device, "why": why})

    def symlink(self, target, dst, why=""):
        self.actions.append({"op": "symlink", "target": target, "dst": dst, "why": why})

    def mask(self, dst, why=""):
        self.actions.append({"op": "mask", "dst": dst, "why": why})

    def write(self, dst, text, why=""):
        self.actions.append({"op": "write", "dst": dst, "text": text, "why": why})

    def note(self, text):
        self.notes.append(text)

    def as_json(self):
        return json.dumps({"actions": self.actions, "notes": self.notes}, indent=1)

    def apply(self, root):
        for a in self.actions:
            if a["op"] == "bind":
                root.bind(a["src"], a["dst"], device=a["device"])
            elif a["op"] == "symlink":
                root.symlink(a["target"], a["dst"], replace=True)
            elif a["op"] == "write":
                root.write_file(a["dst"], a["text"].encode())
            elif a["op"] == "mask":
                root.mask(a["dst"])

    def summary(self):
        binds = [a for a in self.actions if a["op"] == "bind"]
        return ", ".join(f"{a['dst']}" for a in binds) or "nothing"


def place_library(plan, clibs, host_path, soname, why, *, realname=None):
    """Make the container's linker load host_path for `soname`.

    If the container has its own file for the soname, the host file is bound over it (so
    RPATH/RUNPATH users get it too); otherwise it is bound onto a new file in the directory
    of the container's libc, which the linker searches after its cache.
    """
    existing = clibs.find(soname)
    if existing:
        target = clibs.root.realpath(existing) or existing
        plan.bind(host_path, target, why=why)
        return target
    if not clibs.libdir:
        raise HookError("the container has no glibc (libc.so.6), so it cannot load the host's "
                        f"{soname}; use an image with a glibc-based distribution")
    if realname and realname != soname:
        target = f"{clibs.libdir}/{realname}"
        plan.bind(host_path, target, why=why)
        plan.symlink(realname, f"{clibs.libdir}/{soname}", why="soname link")
    else:
        target = f"{clibs.libdir}/{soname}"
        plan.bind(host_path, target, why=why)
    return target


def version_tuple(realname, soname):
    """(12, 2, 2) from libmpich.so.12.2.2 given soname libmpich.so.12; None if not versioned."""
    base = soname.split(".so")[0] + ".so."
    if not realname.startswith(base):
        return None
    try:
        return tuple(int(x) for x in realname[len(base):].split("."))
    except ValueError:
        return None
