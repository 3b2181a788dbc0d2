"""The client side of the gateway service: `hpcc pull`, `gateway prefetch` and
`gateway status` ask the service when the site config enables it (`service.enabled`).

On a host with the service's UNIX socket the kernel vouches for the caller; elsewhere the
request goes over TCP (`service.address`) inside a munge credential from the local munged.
The user's registry credentials for the image's registry (only those entries of their auth
file) go with a pull request, so the service can pull private images as them.
"""
import json
import os
import socket

from hpcc.errors import EXIT_REGISTRY, HpccError

from . import protocol


class ServiceError(HpccError):
    """What the service answered (its exit status travels with it)."""

    def __init__(self, message, exit_code=1, hint=None):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


def enabled(config):
    return bool(config["service"]["enabled"])


def _unavailable(config, path, why):
    addr = config["service"]["address"]
    where = path + (f" nor at {addr}" if addr else "")
    return ServiceError(f"the gateway service does not answer at {where} ({why})",
                        exit_code=EXIT_REGISTRY,
                        hint="ask the site's admins to start it (systemctl start "
                             "hpcc-gateway), or set service.enabled = false in your "
                             "HPCC_CONFIG to pull into your own store")


def connect(config, timeout=30):
    """(socket, kind): the UNIX socket when this host has it, else TCP to service.address."""
    from hpcc.config import expand_path

    svc = config["service"]
    path = expand_path(svc["socket"])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return s, "unix"
    except OSError as e:
        s.close()
        why = e.strerror or str(e)
        if not svc["address"]:
            raise _unavailable(config, path, why) from None
    from .service import parse_listen

    host, port = parse_listen(svc["address"])
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise _unavailable(config, path, f"{why}; tcp: {e.strerror or e}") from None
    return s, "tcp"


def user_auth(ref):
    """The caller's auth-file entries for `ref`'s registry, as an auth file's JSON (or None).
    The same files and precedence as a pull of one's own (gateway/auth.py)."""
    from .auth import DOCKER_HUB_KEYS, _normalise_key, _read_auths, auth_file_candidates

    wanted = {ref.api_host, ref.domain}
    if wanted & set(DOCKER_HUB_KEYS):
        wanted |= {_normalise_key(k) for k in DOCKER_HUB_KEYS}
    for path in auth_file_candidates():
        try:
            auths = _read_auths(path)
        except HpccError:
            continue
        if not auths:
            continue
        picked = {k: v for k, v in auths.items()
                  if _normalise_key(k).partition("/")[0] in wanted}
        if picked:
            return {"auths": picked}
    return None


def call(config, request, on_event=None, timeout=30):
    """Send one request; feed progress events to `on_event`; return the result event."""
    s, kind = connect(config, timeout)
    request = dict(request, uid=os.getuid())
    try:
        if kind == "tcp":
            from . import munge

            payload = json.dumps(request).encode()
            line = {"munge": munge.encode(payload, socket=config["service"]["munge_socket"]
                                          or None)}
        else:
            line = request
        s.settimeout(None)
        f = s.makefile("rwb")
        try:
            try:
                protocol.send(f, line)
            except (ConnectionResetError, BrokenPipeError):
                pass  # refused before reading (busy): its one line may be there to read
            while True:
                ev = protocol.recv(f)
                if ev is None:
                    raise ServiceError(
                        "the gateway service closed the connection before it answered (it "
                        "was stopped or restarted)", exit_code=EXIT_REGISTRY,
                        hint="run the command again: a pull goes on where it stopped")
                kind_ev = ev.get("event")
                if kind_ev == "result":
                    return ev
                if kind_ev == "error":
                    code = ev.get("exit_code")
                    raise ServiceError(str(ev.get("message") or "the service failed"),
                                       exit_code=code if isinstance(code, int) else 1)
                if on_event is not None:
                    on_event(ev)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ServiceError(f"lost the connection to the gateway service: {e.strerror}",
                               exit_code=EXIT_REGISTRY,
                               hint="run the command again: a pull goes on where it "
                                    "stopped") from None
        finally:
            try:
                f.close()
            except OSError:
                pass  # a request that could not be sent: already reported
    finally:
        s.close()


class Renderer:
    """Shows a service pull's events with the local progress reporter (bars on a TTY)."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.converted = 0

    def __call__(self, ev):
        r = self.reporter
        kind = ev.get("event")
        if kind == "resolved":
            r.resolved(ev.get("ref"), ev.get("digest"), ev.get("layers", 0), ev.get("total", 0))
        elif kind == "download":
            r.download(ev.get("phase"), ev.get("digest", ""), ev.get("done") or 0,
                       ev.get("total") or 0)
        elif kind == "converting":
            r.converting(ev.get("total") or 0)
        elif kind == "converted":
            total = ev.get("total") or 0
            if total > self.converted:
                r.converted_bytes(total - self.converted)
                self.converted = total
        elif kind == "line":
            r.line(str(ev.get("msg", "")))


def pull(config, ref, platform=None, reporter=None):
    """Pull through the service; returns its result (digest, path, store, ...)."""
    from hpcc.reference import parse_reference

    parsed = parse_reference(ref)
    req = {"op": "pull", "ref": ref, "platform": platform, "auth": user_auth(parsed)}
    render = Renderer(reporter) if reporter is not None else None
    try:
        res = call(config, req, render)
        if reporter is not None:
            how = ("converted by another request" if res.get("joined") else
                   "converted" if res.get("converted") else "already present")
            reporter.done(f"{ref}: {res.get('digest')} is in the site store ({how}): "
                          f"{res.get('path')}")
    finally:
        if reporter is not None:
            reporter.close()
    return res


def remove_private(config, ref):
    """`hpcc rm` of one of the caller's private images: the service owns the private store.
    Returns (untagged, deleted digest or None), like Store.remove."""
    res = call(config, {"op": "rm", "ref": ref})
    return list(res.get("untagged") or []), res.get("deleted")
