"""HTTP to OCI/Docker registries: TLS or plain http per host, authentication (Basic, and
Bearer tokens from the WWW-Authenticate challenge), proxies, retries with backoff, and the
mapping of HTTP answers to hpcc's one-line errors.

Transport rules: https everywhere (system CAs, or the registry's configured `ca_file`).
Plain http only for loopback registries (127.0.0.0/8, ::1, localhost) and registries marked
insecure (config `registries."host:port".insecure = true`, or insecure=True): those try
https first and fall back to http when the server does not speak TLS; an insecure registry
also skips certificate verification.
"""
import ipaddress
import os
import random
import threading
import time

import requests
from requests.adapters import HTTPAdapter

from hpcc.errors import ConfigError, NotInRegistry, RegistryError

from .auth import find_credentials, parse_challenge

RETRY_STATUS = (500, 502, 503, 504)
RATE_LIMIT_WAIT_MAX = 60.0    # longest Retry-After of a 429 waited for; longer: give up


def retry_after_seconds(value, now=None):
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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


def describe_conn_error(exc):
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


class _HostState:
    """What the client learned about one registry host: base URL, TLS, auth."""

    def __init__(self, host):
        self.host = host
        self.base = None            # "https://host" or "http://host"
        self.verify = True
        self.challenge = None       # (scheme, params) of the last 401
        self.tokens = {}            # scope -> bearer token
        self.lock = threading.Lock()


class Transport:
    """Requests to one or more registries; thread-safe (one requests.Session)."""

    def __init__(self, config=None, *, auth_file=None, insecure=False, ca_file=None,
                 retries=None, timeout=(10, 60), backoff=0.5, notice=None, trace=None):
        config = config or {}
        self.notice = notice        # callable(line): says why a request waits (rate limit)
        self.trace = trace          # callable(line): one line per response (gateway -v)
        self.registries = config.get("registries", {}) or {}
        gw = config.get("gateway", {}) or {}
        self.retries = gw.get("retries", 5) if retries is None else retries
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
                if r.status_code in RETRY_STATUS and attempt < self.retries:
                    self.sleep(attempt)
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
                    self.sleep(attempt)
                    continue
            except requests.exceptions.Timeout as e:
                last = e
                if plain_ok:
                    # Some plain-http servers wait silently for a request line after a TLS
                    # hello; a loopback/insecure host that does not answer TLS is plain.
                    return f"http://{host}"
                if attempt < self.retries:
                    self.sleep(attempt)
                    continue
        raise RegistryError(
            f"cannot connect to registry {host}: {describe_conn_error(last)}"
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

    def sleep(self, attempt, retry_after=None):
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
                last = f"cannot connect to the token server {realm}: {describe_conn_error(e)}"
                if attempt < self.retries:
                    self.sleep(attempt)
                    continue
                raise RegistryError(last) from None
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                self.sleep(attempt)
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

    def request(self, ref, method, url_path, *, headers=None, stream=False, what=None):
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
                    self.sleep(attempt)
                    attempt += 1
                    continue
                raise RegistryError(
                    f"cannot fetch {what} from registry {ref.api_host}: "
                    f"{describe_conn_error(e)} (after {attempt + 1} attempts)") from None
            self.request_log.append((method, url, r.status_code))
            if self.trace:
                self.trace(f"{method} {url} -> {r.status_code}")
            if r.status_code == 429 and attempt < self.retries:
                wait = retry_after_seconds(r.headers.get("Retry-After"))
                if wait is None:
                    wait = max(1.0, min(self.backoff * (2 ** attempt), 20.0))
                if wait <= RATE_LIMIT_WAIT_MAX:
                    r.close()
                    if self.notice:
                        self.notice(f"registry {ref.api_host} limits the request rate (HTTP "
                                    f"429): waiting {wait:.0f} s before retry {attempt + 1} "
                                    f"of {self.retries}")
                    time.sleep(wait)
                    attempt += 1
                    continue
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                ra = r.headers.get("Retry-After")
                r.close()
                self.sleep(attempt, float(ra) if ra and ra.isdigit() else None)
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

    def http_error(self, ref, r, what, kind):
        code, msg = _error_code(r)
        r.close()
        if r.status_code in (401, 403):
            return self._denied(ref, r.status_code, what)
        if r.status_code == 404:
            if kind == "manifest":
                reason = {"NAME_UNKNOWN": "repository unknown"}.get(code, "manifest unknown")
                return NotInRegistry(f"image {ref} not found in registry {ref.api_host} "
                                     f"({reason})",
                                     hint="check the name and tag")
            return RegistryError(f"{what} not found in registry {ref.api_host} (blob unknown)")
        if r.status_code == 429:
            wait = retry_after_seconds(r.headers.get("Retry-After"))
            when = (f" and asks to wait {wait:.0f} s" if wait is not None else "")
            tries = f" after {self.retries + 1} attempts" if self.retries else ""
            return RegistryError(f"registry {ref.api_host} refused {what}: too many requests "
                                 f"(rate limit){tries}{when}",
                                 hint="try again later, or log in to get a higher limit")
        if r.status_code in RETRY_STATUS:
            return RegistryError(f"registry {ref.api_host} failed with HTTP {r.status_code} "
                                 f"for {what} after {self.retries + 1} attempts",
                                 hint="try again later")
        detail = f": {code} {msg}".rstrip() if code or msg else ""
        return RegistryError(f"registry {ref.api_host} answered HTTP {r.status_code} for "
                             f"{what}{detail}")


__all__ = ["Transport", "RETRY_STATUS", "describe_conn_error", "is_loopback"]
