"""A real local registry for tests and the demo: Debian's /usr/bin/docker-registry on
127.0.0.1:<free port>, optionally with TLS (a throw-away CA), htpasswd basic auth, or token
auth (a small RS256 token server in this process); and push() with the registry HTTP API.
"""
import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

from .images import ImageIndex

DOCKER_REGISTRY = "/usr/bin/docker-registry"


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc):
    """End a service started by a test: SIGTERM, then SIGKILL if it has not exited within
    10 seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """The base of the test servers' request handlers: HTTP/1.1 (kept-alive connections,
    as a registry's clients use) and no log line per request."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def serve_in_thread(port, handler, name):
    """A ThreadingHTTPServer for `handler` on 127.0.0.1:port, served by a daemon thread
    called `name`; end it with stop_server."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
    return httpd


def stop_server(httpd):
    """Stop a server of serve_in_thread (None: nothing to stop) and close its socket."""
    if httpd:
        httpd.shutdown()
        httpd.server_close()


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
        raise RuntimeError("hpcc.testkit needs the 'cryptography' package "
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

        class Handler(QuietHandler):
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
                self._reply(200, {"token": tok, "access_token": tok,
                                  "expires_in": server.token_lifetime,
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

        self._httpd = serve_in_thread(self.port, Handler, "hpcc-token-server")
        return self

    def stop(self):
        stop_server(self._httpd)
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
                stop_process(self.proc)
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
        from hpcc.gateway.auth import parse_challenge
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
