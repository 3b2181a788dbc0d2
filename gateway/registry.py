"""OCI distribution / Docker registry v2 client used by `gateway pull`.

    client = RegistryClient(config)
    img = client.resolve(parse_reference("127.0.0.1:5000/app:1"), platform="linux/amd64")
    paths = client.fetch_layers(img, BlobCache(root))

What it does: anonymous, Basic and Bearer-token (WWW-Authenticate challenge) access with
credentials from docker/containers auth files; Docker schema2 and OCI manifests; manifest
lists / OCI indexes with platform selection; gzip, zstd and uncompressed layers (media type
checked against the blob's magic bytes); digest and size verification of every manifest and
blob; retries with exponential backoff on 5xx and connection errors; resumable blob
downloads (HTTP Range from the partial file in the cache); concurrent layer downloads into
the digest-addressed blob cache.

Transport rules: https everywhere (system CAs, or the registry's configured `ca_file`).
Plain http only for loopback registries (127.0.0.0/8, ::1, localhost) and registries marked
insecure (config `registries."host:port".insecure = true`, or insecure=True): those try
https first and fall back to http when the server does not speak TLS; an insecure registry
also skips certificate verification.
"""
import hashlib
import ipaddress
import json
import os
import platform as _platform
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter

from hpcc.errors import ConfigError, ImageError, RegistryError
from hpcc.reference import DIGEST_RE, Reference

from .auth import find_credentials, parse_challenge

# Media types -----------------------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}

MAX_MANIFEST = 4 << 20        # manifests and configs larger than this are refused
_CHUNK = 1 << 20              # blob data handed to the cache (write, hash, progress) at once
_READ = 1 << 16               # one read from the connection (a TLS record is 16 KiB)
_RETRY_STATUS = (500, 502, 503, 504)


class DownloadAborted(RegistryError):
    """A blob download stopped on request (fetch_blob's `abort` event)."""


@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    compression: str        # "gzip" | "zstd" | "none"


@dataclass
class ResolvedImage:
    ref: Reference                  # with the manifest digest filled in
    manifest_digest: str
    manifest: dict
    manifest_bytes: bytes
    media_type: str
    config: dict
    config_digest: str
    layers: list = field(default_factory=list)
    platform: str = ""
    index_digest: str | None = None  # the manifest list / index the platform came from


# Platforms -------------------------------------------------------------------------------
_MACHINE_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "i386": "386", "i686": "386",
    "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "armv6l": "arm",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64le",
}


def host_platform():
    """This machine's platform in OCI terms, e.g. 'linux/amd64', 'linux/arm/v7'."""
    m = _platform.machine().lower()
    arch = _MACHINE_ARCH.get(m, m)
    if m == "armv7l":
        return "linux/arm/v7"
    if m == "armv6l":
        return "linux/arm/v6"
    return f"linux/{arch}"


def parse_platform(s):
    """'linux/arm64/v8' -> ('linux', 'arm64', 'v8'); raises ConfigError if malformed."""
    parts = s.strip().split("/") if s else []
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"invalid platform '{s}'",
                          hint="expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")
    arch = _MACHINE_ARCH.get(parts[1], parts[1])
    return parts[0], arch, parts[2] if len(parts) == 3 else None


def _platform_str(p):
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += "/" + p["variant"]
    return s


def _variant_matches(want, have, arch):
    if want is None:
        return True
    if have == want:
        return True
    # arm64 images usually carry no variant; v8 is implied.
    return arch == "arm64" and want == "v8" and not have


# Helpers ---------------------------------------------------------------------------------
def select_platform(ref, index, want):
    """The entry of a manifest list / OCI index for platform `want` (os, arch, variant);
    `ref` names the image in the error, which lists the platforms there are."""
    os_, arch, variant = want
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"manifest list of {ref} has no 'manifests' array")
    available = []
    candidates = []
    for d in entries:
        if not isinstance(d, dict):
            continue
        p = d.get("platform") or {}
        if p.get("os") in (None, "unknown") or p.get("architecture") in (None, "unknown"):
            continue      # attestations and other non-image entries
        available.append(_platform_str(p))
        if p.get("os") == os_ and p.get("architecture") == arch and \
                _variant_matches(variant, p.get("variant"), arch):
            candidates.append(d)
    if not candidates:
        wanted = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
        avail = ", ".join(dict.fromkeys(available)) or "none"
        raise ImageError(f"image {ref} has no variant for platform {wanted}; "
                         f"available platforms: {avail}",
                         hint="choose one with --platform")
    # Prefer the entry with no os.version/features constraint, then the first listed.
    return candidates[0]


def is_loopback(host):
    """host[:port] names a loopback address (127.0.0.0/8, ::1, localhost)."""
    h = host
    if h.startswith("["):
        h = h[1:h.index("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def sniff_compression(head):
    """'gzip' | 'zstd' | 'none' (a tar header) from a blob's first 512 bytes, else None."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if len(head) >= 512:
        block = head[:512]
        if block == b"\0" * 512:
            return "none"           # an empty tar archive
        if block[257:262] == b"ustar":
            return "none"
        try:                        # pre-POSIX (v7) tar: check the header checksum
            stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            return None
        if stored == sum(block[:148]) + 8 * 32 + sum(block[156:]):
            return "none"
    return None


def _error_code(resp):
    """First error code/message from an OCI error body, or ('', '')."""
    try:
        errs = resp.json().get("errors") or []
        if errs and isinstance(errs[0], dict):
            return str(errs[0].get("code", "")), str(errs[0].get("message", ""))
    except (ValueError, AttributeError):
        pass
    return "", ""


def _root_cause(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None and exc.args and isinstance(exc.args[0], BaseException):
            nxt = exc.args[0]
        if nxt is None and hasattr(exc, "reason") and isinstance(exc.reason, BaseException):
            nxt = exc.reason
        if nxt is None:
            return exc
        exc = nxt
    return exc


def _describe_conn_error(exc):
    text = str(exc)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or \
            "temporary failure in name resolution" in low or "failed to resolve" in low:
        return "host name not found"
    if "timed out" in low or isinstance(exc, requests.Timeout):
        return "timed out"
    if "reset" in low:
        return "connection reset"
    root = _root_cause(exc)
    return str(root) or type(root).__name__


def _iter_body(r, abort=None):
    """Yield a streamed response body in pieces of about _CHUNK bytes (views of one reused
    buffer: use each before asking for the next).

    Reads go through read1(_READ): each hands over what one socket (or TLS record) read
    brought, so when the connection drops, every byte received before the cut is yielded
    (then the error is raised) and a resume starts right after them. The bytes are
    gathered into _CHUNK pieces so the caller's per-piece work (file write, hash update,
    progress) is done ~300 times for a 300 MB layer, not once per 16 KiB TLS record.
    read1() with a small size also keeps urllib3 from allocating a _CHUNK-sized buffer
    per call (a 1 MiB read1() costs ~90 µs each, 1.8 CPU-s for a 300 MB layer over TLS).
    When `abort` (a threading.Event) is set, what arrived is yielded and the body ends."""
    raw = r.raw
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 < 2.1
        chunks = r.iter_content(_READ)
        read1 = lambda _n: next(chunks, b"")  # noqa: E731
    buf = bytearray(_CHUNK + _READ)
    view = memoryview(buf)
    got = 0
    try:
        while True:
            chunk = read1(_READ)
            if not chunk:
                break
            n = len(chunk)
            view[got:got + n] = chunk
            got += n
            if got >= _CHUNK or abort is not None and abort.is_set():
                piece, got = view[:got], 0
                yield piece
                if abort is not None and abort.is_set():
                    return
    except BaseException:
        if got:
            piece, got = view[:got], 0
            yield piece          # what arrived before the error, then the error
        raise
    if got:
        yield view[:got]


class _HostState:
    """What the client learned about one registry host: base URL, TLS, auth."""

    def __init__(self, host):
        self.host = host
        self.base = None            # "https://host" or "http://host"
        self.verify = True
        self.challenge = None       # (scheme, params) of the last 401
        self.tokens = {}            # scope -> bearer token
        self.lock = threading.Lock()


class RegistryClient:
    """A client for one or more registries; thread-safe (one requests.Session)."""

    def __init__(self, config=None, *, auth_file=None, insecure=False, ca_file=None,
                 retries=None, timeout=(10, 60), backoff=0.5):
        config = config or {}
        self.config = config
        self.registries = config.get("registries", {}) or {}
        gw = config.get("gateway", {}) or {}
        self.retries = gw.get("retries", 5) if retries is None else retries
        self.default_platform = gw.get("platform", "") or None
        self.concurrency = gw.get("concurrent_downloads", 4)
        self.auth_file = auth_file
        self.insecure = insecure
        self.ca_file = ca_file
        self.timeout = tuple(timeout) if isinstance(timeout, (tuple, list)) else (timeout, timeout)
        self.backoff = backoff
        self.session = requests.Session()
        # Environment proxies are applied per request by _proxies() (never for loopback
        # registries); trust_env would also let ~/.netrc override registry credentials.
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=32, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers["User-Agent"] = "hpcc-gateway/0.1"
        self._hosts = {}
        self._hosts_lock = threading.Lock()
        self._creds = {}
        self.request_log = []               # (method, url, status) of every response

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport -------------------------------------------------------------------------
    def _registry_conf(self, host):
        conf = self.registries.get(host)
        if conf is None and ":" in host and not host.startswith("["):
            conf = self.registries.get(host.split(":", 1)[0])
        return conf or {}

    def _host_insecure(self, host):
        return self.insecure or bool(self._registry_conf(host).get("insecure"))

    def _verify_for(self, host):
        if self._host_insecure(host):
            # The admin chose an insecure registry; urllib3 would warn on every request.
            import urllib3
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            return False
        ca = self.ca_file or self._registry_conf(host).get("ca_file")
        if ca:
            if not os.path.isfile(ca):
                raise ConfigError(f"CA file {ca} for registry {host} does not exist",
                                  hint=f"fix registries.\"{host}\".ca_file in the config")
            return ca
        env = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        if env:
            return env
        system = "/etc/ssl/certs/ca-certificates.crt"
        return system if os.path.exists(system) else True

    def _host(self, host):
        with self._hosts_lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = _HostState(host)
        with st.lock:
            if st.base is None:
                st.verify = self._verify_for(host)
                st.base = self._probe(host, st.verify)
        return st

    def _tls_error(self, host, exc):
        text = str(_root_cause(exc))
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in text:
            why = text.split("certificate verify failed:", 1)[-1].strip(" )'\"") or text
            return RegistryError(
                f"TLS error talking to registry {host}: certificate verify failed ({why})",
                hint=f"set registries.\"{host}\".ca_file in the config to the registry's CA "
                     "certificate (or mark it insecure if you trust the network)")
        return RegistryError(f"TLS error talking to registry {host}: {text}",
                             hint=f"if {host} serves plain http, mark it insecure in the config "
                                  f"(registries.\"{host}\".insecure = true)")

    def _probe(self, host, verify):
        """Pick https or (loopback/insecure only) http for a host by asking /v2/."""
        plain_ok = is_loopback(host) or self._host_insecure(host)
        url = f"https://{host}/v2/"
        last = None
        for attempt in range(self.retries + 1):
            try:
                r = self.session.get(url, timeout=(self.timeout[0], min(self.timeout[1], 10)),
                                     verify=verify, allow_redirects=False,
                                     proxies=self._proxies(url))
                r.close()
                if r.status_code in _RETRY_STATUS and attempt < self.retries:
                    self._sleep(attempt)
                    continue
                return f"https://{host}"
            except requests.exceptions.SSLError as e:
                cert_problem = "CERTIFICATE_VERIFY_FAILED" in str(e) or \
                    "certificate verify failed" in str(e)
                if plain_ok and not cert_problem:
                    return f"http://{host}"
                raise self._tls_error(host, e) from None
            except requests.exceptions.ConnectionError as e:
                last = e
                if plain_ok and "refused" not in str(e).lower():
                    # A plain-http server may reset a TLS hello instead of answering it.
                    return f"http://{host}"
                if attempt < self.retries:
                    self._sleep(attempt)
                    continue
            except requests.exceptions.Timeout as e:
                last = e
                if plain_ok:
                    # Some plain-http servers wait silently for a request line after a TLS
                    # hello; a loopback/insecure host that does not answer TLS is plain.
                    return f"http://{host}"
                if attempt < self.retries:
                    self._sleep(attempt)
                    continue
        raise RegistryError(
            f"cannot connect to registry {host}: {_describe_conn_error(last)}"
            + (f" (after {self.retries + 1} attempts)" if self.retries else ""),
            hint="check the registry address and that it is running")

    @staticmethod
    def _proxies(url):
        """$https_proxy/$http_proxy (honouring $no_proxy) for `url`; none for loopback."""
        host = url.split("/")[2]
        if is_loopback(host):
            return {}
        return {k: v for k, v in requests.utils.get_environ_proxies(url).items()
                if k in ("http", "https", "all")}

    def _sleep(self, attempt, retry_after=None):
        if retry_after is not None:
            delay = min(retry_after, 30.0)
        else:
            delay = min(self.backoff * (2 ** attempt), 20.0) * (0.75 + random.random() / 2)
        time.sleep(delay)

    def _credentials(self, ref):
        key = (ref.api_host, ref.path)
        if key not in self._creds:
            self._creds[key] = find_credentials(ref.api_host, ref.path, self.auth_file,
                                                domain=ref.domain)
        return self._creds[key]

    def _auth_header(self, st, ref, scope):
        if st.challenge is None:
            return None
        scheme, params = st.challenge
        creds = self._credentials(ref)
        if scheme == "basic":
            return creds.basic_header() if creds and creds.username else None
        if scheme == "bearer":
            with st.lock:
                tok = st.tokens.get(scope)
                if tok is None:
                    tok = st.tokens[scope] = self._fetch_token(st, ref, params, scope, creds)
            return "Bearer " + tok
        return None

    def _fetch_token(self, st, ref, params, scope, creds):
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {st.host} asked for a Bearer token without a realm")
        if realm.startswith("http://") and not (is_loopback(realm.split("/")[2])
                                                 or self._host_insecure(st.host)):
            raise RegistryError(f"registry {st.host} sends credentials to a plain-http token "
                                f"server ({realm}); refusing",
                                hint=f"mark {st.host} insecure in the config if this is intended")
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        query["scope"] = scope
        headers = {}
        if creds and creds.username:
            headers["Authorization"] = creds.basic_header()
        realm_host = realm.split("/")[2]
        verify = st.verify if realm_host == st.host else self._verify_for(realm_host)
        last = None
        for attempt in range(self.retries + 1):
            try:
                r = self.session.get(realm, params=query, headers=headers,
                                     timeout=self.timeout, verify=verify,
                                     proxies=self._proxies(realm))
            except requests.exceptions.SSLError as e:
                raise self._tls_error(realm.split("/")[2], e) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                last = f"cannot connect to the token server {realm}: {_describe_conn_error(e)}"
                if attempt < self.retries:
                    self._sleep(attempt)
                    continue
                raise RegistryError(last) from None
            if r.status_code in _RETRY_STATUS and attempt < self.retries:
                self._sleep(attempt)
                continue
            break
        if r.status_code in (401, 403):
            who = f"user '{creds.username}'" if creds and creds.username else "anonymous access"
            raise RegistryError(
                f"access denied: the token server {realm} refused {who} for {ref} "
                f"(HTTP {r.status_code})",
                hint="log in (docker login / podman login) or check the credentials in "
                     "~/.docker/config.json or $REGISTRY_AUTH_FILE")
        if r.status_code != 200:
            raise RegistryError(f"token server {realm} answered HTTP {r.status_code} for {ref}")
        try:
            body = r.json()
            tok = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            tok = None
        if not tok or not isinstance(tok, str):
            raise RegistryError(f"token server {realm} returned no token for {ref}")
        return tok

    def _request(self, ref, method, url_path, *, headers=None, stream=False, what=None):
        """One registry API request with auth and retries. Returns the response for any
        status that is not retried (the caller interprets 2xx/4xx)."""
        st = self._host(ref.api_host)
        scope = f"repository:{ref.path}:pull"
        url = st.base + url_path
        what = what or str(ref)
        authed_after_challenge = False
        attempt = 0
        while True:
            h = dict(headers or {})
            auth = self._auth_header(st, ref, scope)
            if auth:
                h["Authorization"] = auth
            try:
                r = self.session.request(method, url, headers=h, stream=stream,
                                         timeout=self.timeout, verify=st.verify,
                                         proxies=self._proxies(url))
            except requests.exceptions.SSLError as e:
                raise self._tls_error(ref.api_host, e) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                if attempt < self.retries:
                    self._sleep(attempt)
                    attempt += 1
                    continue
                raise RegistryError(
                    f"cannot fetch {what} from registry {ref.api_host}: "
                    f"{_describe_conn_error(e)} (after {attempt + 1} attempts)") from None
            self.request_log.append((method, url, r.status_code))
            if r.status_code in _RETRY_STATUS and attempt < self.retries:
                ra = r.headers.get("Retry-After")
                r.close()
                self._sleep(attempt, float(ra) if ra and ra.isdigit() else None)
                attempt += 1
                continue
            if r.status_code == 401 and not authed_after_challenge:
                scheme, params = parse_challenge(r.headers.get("WWW-Authenticate", ""))
                if scheme in ("basic", "bearer"):
                    r.close()
                    with st.lock:
                        if st.challenge != (scheme, params):
                            st.challenge = (scheme, params)
                            st.tokens.clear()
                        else:
                            st.tokens.pop(scope, None)   # expired token: get a new one
                    if scheme == "basic" and not (self._credentials(ref) or None):
                        raise self._denied(ref, 401, what, need_login=True)
                    authed_after_challenge = True
                    continue
            return r

    def _denied(self, ref, status, what, need_login=False):
        creds = self._credentials(ref)
        if creds and not need_login and status == 403:
            detail = (f"user '{creds.username}' (credentials from {creds.source}) may not "
                      "pull this image")
        elif creds and not need_login:
            detail = f"the credentials of user '{creds.username}' from {creds.source} were refused"
        else:
            detail = "no credentials were found"
        return RegistryError(
            f"access denied to {what} at registry {ref.api_host} (HTTP {status}): {detail}",
            hint="log in (docker login / podman login) or check the credentials in "
                 "~/.docker/config.json or $REGISTRY_AUTH_FILE")

    def _http_error(self, ref, r, what, kind):
        code, msg = _error_code(r)
        r.close()
        if r.status_code in (401, 403):
            return self._denied(ref, r.status_code, what)
        if r.status_code == 404:
            if kind == "manifest":
                reason = {"NAME_UNKNOWN": "repository unknown"}.get(code, "manifest unknown")
                return RegistryError(f"image {ref} not found in registry {ref.api_host} "
                                     f"({reason})",
                                     hint="check the name and tag")
            return RegistryError(f"{what} not found in registry {ref.api_host} (blob unknown)")
        if r.status_code == 429:
            return RegistryError(f"registry {ref.api_host} refused {what}: too many requests "
                                 "(rate limit)",
                                 hint="try again later, or log in to get a higher limit")
        if r.status_code in _RETRY_STATUS:
            return RegistryError(f"registry {ref.api_host} failed with HTTP {r.status_code} "
                                 f"for {what} after {self.retries + 1} attempts",
                                 hint="try again later")
        detail = f": {code} {msg}".rstrip() if code or msg else ""
        return RegistryError(f"registry {ref.api_host} answered HTTP {r.status_code} for "
                             f"{what}{detail}")

    # -- manifests -------------------------------------------------------------------------
    def _get_manifest(self, ref, reference):
        r = self._request(ref, "GET", f"/v2/{ref.path}/manifests/{reference}",
                          headers={"Accept": ACCEPT}, stream=True, what=f"image {ref}")
        if r.status_code != 200:
            raise self._http_error(ref, r, f"image {ref}", "manifest")
        try:
            body = self._read_limited(r, MAX_MANIFEST, f"the manifest of {ref}")
        except (requests.exceptions.RequestException, OSError) as e:
            raise RegistryError(f"cannot fetch the manifest of {ref} from {ref.api_host}: "
                                f"{_describe_conn_error(e)}") from None
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST_RE.match(reference) and digest != reference:
            raise ImageError(f"manifest of {ref} has digest {digest} instead of {reference}; "
                             "the registry served corrupt data")
        served = r.headers.get("Docker-Content-Digest")
        if served and served.startswith("sha256:") and served != digest:
            raise ImageError(f"manifest of {ref} has digest {digest} but the registry "
                             f"announced {served}; the registry served corrupt data")
        ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        return body, digest, ctype

    @staticmethod
    def _read_limited(r, limit, what):
        cl = r.headers.get("Content-Length")
        if cl and cl.isdigit() and int(cl) > limit:
            r.close()
            raise ImageError(f"{what} is {cl} bytes, more than the {limit} allowed")
        buf = bytearray()
        for chunk in r.iter_content(65536):
            buf += chunk
            if len(buf) > limit:
                r.close()
                raise ImageError(f"{what} is more than the {limit} bytes allowed")
        return bytes(buf)

    @staticmethod
    def _parse_json(body, what):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{what} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ImageError(f"{what} is not a JSON object")
        return data

    @staticmethod
    def _media_type(ctype, data, what):
        mt = data.get("mediaType") or ""
        if ctype in DOCKER_SCHEMA1 or mt in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
            raise ImageError(f"{what} uses the deprecated Docker schema 1 manifest format, "
                             "which hpcc does not support",
                             hint="push the image again with a current docker/podman/skopeo")
        for cand in (mt, ctype):
            if cand in MANIFEST_TYPES or cand in INDEX_TYPES:
                return cand
        if "manifests" in data:
            return OCI_INDEX
        if "layers" in data and "config" in data:
            return OCI_MANIFEST
        raise ImageError(f"{what} has an unsupported media type '{mt or ctype}'",
                         hint="hpcc pulls Docker schema 2 and OCI images")

    def resolve(self, ref, platform=None):
        """Fetch and check the manifest (following a manifest list / index to the entry of
        `platform`, default the config's gateway.platform or this machine) and the image
        config. Returns a ResolvedImage; no layer is downloaded."""
        explicit = platform is not None
        plat = platform or self.default_platform or host_platform()
        want = parse_platform(plat)
        reference = ref.digest or ref.tag
        body, digest, ctype = self._get_manifest(ref, reference)
        data = self._parse_json(body, f"manifest of {ref}")
        mt = self._media_type(ctype, data, f"manifest of {ref}")
        index_digest = None
        depth = 0
        while mt in INDEX_TYPES:
            depth += 1
            if depth > 2:
                raise ImageError(f"manifest list of {ref} nests too deeply")
            index_digest = index_digest or digest
            entry = select_platform(ref, data, want)
            child = entry.get("digest", "")
            if not DIGEST_RE.match(str(child)):
                raise ImageError(f"manifest list of {ref} has an entry with a malformed "
                                 f"digest '{child}'")
            body, digest, ctype = self._get_manifest(ref, child)
            if isinstance(entry.get("size"), int) and entry["size"] != len(body):
                raise ImageError(f"manifest {child} of {ref} has {len(body)} bytes instead of "
                                 f"{entry['size']}; the registry served corrupt data")
            data = self._parse_json(body, f"manifest {child} of {ref}")
            mt = self._media_type(ctype or entry.get("mediaType", ""), data,
                                  f"manifest {child} of {ref}")
        return self._resolve_manifest(ref, data, body, digest, mt, want, explicit, index_digest)

    def _resolve_manifest(self, ref, data, body, digest, mt, want, explicit, index_digest):
        what = f"manifest of {ref}"
        cfg = data.get("config")
        if not isinstance(cfg, dict) or not DIGEST_RE.match(str(cfg.get("digest", ""))):
            raise ImageError(f"{what} has no valid config descriptor")
        cfg_type = cfg.get("mediaType", "")
        if cfg_type and cfg_type not in (DOCKER_CONFIG, OCI_CONFIG):
            raise ImageError(f"{ref} is not a container image (its config has media type "
                             f"'{cfg_type}')")
        layers = []
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list):
            raise ImageError(f"{what} has no 'layers' array")
        for i, lay in enumerate(raw_layers):
            if not isinstance(lay, dict):
                raise ImageError(f"{what}: layer {i} is not an object")
            ld = str(lay.get("digest", ""))
            if not DIGEST_RE.match(ld):
                raise ImageError(f"{what}: layer {i} has a malformed digest '{ld}'")
            size = lay.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ImageError(f"{what}: layer {ld} has no valid size")
            lmt = lay.get("mediaType", "")
            comp = LAYER_TYPES.get(lmt)
            if comp is None:
                raise ImageError(f"{what}: layer {ld} has an unsupported media type '{lmt}'",
                                 hint="hpcc understands tar layers, gzip or zstd compressed")
            if lay.get("urls"):
                raise ImageError(f"{what}: layer {ld} is a foreign layer hosted elsewhere "
                                 "(Windows base layers); not supported")
            layers.append(Layer(ld, size, lmt, comp))
        cfg_size = cfg.get("size")
        if not isinstance(cfg_size, int) or cfg_size < 0 or cfg_size > MAX_MANIFEST:
            raise ImageError(f"{what}: the config descriptor has no valid size")
        cfg_bytes = self._fetch_small_blob(ref, cfg["digest"], cfg_size, f"config of {ref}")
        config = self._parse_json(cfg_bytes, f"image config of {ref}")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if diff_ids is not None and (not isinstance(diff_ids, list)
                                     or len(diff_ids) != len(layers)):
            raise ImageError(f"image config of {ref} lists {len(diff_ids or [])} layer diff_ids "
                             f"but the manifest has {len(layers)} layers")
        plat = {"os": config.get("os"), "architecture": config.get("architecture"),
                "variant": config.get("variant")}
        if not plat["os"] or not plat["architecture"]:
            raise ImageError(f"image config of {ref} has no os/architecture")
        os_, arch, variant = want
        if explicit and index_digest is None and (
                plat["os"] != os_ or plat["architecture"] != arch
                or not _variant_matches(variant, plat.get("variant"), arch)):
            raise ImageError(f"image {ref} is for platform {_platform_str(plat)}, not "
                             f"{os_}/{arch}" + (f"/{variant}" if variant else ""),
                             hint="choose its platform with --platform or another image")
        return ResolvedImage(
            ref=ref.with_digest(digest) if ref.digest is None else ref,
            manifest_digest=digest, manifest=data, manifest_bytes=body, media_type=mt,
            config=config, config_digest=cfg["digest"], layers=layers,
            platform=_platform_str(plat), index_digest=index_digest)

    def _fetch_small_blob(self, ref, digest, size, what):
        r = self._request(ref, "GET", f"/v2/{ref.path}/blobs/{digest}", stream=True, what=what)
        if r.status_code != 200:
            raise self._http_error(ref, r, f"{what} ({digest})", "blob")
        try:
            body = self._read_limited(r, MAX_MANIFEST, what)
        except (requests.exceptions.RequestException, OSError) as e:
            raise RegistryError(f"cannot fetch the {what} from {ref.api_host}: "
                                f"{_describe_conn_error(e)}") from None
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if len(body) != size:
            raise ImageError(f"{what} has {len(body)} bytes instead of {size}; "
                             "the registry served corrupt data")
        if actual != digest:
            raise ImageError(f"{what} has digest {actual} instead of {digest}; "
                             "the registry served corrupt data")
        return body

    # -- blobs -----------------------------------------------------------------------------
    def fetch_blob(self, ref, digest, size, cache, progress=None, what=None, abort=None):
        """Download one blob into `cache` (resuming a partial download), verify its digest
        and size, and return its path in the cache. A cached blob costs no request.

        `abort`: an optional threading.Event; when set (another download failed, or the
        user pressed ^C), the download stops within one chunk, keeps its partial file for
        a later resume, and raises DownloadAborted."""
        what = what or f"blob {digest} of {ref}"
        if not DIGEST_RE.match(str(digest)):
            raise ImageError(f"{what} has a malformed digest")
        if cache.has(digest, size):
            if progress:
                progress("cached", digest, size, size)
            return cache.path(digest)
        with cache.ingest(digest, size) as ing:
            if ing is None:
                if progress:
                    progress("cached", digest, size, size)
                return cache.path(digest)
            self._download(ref, digest, size, ing, progress, what, abort)
            if progress:
                progress("verify", digest, ing.offset, size)
            path = ing.commit(what)
        if progress:
            progress("done", digest, size, size)
        return path

    def _download(self, ref, digest, size, ing, progress, what, abort=None):
        url_path = f"/v2/{ref.path}/blobs/{digest}"
        attempt = 0
        if progress:
            progress("start", digest, ing.offset, size)
        while True:
            if size is not None and ing.offset == size:
                return
            headers = {}
            resuming = ing.offset > 0
            if resuming:
                headers["Range"] = f"bytes={ing.offset}-"
            r = self._request(ref, "GET", url_path, headers=headers, stream=True, what=what)
            if r.status_code == 416 and resuming:
                r.close()
                ing.restart()
                continue
            if r.status_code == 206 and resuming:
                cr = r.headers.get("Content-Range", "")
                if not cr.startswith(f"bytes {ing.offset}-"):
                    r.close()
                    ing.restart()            # a range we did not ask for: start over
                    continue
            elif r.status_code == 200:
                if resuming:
                    ing.restart()            # the server ignored Range: full download
            else:
                raise self._http_error(ref, r, what, "blob")
            try:
                for chunk in _iter_body(r, abort):
                    ing.write(chunk)
                    if progress:
                        progress("progress", digest, ing.offset, size)
                if abort is not None and abort.is_set() and (size is None or ing.offset < size):
                    r.close()
                    ing.flush()
                    raise DownloadAborted(f"download of {what} was stopped")
                r.close()
            except (requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    urllib3.exceptions.HTTPError, OSError) as e:
                r.close()
                ing.flush()
                if attempt >= self.retries:
                    raise RegistryError(f"download of {what} from {ref.api_host} failed: "
                                        f"{_describe_conn_error(e)} (after {attempt + 1} "
                                        "attempts)",
                                        hint="run the pull again; it resumes where it stopped") \
                        from None
                if progress:
                    progress("retry", digest, ing.offset, size)
                self._sleep(attempt)
                attempt += 1
                continue
            if size is None or ing.offset >= size:
                return
            # The body ended early without an error (Content-Length-less close): resume.
            ing.flush()
            if attempt >= self.retries:
                raise RegistryError(f"download of {what} from {ref.api_host} stopped at "
                                    f"{ing.offset} of {size} bytes (after {attempt + 1} attempts)",
                                    hint="run the pull again; it resumes where it stopped")
            self._sleep(attempt)
            attempt += 1

    def fetch_layers(self, img, cache, progress=None, concurrency=None):
        """Download every layer of `img` into `cache` concurrently (threads); verify each;
        check its magic bytes against its media type. Returns the cache paths in layer
        order."""
        n = max(1, min(concurrency or self.concurrency or 4, max(1, len(img.layers))))
        ref = img.ref

        stop = threading.Event()

        def one(layer):
            what = f"layer {layer.digest} of {ref}"
            path = self.fetch_blob(ref, layer.digest, layer.size, cache, progress, what, stop)
            self._check_magic(layer, path, what)
            return path

        if n == 1 or len(img.layers) <= 1:
            return [one(layer) for layer in img.layers]
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="hpcc-pull")
        futures = []
        try:
            futures = [pool.submit(one, layer) for layer in img.layers]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:                      # the first failure in layer order
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        except BaseException:
            # Stop the other downloads within one chunk (their partial files stay for a
            # resume) instead of waiting for them to finish.
            stop.set()
            for f in futures:
                f.cancel()
            raise
        finally:
            pool.shutdown(wait=True)

    @staticmethod
    def check_layer(layer, path, what=None):
        """Check a fetched layer's first bytes: refuse what is neither gzip, zstd nor tar,
        and correct `layer.compression` when the media type mislabels it."""
        RegistryClient._check_magic(layer, path, what or f"layer {layer.digest}")

    @staticmethod
    def _check_magic(layer, path, what):
        with open(path, "rb") as f:
            head = f.read(512)
        sniffed = sniff_compression(head)
        if sniffed is None:
            raise ImageError(f"{what} is neither a gzip, zstd nor tar stream "
                             f"(media type {layer.media_type})")
        if sniffed != layer.compression:
            # Mislabelled layers exist in the wild (e.g. uncompressed data with a gzip
            # media type); the bytes decide.
            layer.compression = sniffed


def blob_cache_dir(config, store_root=None):
    """The blob cache root from config store.blob_cache, else <store>/.blobs."""
    from hpcc.config import expand_path
    configured = (config.get("store", {}) or {}).get("blob_cache") or ""
    if configured:
        return Path(expand_path(configured))
    root = store_root or expand_path((config.get("store", {}) or {}).get("path", ""))
    return Path(root) / ".blobs"


__all__ = ["RegistryClient", "ResolvedImage", "Layer", "host_platform", "parse_platform",
           "is_loopback", "select_platform", "sniff_compression", "blob_cache_dir"]
