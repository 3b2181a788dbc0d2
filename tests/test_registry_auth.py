"""Authentication and transport security against real registries: htpasswd basic auth over
TLS with a private CA, Bearer token auth via a token server, credential files, and the
plain-http rules."""
import base64
import json
import socket
import uuid

import pytest

from hpcc.errors import ConfigError, RegistryError
from hpcc.gateway.auth import find_credentials, parse_challenge
from hpcc.gateway.blobcache import BlobCache
from hpcc.gateway.registry import RegistryClient, is_loopback
from hpcc.reference import parse_reference
from hpcc.testkit.images import simple_image
from hpcc.testkit.registry import LocalRegistry

from .fixtures.registry import TOKEN_USERS


def repo(name):
    return f"auth/{name}-{uuid.uuid4().hex[:8]}"


def _toml_registry(host, **kv):
    lines = [f'[registries."{host}"]']
    for k, v in kv.items():
        lines.append(f"{k} = " + (json.dumps(v) if not isinstance(v, bool) else str(v).lower()))
    return "\n".join(lines) + "\n"


@pytest.fixture
def tls_image(tls_registry):
    built = simple_image("tls")
    name = repo("tls")
    tls_registry.push(name, "v", built)
    return built, parse_reference(tls_registry.ref(name, "v"))


@pytest.fixture
def token_image(token_registry):
    built = simple_image("token", oci=True)
    name = repo("tok")
    token_registry.push(name, "v", built)
    return built, parse_reference(token_registry.ref(name, "v"))


def test_basic_auth_over_tls_with_ca_file_and_docker_config(
        tls_registry, tls_image, client_config, no_ambient_credentials, tmp_path):
    built, ref = tls_image
    tls_registry.write_auth_file(no_ambient_credentials / ".docker" / "config.json")
    cfg = client_config(_toml_registry(tls_registry.host, ca_file=tls_registry.ca_file))
    with RegistryClient(cfg, backoff=0.05) as c:
        img = c.resolve(ref)
        assert img.manifest_digest == built.digest
        paths = c.fetch_layers(img, BlobCache(tmp_path / "cache"))
        assert [p.read_bytes() for p in paths] == [lay.blob for lay in built.layers]
        assert all(url.startswith("https://") for _, url, _ in c.request_log)


def test_tls_without_the_ca_is_a_clear_tls_error(tls_registry, tls_image, client_config,
                                                 no_ambient_credentials):
    _, ref = tls_image
    tls_registry.write_auth_file(no_ambient_credentials / ".docker" / "config.json")
    with RegistryClient(client_config(""), backoff=0.05) as c:
        with pytest.raises(RegistryError) as ei:
            c.resolve(ref)
    msg = str(ei.value)
    assert msg.startswith(f"TLS error talking to registry {tls_registry.host}: "
                          "certificate verify failed")
    assert "ca_file" in msg and "\n" not in msg
    assert ei.value.exit_code == 3


def test_missing_ca_file_is_a_config_error(tls_registry, tls_image, client_config,
                                           no_ambient_credentials, tmp_path):
    cfg = client_config(_toml_registry(tls_registry.host, ca_file=str(tmp_path / "nope.pem")))
    with RegistryClient(cfg) as c, pytest.raises(ConfigError, match="does not exist"):
        c.resolve(tls_image[1])


def test_basic_auth_without_credentials_is_access_denied(tls_registry, tls_image,
                                                         client_config, no_ambient_credentials):
    cfg = client_config(_toml_registry(tls_registry.host, ca_file=tls_registry.ca_file))
    with RegistryClient(cfg, backoff=0.05) as c, pytest.raises(RegistryError) as ei:
        c.resolve(tls_image[1])
    msg = str(ei.value)
    assert "access denied" in msg and "(HTTP 401)" in msg and "no credentials were found" in msg
    assert "~/.docker/config.json" in msg


def test_basic_auth_wrong_password_is_access_denied(tls_registry, tls_image, client_config,
                                                    no_ambient_credentials, tmp_path):
    auth = tls_registry.write_auth_file(tmp_path / "auth.json", "alice", "wrong")
    cfg = client_config(_toml_registry(tls_registry.host, ca_file=tls_registry.ca_file))
    with RegistryClient(cfg, auth_file=auth, backoff=0.05) as c, \
            pytest.raises(RegistryError) as ei:
        c.resolve(tls_image[1])
    assert "access denied" in str(ei.value)
    assert f"user 'alice' from {auth} were refused" in str(ei.value)


def test_insecure_registry_skips_certificate_verification(tls_registry, tls_image,
                                                          client_config,
                                                          no_ambient_credentials, tmp_path):
    auth = tls_registry.write_auth_file(tmp_path / "auth.json", style="plain")
    cfg = client_config(_toml_registry(tls_registry.host, insecure=True))
    with RegistryClient(cfg, auth_file=auth, backoff=0.05) as c:
        assert c.resolve(tls_image[1]).manifest_digest == tls_image[0].digest


def test_token_auth_with_credentials_from_registry_auth_file(
        token_registry, token_image, client_config, no_ambient_credentials, tmp_path,
        monkeypatch):
    built, ref = token_image
    auth = token_registry.write_auth_file(tmp_path / "containers" / "auth.json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    before = len(token_registry.token_server.requests)
    with RegistryClient(client_config(""), backoff=0.05) as c:
        img = c.resolve(ref)
        assert img.manifest_digest == built.digest
        paths = c.fetch_layers(img, BlobCache(tmp_path / "cache"))
        assert [p.read_bytes() for p in paths] == [lay.blob for lay in built.layers]
        # Bearer tokens are reused: one challenge, one token for the whole pull.
        assert [s for _, _, s in c.request_log].count(401) == 1
    issued = token_registry.token_server.requests[before:]
    user = next(iter(TOKEN_USERS))
    assert issued == [(user, [f"repository:{ref.path}:pull"], 200)]


def test_token_auth_wrong_password_is_a_401_registry_error(
        token_registry, token_image, client_config, no_ambient_credentials, tmp_path):
    auth = token_registry.write_auth_file(tmp_path / "auth.json", "bob", "not-the-password")
    with RegistryClient(client_config(""), auth_file=auth, backoff=0.05) as c, \
            pytest.raises(RegistryError) as ei:
        c.resolve(token_image[1])
    msg = str(ei.value)
    assert "access denied: the token server" in msg
    assert "refused user 'bob'" in msg and "(HTTP 401)" in msg
    assert ei.value.exit_code == 3


def test_token_auth_anonymous_gets_no_access(token_registry, token_image, client_config,
                                             no_ambient_credentials):
    with RegistryClient(client_config(""), backoff=0.05) as c, \
            pytest.raises(RegistryError, match=r"access denied to image .* \(HTTP 401\)"):
        c.resolve(token_image[1])


def test_token_auth_anonymous_pull_of_a_public_registry(client_config, no_ambient_credentials,
                                                        tmp_path):
    with LocalRegistry(token_auth=True, htpasswd={"pusher": "pw"}, anonymous_pull=True) as reg:
        built = simple_image("public")
        reg.push("pub/app", "v", built)
        with RegistryClient(client_config(""), backoff=0.05) as c:
            img = c.resolve(parse_reference(reg.ref("pub/app", "v")))
            assert img.manifest_digest == built.digest
        assert reg.token_server.requests[-1][0] is None        # anonymous token


def test_docker_config_auth_field_and_username_password_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    cfgdir = tmp_path / ".docker"
    cfgdir.mkdir()
    auths = {
        "https://reg.example.org:5000/v1/": {"auth": base64.b64encode(b"u1:p:1").decode()},
        "other.example.org": {"username": "u2", "password": "p2"},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:hubpw").decode()},
    }
    (cfgdir / "config.json").write_text(json.dumps({"auths": auths}))
    c = find_credentials("reg.example.org:5000", "ns/app")
    assert (c.username, c.password) == ("u1", "p:1")
    c = find_credentials("other.example.org", "x")
    assert (c.username, c.password) == ("u2", "p2")
    c = find_credentials("registry-1.docker.io", "library/ubuntu", domain="docker.io")
    assert (c.username, c.password) == ("hub", "hubpw")
    assert find_credentials("unknown.example.org", "x") is None
    # $REGISTRY_AUTH_FILE wins, and a repository-scoped key beats the host key
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {
        "reg.example.org:5000": {"username": "host", "password": "h"},
        "reg.example.org:5000/team/app": {"username": "team", "password": "t"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    assert find_credentials("reg.example.org:5000", "team/app").username == "team"
    assert find_credentials("reg.example.org:5000", "other/app").username == "host"


def test_malformed_credentials_file_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    (tmp_path / "auth.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"auth.json is not valid JSON"):
        find_credentials("reg.example.org", "x")
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {"reg.example.org": {"auth": "!!"}}}))
    with pytest.raises(ConfigError, match="is not base64 of 'user:password'"):
        find_credentials("reg.example.org", "x")


def test_parse_challenge():
    scheme, p = parse_challenge('Bearer realm="https://auth.example/token",'
                                'service="registry.example",scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert p == {"realm": "https://auth.example/token", "service": "registry.example",
                 "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert parse_challenge("") == (None, {})


def test_loopback_rules():
    for h in ("127.0.0.1:5000", "127.3.4.5", "localhost:80", "[::1]:5000", "::1", "LOCALHOST"):
        assert is_loopback(h), h
    for h in ("192.0.2.2:5000", "registry.example.org", "localhost.example.org:5000",
              "[fd00::2]:5000", "vm:5000"):
        assert not is_loopback(h), h


def _hostname_on_loopback():
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        return None
    return name if addr.startswith("127.") and "." not in name and name != "localhost" \
        else None


def test_plain_http_refused_for_a_non_loopback_host_name(registry, client_config,
                                                         no_ambient_credentials):
    """A host name is not a loopback literal even if it resolves to 127.0.0.1: https only,
    unless the config marks it insecure."""
    name = _hostname_on_loopback()
    if name is None:
        pytest.skip("this machine's host name does not resolve to a loopback address")
    built = simple_image("hostname")
    registry.push("plain/hostname", "v", built)
    host = f"{name}:{registry.port}"
    ref = parse_reference(f"{host}/plain/hostname:v")
    with RegistryClient(client_config(""), backoff=0.05) as c, \
            pytest.raises(RegistryError) as ei:
        c.resolve(ref)
    assert f"TLS error talking to registry {host}" in str(ei.value)
    assert "insecure" in str(ei.value)
    cfg = client_config(_toml_registry(host, insecure=True))
    with RegistryClient(cfg, backoff=0.05) as c:
        img = c.resolve(ref)
        assert img.manifest_digest == built.digest
        assert all(url.startswith(f"http://{host}/") for _, url, _ in c.request_log)
    with RegistryClient(client_config(""), insecure=True, backoff=0.05) as c:
        assert c.resolve(ref).manifest_digest == built.digest


def _non_loopback_ip():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))        # no packet is sent for a UDP connect
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_plain_http_refused_for_a_non_loopback_address(client_config, no_ambient_credentials):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    with LocalRegistry(bind=ip) as reg:
        built = simple_image("ip")
        reg.push("plain/ip", "v", built)
        ref = parse_reference(reg.ref("plain/ip", "v"))
        with RegistryClient(client_config(""), backoff=0.05) as c, \
                pytest.raises(RegistryError, match=f"TLS error talking to registry {reg.host}"):
            c.resolve(ref)
        cfg = client_config(_toml_registry(reg.host, insecure=True))
        with RegistryClient(cfg, backoff=0.05) as c:
            assert c.resolve(ref).manifest_digest == built.digest


def test_environment_proxy_is_used_for_remote_hosts_but_never_for_loopback(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example.org:3128")
    monkeypatch.setenv("no_proxy", "internal.example.org")
    from hpcc.gateway.transport import Transport
    get = Transport._proxies
    assert get("https://ghcr.io/v2/") == {"https": "http://proxy.example.org:3128"}
    assert get("https://internal.example.org/v2/") == {}
    assert get("https://127.0.0.1:5000/v2/") == {}
    assert get("http://localhost:5000/v2/") == {}


def test_loopback_registry_ignores_a_proxy_in_the_environment(registry, client_config,
                                                               no_ambient_credentials,
                                                               monkeypatch):
    built = simple_image("proxy-env")
    registry.push("plain/proxy-env", "v", built)
    monkeypatch.setenv("http_proxy", "http://192.0.2.254:9")     # would black-hole
    monkeypatch.setenv("https_proxy", "http://192.0.2.254:9")
    with RegistryClient(client_config(""), backoff=0.01) as c:
        img = c.resolve(parse_reference(registry.ref("plain/proxy-env", "v")))
    assert img.manifest_digest == built.digest
