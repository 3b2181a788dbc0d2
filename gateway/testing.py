"""Test and demo support: a real local registry, in-memory image building, push, archive
writers, the demo busybox image, and a fault-injecting proxy.

Used by the test suite and by `make demo`; nothing here runs on a production path.

- LocalRegistry: Debian's /usr/bin/docker-registry on 127.0.0.1:<free port>, optionally
  with TLS (a throw-away CA), htpasswd basic auth, or token auth (a small RS256 token
  server in this process).
- ImageBuilder / layer entry helpers: build Docker schema2 or OCI images and indexes in
  memory from explicit tar entries, including hostile ones.
- push(): upload an image or index with the registry HTTP API.
- write_oci_layout / write_oci_archive / write_docker_archive: inputs for `gateway import`.
- busybox_image(): the demo image from the host's busybox-static.
- FaultProxy: an HTTP proxy in front of a LocalRegistry that injects failures a real
  registry cannot be made to produce (5xx, cut connections, corrupt bytes).
"""
import base64
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

DOCKER_REGISTRY = "/usr/bin/docker-registry"
BUSYBOX = "/bin/busybox"
EPOCH = 1700000000          # fixed mtime: built images are reproducible

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                   "none": "application/vnd.docker.image.rootfs.diff.tar",
                   "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                "none": "application/vnd.oci.image.layer.v1.tar",
                "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# =========================================================================================
# Certificates and tokens
# =========================================================================================
def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID
    except ImportError as e:   # pragma: no cover - declared in the test extra
        raise RuntimeError("hpcc.gateway.testing needs the 'cryptography' package "
                           "(pip install 'hpcc[test]')") from e
    return x509, hashes, serialization, padding, rsa, NameOID


def _new_key():
    _, _, _, _, rsa, _ = _crypto()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key):
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject_cn, key, issuer_cert=None, issuer_key=None, *, ca=False, sans=()):
    import datetime
    import ipaddress
    x509, hashes, _, _, _, NameOID = _crypto()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    b = (x509.CertificateBuilder()
         .subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                          crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    if sans:
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem_cert(cert):
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A minimal Docker token-auth server (the `realm` of a Bearer challenge).

    GET /token?service=S&scope=repository:NAME:ACTIONS with optional Basic credentials.
    Wrong credentials: 401. Known user: the requested actions. Anonymous: pull only if
    `anonymous_pull`, else a token granting nothing. Tokens are RS256 JWTs whose header
    carries the signing certificate in `x5c`; docker-registry verifies that chain against
    its `rootcertbundle`.
    """

    def __init__(self, users, service, issuer="hpcc-test-issuer", anonymous_pull=False):
        self.users = dict(users or {})
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.token_lifetime = 300        # seconds; tests of token refresh shorten it
        self.key = _new_key()
        self.cert = _cert("hpcc test token signer", self.key)
        self.requests = []           # (user or None, scope, status)
        self.port = free_port()
        self._httpd = None
        self._thread = None

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.port}/token"

    def cert_pem(self):
        return _pem_cert(self.cert)

    def make_token(self, subject, access, lifetime=None):
        _, hashes, serialization, padding, _, _ = _crypto()
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        claims = {"iss": self.issuer, "sub": subject or "", "aud": self.service,
                  "exp": now + lifetime, "nbf": now - 60, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _grant(self, user, scope):
        access = []
        for sc in scope:
            parts = sc.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if user is not None:
                allowed = [a for a in actions if a in ("pull", "push", "delete", "*")]
            elif self.anonymous_pull:
                allowed = [a for a in actions if a == "pull"]
            else:
                allowed = []
            access.append({"type": typ, "name": name, "actions": allowed})
        return access

    def start(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                scope = q.get("scope", [])
                user = None
                auth = self.headers.get("Authorization", "")
                if u.path != "/token":
                    return self._reply(404, {"error": "not found"})
                if q.get("service", [server.service])[0] != server.service:
                    return self._reply(400, {"error": "unknown service"})
                if auth:
                    try:
                        scheme, blob = auth.split(" ", 1)
                        name, pw = base64.b64decode(blob).decode().split(":", 1)
                    except ValueError:
                        server.requests.append((None, scope, 400))
                        return self._reply(400, {"error": "malformed Authorization"})
                    if scheme.lower() != "basic" or server.users.get(name) != pw:
                        server.requests.append((name, scope, 401))
                        return self._reply(401, {"details": "invalid credentials"},
                                           {"WWW-Authenticate": 'Basic realm="hpcc-token"'})
                    user = name
                tok = server.make_token(user, server._grant(user, scope))
                server.requests.append((user, scope, 200))
                self._reply(200, {"token": tok, "access_token": tok, "expires_in": server.token_lifetime,
                                  "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())})

            def _reply(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="hpcc-token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


# =========================================================================================
# The local registry
# =========================================================================================
class LocalRegistry:
    """docker-registry on 127.0.0.1 with filesystem storage in a temporary directory.

        with LocalRegistry(tls=True, htpasswd={"alice": "s3cret"}) as reg:
            reg.host      # "127.0.0.1:41234"
            reg.url       # "https://127.0.0.1:41234"
            reg.ca_file   # the throw-away CA that signed the server certificate

    token_auth=True configures `auth: token` with a TokenServer that knows the users of
    `htpasswd` (the htpasswd file itself is then not used by the registry).
    """

    def __init__(self, *, tls=False, htpasswd=None, token_auth=False, anonymous_pull=False,
                 bind="127.0.0.1", workdir=None, port=None):
        if not os.path.exists(DOCKER_REGISTRY):
            raise RuntimeError(f"{DOCKER_REGISTRY} is missing: apt-get install docker-registry")
        self.tls = tls
        self.users = dict(htpasswd or {})
        self.token_auth = token_auth
        self.anonymous_pull = anonymous_pull
        self.bind = bind
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="hpcc-registry-"))
        self.port = None
        self._want_port = port   # a fixed port (the demo's), else a free one
        self.proc = None
        self.ca_file = None
        self.token_server = None
        self.log_path = self.workdir / "registry.log"

    # addresses
    @property
    def host(self):
        h = "127.0.0.1" if self.bind in ("127.0.0.1", "0.0.0.0") else self.bind
        return f"{h}:{self.port}"

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def url(self):
        return f"{self.scheme}://{self.host}"

    @property
    def credentials(self):
        """(user, password) of the first configured user, or None."""
        return next(iter(self.users.items()), None)

    @property
    def verify(self):
        return self.ca_file if self.tls else True

    def _write_tls(self, sans):
        ca_key = _new_key()
        ca = _cert("hpcc test CA", ca_key, ca=True)
        key = _new_key()
        cert = _cert("127.0.0.1", key, ca, ca_key, sans=sans)
        (self.workdir / "ca.pem").write_bytes(_pem_cert(ca))
        (self.workdir / "server.pem").write_bytes(_pem_cert(cert))
        (self.workdir / "server.key").write_bytes(_pem_key(key))
        os.chmod(self.workdir / "server.key", 0o600)
        self.ca_file = str(self.workdir / "ca.pem")

    def _write_htpasswd(self):
        lines = []
        for user, pw in self.users.items():
            out = subprocess.run(["htpasswd", "-Bbn", user, pw], check=True,
                                 capture_output=True, text=True).stdout.strip()
            lines.append(out)
        path = self.workdir / "htpasswd"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _config(self):
        sans = ["127.0.0.1", "localhost"]
        if self.bind not in ("127.0.0.1", "0.0.0.0"):
            sans.append(self.bind)
        http_conf = {"addr": f"{self.bind}:{self.port}", "secret": uuid.uuid4().hex,
                     "headers": {"X-Content-Type-Options": ["nosniff"]}}
        if self.tls:
            if self.ca_file is None:
                self._write_tls(sans)
            http_conf["tls"] = {"certificate": str(self.workdir / "server.pem"),
                                "key": str(self.workdir / "server.key")}
        conf = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False},
                    "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": http_conf,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.token_auth:
            if self.token_server is None:
                self.token_server = TokenServer(self.users, service="hpcc-test-registry",
                                                anonymous_pull=self.anonymous_pull).start()
            bundle = self.workdir / "token-signer.pem"
            bundle.write_bytes(self.token_server.cert_pem())
            conf["auth"] = {"token": {"realm": self.token_server.realm,
                                      "service": self.token_server.service,
                                      "issuer": self.token_server.issuer,
                                      "rootcertbundle": str(bundle)}}
        elif self.users:
            conf["auth"] = {"htpasswd": {"realm": "hpcc-test", "path": str(self._write_htpasswd())}}
        return conf

    def start(self, timeout=30):
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        last_err = ""
        for _ in range(5):       # a free port can be taken between probe and bind: retry
            self.port = self._want_port or free_port()
            cfg = self.workdir / "config.yml"
            cfg.write_text(json.dumps(self._config(), indent=1))   # JSON is YAML
            logf = open(self.log_path, "ab")
            self.proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(cfg)],
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            logf.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_err = self.log_path.read_text(errors="replace")[-2000:]
                    break
                try:
                    r = requests.get(self.url + "/v2/", verify=self.verify, timeout=2)
                    if r.status_code in (200, 401):
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            else:
                self.stop()
                raise RuntimeError(f"docker-registry did not answer within {timeout}s")
        self.stop()
        raise RuntimeError(f"docker-registry failed to start: {last_err}")

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None

    def cleanup(self):
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def access_log(self):
        """Lines of the registry's log with HTTP requests (method and path)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if '"GET ' in line or '"HEAD ' in line
                or '"PUT ' in line or '"POST ' in line or '"PATCH ' in line]

    def push(self, repo, tag, image):
        """Push an Image or ImageIndex as repo:tag with this registry's credentials."""
        return push(self.url, repo, tag, image, auth=self.credentials, verify=self.verify)

    def ref(self, repo, tag="latest"):
        return f"{self.host}/{repo}:{tag}"

    def client_config(self, **gateway):
        """A config dict for RegistryClient trusting this registry's CA."""
        reg = {}
        if self.ca_file:
            reg[self.host] = {"ca_file": self.ca_file}
        return {"gateway": dict({"retries": 2}, **gateway), "registries": reg}

    def write_auth_file(self, path, user=None, password=None, style="auth"):
        """Write a docker config.json / containers auth.json with credentials for this
        registry (default: its first user). style "auth" = base64 field, "plain" =
        username/password fields."""
        if user is None:
            user, password = self.credentials
        if style == "auth":
            entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        else:
            entry = {"username": user, "password": password}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"auths": {self.host: entry}}))
        os.chmod(path, 0o600)
        return Path(path)


# =========================================================================================
# Building images in memory
# =========================================================================================
@dataclass
class Entry:
    """One tar entry of a layer. Build them with the helper functions below."""
    name: str
    kind: str = "file"               # file dir symlink hardlink fifo char block raw
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH
    target: str = ""                 # symlink target / hardlink source
    devmajor: int = 0
    devminor: int = 0
    pax: dict = field(default_factory=dict)
    uname: str = ""
    gname: str = ""
    tarinfo: tarfile.TarInfo | None = None   # kind == "raw": written exactly as given


def file(name, content=b"", mode=0o644, uid=0, gid=0, mtime=EPOCH, pax=None, **kw):
    if isinstance(content, str):
        content = content.encode()
    return Entry(name, "file", content, mode, uid, gid, mtime, pax=dict(pax or {}), **kw)


def directory(name, mode=0o755, uid=0, gid=0, mtime=EPOCH, pax=None):
    return Entry(name, "dir", mode=mode, uid=uid, gid=gid, mtime=mtime, pax=dict(pax or {}))


def symlink(name, target, uid=0, gid=0, mtime=EPOCH):
    return Entry(name, "symlink", mode=0o777, uid=uid, gid=gid, mtime=mtime, target=target)


def hardlink(name, target, mtime=EPOCH):
    return Entry(name, "hardlink", mode=0o644, mtime=mtime, target=target)


def fifo(name, mode=0o644):
    return Entry(name, "fifo", mode=mode)


def chardev(name, major, minor, mode=0o666):
    return Entry(name, "char", mode=mode, devmajor=major, devminor=minor)


def blockdev(name, major, minor, mode=0o660):
    return Entry(name, "block", mode=mode, devmajor=major, devminor=minor)


def whiteout(path):
    """Delete `path` of a lower layer: the entry DIR/.wh.NAME."""
    d, _, base = path.rstrip("/").rpartition("/")
    return Entry((d + "/" if d else "") + ".wh." + base, "file", b"", 0o644)


def opaque(dirpath):
    """Hide every lower-layer entry under `dirpath`: DIR/.wh..wh..opq."""
    return Entry(dirpath.rstrip("/") + "/.wh..wh..opq", "file", b"", 0o644)


def raw(tarinfo, content=b""):
    """An arbitrary TarInfo written as is (for hostile cases: '../x', '/abs', setuid...)."""
    return Entry(tarinfo.name, "raw", content, tarinfo=tarinfo)


def capability_xattr(name, content=b"", mode=0o755):
    """A file carrying a security.capability xattr (cap_net_raw+ep) in a PAX header."""
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    return file(name, content, mode,
                pax={"SCHILY.xattr.security.capability": cap.decode("latin-1")})


_KIND_TYPE = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
              "block": tarfile.BLKTYPE}


def layer_tar(entries):
    """Serialise entries to an uncompressed PAX tar (bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for e in entries:
            if e.kind == "raw":
                ti = e.tarinfo
                data = e.content if e.content else None
                if data is not None:
                    ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data) if data is not None and ti.isreg() else None)
                continue
            ti = tarfile.TarInfo(e.name)
            ti.type = _KIND_TYPE[e.kind]
            default = 0o755 if e.kind == "dir" else 0o644
            ti.mode = default if e.mode is None else e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname, ti.gname = e.uname, e.gname
            ti.mtime = e.mtime
            if e.kind in ("symlink", "hardlink"):
                ti.linkname = e.target
            if e.kind in ("char", "block"):
                ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.pax:
                ti.pax_headers = dict(e.pax)
            if e.kind == "file":
                ti.size = len(e.content)
                tf.addfile(ti, io.BytesIO(e.content))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(data, compression):
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression}")


@dataclass
class LayerBlob:
    tar: bytes                      # uncompressed tar
    blob: bytes                     # as stored in the registry
    compression: str
    media_type: str
    digest: str                     # of blob
    diff_id: str                    # of tar

    @property
    def size(self):
        return len(self.blob)

    def descriptor(self):
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass
class Image:
    """A built image: every blob in memory, manifest bytes fixed."""
    layers: list
    config: dict
    config_bytes: bytes
    config_digest: str
    manifest: dict
    manifest_bytes: bytes
    media_type: str
    oci: bool
    platform: dict

    @property
    def digest(self):
        return sha256(self.manifest_bytes)

    def blobs(self):
        out = {self.config_digest: self.config_bytes}
        for lay in self.layers:
            out[lay.digest] = lay.blob
        return out

    def descriptor(self):
        return {"mediaType": self.media_type, "size": len(self.manifest_bytes),
                "digest": self.digest, "platform": dict(self.platform)}


@dataclass
class ImageIndex:
    images: list
    index: dict
    index_bytes: bytes
    media_type: str
    oci: bool

    @property
    def digest(self):
        return sha256(self.index_bytes)


class ImageBuilder:
    """Build an image from layer specs:

        img = (ImageBuilder(oci=True)
               .layer([directory("bin"), file("bin/hello", b"#!/bin/sh\\n", 0o755)])
               .layer([whiteout("bin/hello")], compression="zstd")
               .env("PATH=/bin").cmd(["/bin/sh"]).label("org.example", "1")
               .build())
    """

    def __init__(self, *, oci=False, os="linux", architecture="amd64", variant=None):
        self.oci = oci
        self.platform = {"os": os, "architecture": architecture}
        if variant:
            self.platform["variant"] = variant
        self._layers = []
        self._cfg = {"Env": [], "Labels": {}}
        self._history = []
        self.created = "2023-11-14T22:13:20Z"

    def layer(self, entries, compression="gzip", comment=None):
        tar = layer_tar(entries)
        blob = compress(tar, compression)
        types = MT_OCI_LAYER if self.oci else MT_DOCKER_LAYER
        self._layers.append(LayerBlob(tar, blob, compression, types[compression],
                                      sha256(blob), sha256(tar)))
        self._history.append({"created": self.created, "created_by": comment or
                              f"hpcc.gateway.testing layer {len(self._layers)}"})
        return self

    def add_layer(self, layer_blob):
        """Reuse a LayerBlob of another image (shared base layers)."""
        self._layers.append(layer_blob)
        self._history.append({"created": self.created, "created_by": "shared layer"})
        return self

    def raw_layer(self, blob, media_type, tar=None, compression="gzip"):
        """A layer from bytes as given (for corrupt/unknown-format cases)."""
        tar = blob if tar is None else tar
        self._layers.append(LayerBlob(tar, blob, compression, media_type, sha256(blob),
                                      sha256(tar)))
        self._history.append({"created": self.created, "created_by": "raw layer"})
        return self

    def env(self, *pairs):
        self._cfg["Env"].extend(pairs)
        return self

    def entrypoint(self, argv):
        self._cfg["Entrypoint"] = list(argv)
        return self

    def cmd(self, argv):
        self._cfg["Cmd"] = list(argv)
        return self

    def workdir(self, path):
        self._cfg["WorkingDir"] = path
        return self

    def user(self, user):
        self._cfg["User"] = user
        return self

    def label(self, key, value):
        self._cfg["Labels"][key] = value
        return self

    def config_extra(self, **kw):
        self._cfg.update(kw)
        return self

    def build(self):
        cfg = {k: v for k, v in self._cfg.items() if v not in ([], {})}
        config = {"created": self.created, "architecture": self.platform["architecture"],
                  "os": self.platform["os"], "config": cfg,
                  "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in self._layers]},
                  "history": list(self._history)}
        if "variant" in self.platform:
            config["variant"] = self.platform["variant"]
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = sha256(config_bytes)
        mt = MT_OCI_MANIFEST if self.oci else MT_DOCKER_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mt,
                    "config": {"mediaType": MT_OCI_CONFIG if self.oci else MT_DOCKER_CONFIG,
                               "size": len(config_bytes), "digest": config_digest},
                    "layers": [x.descriptor() for x in self._layers]}
        manifest_bytes = json.dumps(manifest, indent=3).encode()
        return Image(list(self._layers), config, config_bytes, config_digest, manifest,
                     manifest_bytes, mt, self.oci, dict(self.platform))


def image_index(images, oci=True):
    """A manifest list (Docker) or image index (OCI) over images of several platforms."""
    mt = MT_OCI_INDEX if oci else MT_DOCKER_LIST
    index = {"schemaVersion": 2, "mediaType": mt,
             "manifests": [img.descriptor() for img in images]}
    return ImageIndex(list(images), index, json.dumps(index, indent=3).encode(), mt, oci)


def simple_image(text="hello", *, oci=False, compression="gzip", architecture="amd64",
                 variant=None, layers=2):
    """A small image with `layers` layers, each a directory with one file."""
    b = ImageBuilder(oci=oci, architecture=architecture, variant=variant)
    for i in range(layers):
        b.layer([directory(f"l{i}"), file(f"l{i}/data.txt", f"{text} {i}\n" * (200 + i))],
                compression=compression)
    return b.env("PATH=/usr/bin:/bin").cmd(["/bin/sh"]).label("test.text", text).build()


# =========================================================================================
# Pushing with the registry HTTP API
# =========================================================================================
class _Pusher:
    def __init__(self, base_url, repo, auth=None, verify=True):
        self.base = base_url.rstrip("/")
        self.repo = repo
        self.auth = auth
        self.s = requests.Session()
        self.s.trust_env = False
        self.s.verify = verify
        self.token = None

    def _req(self, method, url, **kw):
        if not url.startswith("http"):
            url = self.base + url
        for _ in range(2):
            headers = dict(kw.pop("headers", {}) or {})
            if self.token:
                headers["Authorization"] = self.token
            r = self.s.request(method, url, headers=headers, timeout=60, **kw)
            if r.status_code != 401 or not r.headers.get("WWW-Authenticate"):
                return r
            kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            self._login(r.headers["WWW-Authenticate"])
        return r

    def _login(self, challenge):
        from .auth import parse_challenge
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.auth:
                raise RuntimeError("registry wants credentials for push")
            self.token = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        elif scheme == "bearer":
            q = {"service": params.get("service", ""),
                 "scope": f"repository:{self.repo}:pull,push"}
            r = self.s.get(params["realm"], params=q, auth=tuple(self.auth) if self.auth else None,
                           timeout=30)
            r.raise_for_status()
            self.token = "Bearer " + r.json()["token"]

    def blob(self, digest, data):
        r = self._req("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        if r.status_code == 200:
            return
        r = self._req("POST", f"/v2/{self.repo}/blobs/uploads/")
        if r.status_code != 202:
            raise RuntimeError(f"blob upload start failed: {r.status_code} {r.text[:200]}")
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base + loc
        sep = "&" if "?" in loc else "?"
        r = self._req("PUT", f"{loc}{sep}digest={digest}", data=data,
                      headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise RuntimeError(f"blob upload of {digest} failed: {r.status_code} {r.text[:300]}")

    def manifest(self, reference, data, media_type):
        r = self._req("PUT", f"/v2/{self.repo}/manifests/{reference}", data=data,
                      headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise RuntimeError(f"manifest PUT {self.repo}:{reference} failed: "
                               f"{r.status_code} {r.text[:300]}")
        return r.headers.get("Docker-Content-Digest")


def push(registry_url, repo, tag, image, auth=None, verify=True):
    """Push an Image or ImageIndex to registry_url (e.g. http://127.0.0.1:5000) as repo:tag
    (monolithic blob uploads, then the manifest(s)); returns the pushed digest."""
    p = _Pusher(registry_url, repo, auth, verify)
    images = image.images if isinstance(image, ImageIndex) else [image]
    for img in images:
        for digest, data in img.blobs().items():
            p.blob(digest, data)
        if isinstance(image, ImageIndex):
            p.manifest(img.digest, img.manifest_bytes, img.media_type)
    if isinstance(image, ImageIndex):
        p.manifest(tag, image.index_bytes, image.media_type)
    else:
        p.manifest(tag, image.manifest_bytes, image.media_type)
    return image.digest


# =========================================================================================
# Archives for `gateway import`
# =========================================================================================
def write_oci_layout(directory_path, image, tag="latest"):
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/*)."""
    d = Path(directory_path)
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    images = image.images if isinstance(image, ImageIndex) else [image]
    for img in images:
        for digest, data in list(img.blobs().items()) + [(img.digest, img.manifest_bytes)]:
            (blobs / digest.split(":", 1)[1]).write_bytes(data)
    if isinstance(image, ImageIndex):
        (blobs / image.digest.split(":", 1)[1]).write_bytes(image.index_bytes)
        top = {"mediaType": image.media_type, "size": len(image.index_bytes),
               "digest": image.digest}
    else:
        top = {"mediaType": image.media_type, "size": len(image.manifest_bytes),
               "digest": image.digest}
    if tag:
        top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (d / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                              "manifests": [top]}))
    return d


def write_oci_archive(tarpath, image, tag="latest"):
    """An oci-archive: the OCI layout as a tar file."""
    with tempfile.TemporaryDirectory(prefix="hpcc-oci-") as tmp:
        write_oci_layout(tmp, image, tag)
        with tarfile.open(tarpath, "w") as tf:
            for name in ("oci-layout", "index.json", "blobs"):
                tf.add(os.path.join(tmp, name), arcname=name)
    return Path(tarpath)


def write_docker_archive(tarpath, image, repo_tag="hpcc-test/image:latest", compressed=False):
    """A `docker save` archive: manifest.json, <config hex>.json, <diff_id hex>/layer.tar
    (uncompressed), and the legacy `repositories` file. compressed=True stores the layers
    as their registry blobs, <digest hex>.tar, as skopeo's docker-archive does."""
    cfg_hex = image.config_digest.split(":", 1)[1]
    files = {f"{cfg_hex}.json": image.config_bytes}
    layer_paths = []
    for lay in image.layers:
        if compressed:
            p = f"{lay.digest.split(':', 1)[1]}.tar"
            files[p] = lay.blob
        else:
            p = f"{lay.diff_id.split(':', 1)[1]}/layer.tar"
            files[p] = lay.tar
        layer_paths.append(p)
    manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": [repo_tag] if repo_tag else [],
                 "Layers": layer_paths}]
    files["manifest.json"] = json.dumps(manifest).encode()
    if repo_tag:
        name, _, tag = repo_tag.rpartition(":")
        files["repositories"] = json.dumps(
            {name: {tag: layer_paths[-1].split("/")[0] if layer_paths else cfg_hex}}).encode()
    with tarfile.open(tarpath, "w") as tf:
        dirs = sorted({p.split("/")[0] for p in files if "/" in p})
        for dname in dirs:
            ti = tarfile.TarInfo(dname)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, EPOCH
            tf.addfile(ti, io.BytesIO(data))
    return Path(tarpath)


# =========================================================================================
# The demo image
# =========================================================================================
BUSYBOX_SYMLINKS = ("sh", "ls", "cat", "echo", "id", "true", "false", "uname", "mkdir",
                    "rm", "cp", "mv", "ln", "pwd", "sleep", "grep", "sed", "head", "tail",
                    "wc", "touch", "test", "[", "printf", "hostname", "ps", "whoami",
                    "stat", "chmod", "readlink", "find", "sort", "tr", "cut", "date", "df",
                    "mount", "dirname", "basename", "expr", "seq", "kill", "xargs", "awk",
                    "md5sum", "sha256sum", "du", "tee", "which", "vi", "less", "nproc")
BUSYBOX_HARDLINKS = ("env",)     # one applet as a hardlink, so images carry one


def busybox_image(*, oci=False, compression="gzip"):
    """The demo image: Debian's static busybox in two layers.

    Layer 1: /bin/busybox, applets as symlinks (and `env` as a hardlink), /etc/passwd,
    /etc/group, /etc/os-release, /etc/motd, /tmp (1777), /root, /home.
    Layer 2: /app/hello.sh and /app/README, and a whiteout deleting /etc/motd.
    Config: PATH, Cmd ["/bin/sh"], WorkingDir "/", labels.
    """
    data = Path(BUSYBOX).read_bytes()
    base = [directory("bin"), file("bin/busybox", data, 0o755)]
    base += [symlink(f"bin/{a}", "busybox") for a in BUSYBOX_SYMLINKS]
    base += [hardlink(f"bin/{a}", "bin/busybox") for a in BUSYBOX_HARDLINKS]
    base += [
        directory("usr"), directory("usr/bin"), symlink("usr/bin/env", "../../bin/env"),
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                           "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        file("etc/os-release", 'NAME="hpcc busybox"\nID=hpcc-busybox\n'
                               'PRETTY_NAME="hpcc demo image (busybox)"\nVERSION_ID=1\n'),
        file("etc/motd", "this file is deleted by a whiteout in layer 2\n"),
        directory("tmp", 0o1777), directory("root", 0o700), directory("home"),
        directory("proc"), directory("sys"), directory("dev"),
    ]
    app = [
        directory("app"),
        file("app/hello.sh", "#!/bin/sh\necho \"hello from $(uname -s) in an hpcc container, "
                             "uid $(id -u)\"\n", 0o755),
        file("app/README", "hpcc demo image\n"),
        whiteout("etc/motd"),
    ]
    return (ImageBuilder(oci=oci)
            .layer(base, compression=compression, comment="busybox base")
            .layer(app, compression=compression, comment="demo app")
            .env("PATH=/usr/local/bin:/usr/bin:/bin", "HPCC_DEMO=1")
            .cmd(["/bin/sh"]).workdir("/")
            .label("org.opencontainers.image.title", "hpcc busybox demo")
            .label("org.opencontainers.image.source", "hpcc.gateway.testing.busybox_image")
            .build())


# =========================================================================================
# Fault injection
# =========================================================================================
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

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

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

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hpcc-fault-proxy",
                         daemon=True).start()
        return self

    def stop(self):
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
