"""A real local registry for tests and the demo: Debian's /usr/bin/docker-registry on
127.0.0.1:<free port>, optionally with TLS (a throw-away CA), htpasswd basic auth, or token
auth (tokenserver.TokenServer, in this process); and push() with the registry HTTP API.
"""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import requests

from .certs import make_cert, new_key, pem_cert, pem_key
from .images import ImageIndex
from .services import free_port, stop_process
from .tokenserver import TokenServer

DOCKER_REGISTRY = "/usr/bin/docker-registry"


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
        ca_key = new_key()
        ca = make_cert("hpcc test CA", ca_key, ca=True)
        key = new_key()
        cert = make_cert("127.0.0.1", key, ca, ca_key, sans=sans)
        (self.workdir / "ca.pem").write_bytes(pem_cert(ca))
        (self.workdir / "server.pem").write_bytes(pem_cert(cert))
        (self.workdir / "server.key").write_bytes(pem_key(key))
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
