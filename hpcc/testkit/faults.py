"""A fault-injecting HTTP proxy in front of a LocalRegistry: the failures a real registry
cannot be made to produce on demand (5xx, cut connections, corrupt bytes, slow bodies).
"""
import http.client
import re
import socket
import threading
import time

from .images import sha256
from .services import QuietHandler, free_port, serve_in_thread, stop_server

_BLOB_RE = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_MANIFEST_RE = re.compile(r"^/v2/(.+)/manifests/([^/]+)$")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a LocalRegistry (plain http upstream) that
    injects faults a real registry cannot be made to produce on demand. A MOCK, by name:
    only the faults are fake; every byte it passes on comes from the real registry.

    Faults (each counts down as it is used):
        proxy.fail(n, status=503, what="any"|"blob"|"manifest", retry_after=None)
                                               n error responses (with a Retry-After header)
        proxy.cut_blob(after_bytes, times=1, corrupt=False, digest=None)
                                               send a blob's headers, K bytes (one of them
                                               flipped with corrupt=True), then close
        proxy.corrupt_blob(times=1, offset=None, digest=None)  flip one byte of the blob body
        (digest: only the blob with that digest; default the next blob requested)
        proxy.ignore_range = True              drop Range headers (a server without Range)
        proxy.replace_manifest(body, content_type)   serve other bytes as the next manifest
        proxy.throttle = BYTES_PER_SECOND      send blob bodies slowly
    proxy.log: list of dicts {method, path, range, status, kind} of every request.
    """

    def __init__(self, upstream):
        if getattr(upstream, "tls", False):
            raise ValueError("FaultProxy fronts a plain-http LocalRegistry")
        self.upstream = upstream
        self.port = free_port()
        self.log = []
        self.ignore_range = False
        self.throttle = None         # bytes per second for blob bodies (a slow network)
        self._faults = []            # [kind, remaining, params]
        self._lock = threading.Lock()
        self._httpd = None

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"http://{self.host}"

    def ref(self, repo, tag="latest"):
        return f"{self.host}/{repo}:{tag}"

    def fail(self, n, status=503, what="any", retry_after=None):
        with self._lock:
            self._faults.append(["fail", n, {"status": status, "what": what,
                                             "retry_after": retry_after}])

    def cut_blob(self, after_bytes, times=1, corrupt=False, digest=None):
        with self._lock:
            self._faults.append(["cut", times, {"after": after_bytes, "corrupt": corrupt,
                                                "blob": digest}])

    def corrupt_blob(self, times=1, offset=None, digest=None):
        with self._lock:
            self._faults.append(["corrupt", times, {"offset": offset, "blob": digest}])

    def replace_manifest(self, body, content_type=None, times=1, digest_header="match"):
        """Serve `body` (bytes) instead of the next manifest(s): a registry serving a
        schema 1 manifest, garbage, or a manifest that does not match its digest.
        digest_header: "match" announces the digest of `body` in Docker-Content-Digest (a
        registry that really stores it), "keep" leaves the original header (a lie)."""
        with self._lock:
            self._faults.append(["manifest", times, {"body": body, "ctype": content_type,
                                                     "digest": digest_header}])

    def clear(self):
        with self._lock:
            self._faults.clear()
        self.ignore_range = False

    def _take(self, kind, path_kind, path=""):
        with self._lock:
            for f in self._faults:
                if f[0] != kind or f[1] <= 0:
                    continue
                if f[2].get("blob") and not path.endswith(f[2]["blob"]):
                    continue
                if kind == "fail" and f[2]["what"] not in ("any", path_kind):
                    continue
                if kind in ("cut", "corrupt") and path_kind != "blob":
                    continue
                if kind == "manifest" and path_kind != "manifest":
                    continue
                f[1] -= 1
                return f[2]
        return None

    def blob_gets(self, digest=None):
        return [e for e in self.log if e["method"] == "GET" and e["kind"] == "blob"
                and (digest is None or e["path"].endswith(digest))]

    def start(self):
        proxy = self

        class Handler(QuietHandler):
            def _kind(self):
                p = self.path.split("?", 1)[0]
                if _BLOB_RE.match(p):
                    return "blob"
                if _MANIFEST_RE.match(p):
                    return "manifest"
                return "other"

            def _record(self, status, kind):
                proxy.log.append({"method": self.command, "path": self.path.split("?", 1)[0],
                                  "range": self.headers.get("Range"), "status": status,
                                  "kind": kind})

            def _handle(self):
                kind = self._kind()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take("fail", kind)
                if fault:
                    self._record(fault["status"], kind)
                    msg = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
                    self.send_response(fault["status"])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    if fault["retry_after"] is not None:
                        self.send_header("Retry-After", str(fault["retry_after"]))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "proxy-connection",
                                                "keep-alive", "transfer-encoding")}
                if proxy.ignore_range:
                    headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port, timeout=60)
                try:
                    up.request(self.command, self.path, body=body, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                    status = resp.status
                    upstream_length = resp.getheader("Content-Length")
                    rheaders = [(k, v) for k, v in resp.getheaders()
                                if k.lower() not in ("connection", "transfer-encoding",
                                                     "content-length", "keep-alive")]
                finally:
                    up.close()
                cut = corrupt = None
                if self.command == "GET" and kind == "blob" and status in (200, 206) and data:
                    cut = proxy._take("cut", kind, self.path)
                    if cut is None:
                        corrupt = proxy._take("corrupt", kind, self.path)
                    elif cut["corrupt"]:
                        corrupt = {"offset": min(cut["after"], len(data)) // 2}
                if self.command == "GET" and kind == "manifest" and status == 200:
                    swap = proxy._take("manifest", kind)
                    if swap is not None:
                        data = swap["body"]
                        if swap["digest"] == "match":
                            rheaders = [(k, v) for k, v in rheaders
                                        if k.lower() != "docker-content-digest"]
                            rheaders.append(("Docker-Content-Digest", sha256(data)))
                        if swap["ctype"]:
                            rheaders = [(k, v) for k, v in rheaders
                                        if k.lower() != "content-type"]
                            rheaders.append(("Content-Type", swap["ctype"]))
                if corrupt is not None:
                    off = corrupt["offset"] if corrupt["offset"] is not None else len(data) // 2
                    off = min(off, len(data) - 1)
                    data = data[:off] + bytes([data[off] ^ 0xFF]) + data[off + 1:]
                self._record(status, kind)
                self.send_response(status)
                for k, v in rheaders:
                    if k.lower() == "location" and v.startswith(proxy.upstream.url):
                        v = proxy.url + v[len(proxy.upstream.url):]
                    self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", upstream_length or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                if cut is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut is not None:
                    self.wfile.write(data[:cut["after"]])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if proxy.throttle and kind == "blob":
                    step = 64 * 1024
                    try:
                        for i in range(0, len(data), step):
                            self.wfile.write(data[i:i + step])
                            self.wfile.flush()
                            time.sleep(step / proxy.throttle)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self._httpd = serve_in_thread(self.port, Handler, "hpcc-fault-proxy")
        return self

    def stop(self):
        stop_server(self._httpd)
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
