"""Who is asking the gateway service: the peer's identity, proven by the kernel on the UNIX
socket (SO_PEERCRED) or by a munge credential on TCP, and a registry client holding a user's
own credentials for one request (in memory only)."""
import os
import pwd
import socket
import struct

from hpcc.errors import HpccError, ImageError


class AuthError(HpccError):
    """The peer's identity could not be established or does not match its claim."""


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Identity:
    def __init__(self, uid, gid, via, host=None, pid=None):
        self.uid, self.gid, self.via, self.host, self.pid = uid, gid, via, host, pid
        self.user = _user_name(uid)

    def audit(self):
        return {"uid": self.uid, "user": self.user, "via": self.via, "host": self.host}


def identify(conn, kind, host, req, munge_socket=None):
    """(Identity, request) of a connection: the kernel's word (SO_PEERCRED) for the UNIX
    socket, a munge credential carrying the request for TCP; a claimed uid must match."""
    if kind == "unix":
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        ident = Identity(uid, gid, "unix", pid=pid)
    else:
        from . import munge

        cred = req.get("munge")
        if not isinstance(cred, str):
            raise AuthError("a TCP request must come in a munge credential",
                            hint="use hpcc's client (hpcc pull) on a host running munged")
        payload, uid, gid = munge.decode(cred, socket=munge_socket)
        try:
            import json

            req = json.loads(payload)
        except ValueError:
            raise AuthError("the munge credential does not carry a request") from None
        if not isinstance(req, dict):
            raise AuthError("the munge credential does not carry a request")
        ident = Identity(uid, gid, "tcp", host=host)
    claimed = req.get("uid")
    if claimed is not None and claimed != ident.uid:
        raise AuthError(f"the request claims uid {claimed} but comes from uid {ident.uid}")
    return ident, req


class _UserClient:
    """A RegistryClient with a user's credentials, read from an anonymous memory file
    (memfd) that disappears with it: the credentials are never written to disk."""

    def __new__(cls, config, auth):
        import json

        from .registry import RegistryClient

        if not isinstance(auth.get("auths"), dict):
            raise ImageError("the request's credentials are not an auth file's JSON")
        fd = os.memfd_create("hpcc-user-auth", os.MFD_CLOEXEC)
        os.write(fd, json.dumps(auth).encode())
        client = RegistryClient(config, auth_file=f"/proc/self/fd/{fd}")
        close = client.close

        def close_all():
            close()
            try:
                os.close(fd)
            except OSError:
                pass
        client.close = close_all
        return client
