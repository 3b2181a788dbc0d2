"""The gateway service's wire format: one JSON object per line, both ways.

A client sends one request line and reads event lines until a `result` or an `error`:

    -> {"op": "pull", "ref": "ubuntu:22.04", "platform": null, "uid": 1001,
        "auth": {"auths": {...}} | null}
    <- {"event": "resolved", "ref": ..., "digest": ..., "layers": 3, "total": 123}
    <- {"event": "download", "phase": "start|progress|done|cached|retry", "digest": ...,
        "done": n, "total": n}
    <- {"event": "converting", "total": n}   {"event": "converted", "total": n}
    <- {"event": "line", "msg": "..."}
    <- {"event": "result", ...}  or  {"event": "error", "message": "...", "exit_code": 1}

Other ops: {"op": "status"}, {"op": "list"}, {"op": "rm", "ref": ...} (the caller's
private images only). Over TCP the request line is
{"munge": CREDENTIAL} whose (munge-encrypted) payload is the request itself.
"""
import json

from hpcc.errors import HpccError

MAX_LINE = 1 << 20


class ProtocolError(HpccError):
    pass


def send(f, obj):
    f.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
    f.flush()


def recv(f):
    """The next object, or None at end of stream."""
    line = f.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise ProtocolError("a message of the gateway protocol is too long or cut short")
    try:
        obj = json.loads(line)
    except ValueError:
        raise ProtocolError("a message of the gateway protocol is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message of the gateway protocol is not a JSON object")
    return obj
