"""Munge credentials (libmunge through cffi): how a client on another host proves its uid to
the gateway service over TCP.

`encode(payload)` asks the local munged for a credential carrying `payload` (munged encrypts
it and seals it with the cluster's shared key); `decode(cred)` asks the service host's munged
to check it and returns (payload, uid, gid). munged refuses a credential sealed with another
key, one past its time-to-live, and one already decoded once (a replay).
"""
from hpcc.errors import HpccError


class MungeError(HpccError):
    """munged is unreachable, or a credential is invalid, expired or replayed."""


def _lib():
    try:
        from ._munge import ffi, lib
    except ImportError as e:  # pragma: no cover - a broken installation
        raise MungeError(f"the munge binding is not available ({e})",
                         hint="install libmunge2 and reinstall hpcc") from None
    return ffi, lib


def _ctx(ffi, lib, socket):
    ctx = lib.munge_ctx_create()
    if ctx == ffi.NULL:
        raise MemoryError("munge_ctx_create")
    if socket:
        path = ffi.new("char[]", str(socket).encode())
        err = lib.munge_ctx_set(ctx, lib.MUNGE_OPT_SOCKET, ffi.cast("char *", path))
        if err != lib.EMUNGE_SUCCESS:
            lib.munge_ctx_destroy(ctx)
            why = ffi.string(lib.munge_strerror(err)).decode()
            raise MungeError(f"munge socket {socket}: {why}")
    return ctx


def _message(ffi, lib, ctx, err):
    s = lib.munge_ctx_strerror(ctx)
    if s == ffi.NULL:
        s = lib.munge_strerror(err)
    return ffi.string(s).decode("utf-8", "replace")


def encode(payload=b"", socket=None):
    """A credential (str) for `payload` (bytes), from the local munged."""
    ffi, lib = _lib()
    ctx = _ctx(ffi, lib, socket)
    try:
        out = ffi.new("char **")
        err = lib.munge_encode(out, ctx, payload, len(payload))
        if err != lib.EMUNGE_SUCCESS:
            raise MungeError(f"munge could not make a credential: {_message(ffi, lib, ctx, err)}",
                             hint="is munged running on this host?")
        try:
            return ffi.string(out[0]).decode("ascii")
        finally:
            lib.free(out[0])
    finally:
        lib.munge_ctx_destroy(ctx)


def decode(cred, socket=None):
    """(payload bytes, uid, gid) of a valid credential; MungeError otherwise (its `code` is
    munge's error number: `replayed` tells a replay apart)."""
    ffi, lib = _lib()
    if not isinstance(cred, str) or not cred.isascii() or "\0" in cred:
        raise MungeError("the munge credential is not text")
    ctx = _ctx(ffi, lib, socket)
    try:
        buf = ffi.new("void **")
        n = ffi.new("int *")
        uid = ffi.new("uid_t *")
        gid = ffi.new("gid_t *")
        err = lib.munge_decode(cred.encode(), ctx, buf, n, uid, gid)
        try:
            payload = bytes(ffi.buffer(buf[0], n[0])) if buf[0] != ffi.NULL else b""
        finally:
            if buf[0] != ffi.NULL:
                lib.free(buf[0])
        if err != lib.EMUNGE_SUCCESS:
            e = MungeError(f"munge credential refused: {_message(ffi, lib, ctx, err)}")
            e.code = err
            e.replayed = err == lib.EMUNGE_CRED_REPLAYED
            raise e
        return payload, int(uid[0]), int(gid[0])
    finally:
        lib.munge_ctx_destroy(ctx)
