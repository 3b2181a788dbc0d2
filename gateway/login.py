"""`hpcc login REGISTRY` / `gateway login REGISTRY`: check credentials with the registry,
then store them where pulls look first (gateway/auth.py): the file given with --auth-file,
else $REGISTRY_AUTH_FILE, else $DOCKER_CONFIG/config.json or ~/.docker/config.json (root's
for `gateway`, the user's for `hpcc`), in the docker config format that docker, podman and
skopeo read too: {"auths": {"<host>": {"auth": base64("user:password")}}}.

The file is rewritten atomically (temp file + rename) with mode 0600; its other entries and
keys are kept. `logout` removes the registry's entry.
"""
import base64
import json
import os

import requests

from hpcc.errors import ConfigError, HpccError, RegistryError
from hpcc.reference import DEFAULT_DOMAIN
from hpcc.store import write_atomic

from .auth import auth_file_candidates, parse_challenge
from .transport import Transport, describe_conn_error

DOCKER_HUB_KEY = "https://index.docker.io/v1/"   # the key docker itself writes for Hub


class LoginRefused(HpccError):
    """The registry refused the credentials (a user error: retrying will not help)."""


def registry_host(registry):
    """'docker.io' and friends -> (API host, auth file key); 'host:5000' -> same twice."""
    host = registry.strip().rstrip("/")
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    host = host.split("/", 1)[0]
    if not host:
        raise ConfigError("login needs a registry host, e.g. ghcr.io or registry.site:5000")
    if host in (DEFAULT_DOMAIN, "index.docker.io", "registry-1.docker.io"):
        return "registry-1.docker.io", DOCKER_HUB_KEY
    return host, host


def check_credentials(config, registry, username, password, insecure=False):
    """Ask the registry whether it accepts `username`/`password` (Basic, or a Bearer token
    from its token server). Raises LoginRefused or RegistryError."""
    api_host, _key = registry_host(registry)
    transport = Transport(config, insecure=insecure)
    try:
        st = transport._host(api_host)
        basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        session = transport.session
        try:
            r = session.get(st.base + "/v2/", timeout=transport.timeout, verify=st.verify,
                            proxies=transport._proxies(st.base + "/v2/"))
            r.close()
            if r.status_code == 200:
                return "the registry allows anonymous access; credentials stored anyway"
            scheme, params = parse_challenge(r.headers.get("WWW-Authenticate", ""))
            if r.status_code != 401 or scheme not in ("basic", "bearer"):
                raise RegistryError(f"registry {api_host} answered HTTP {r.status_code} to "
                                    "/v2/; is it an OCI/Docker registry?")
            if scheme == "basic":
                r = session.get(st.base + "/v2/", headers={"Authorization": basic},
                                timeout=transport.timeout, verify=st.verify,
                                proxies=transport._proxies(st.base + "/v2/"))
                r.close()
                ok = r.status_code == 200
            else:
                realm = params.get("realm", "")
                query = {k: v for k, v in (("service", params.get("service")),
                                           ("account", username)) if v}
                r = session.get(realm, params=query, headers={"Authorization": basic},
                                timeout=transport.timeout,
                                verify=st.verify if realm.split("/")[2] == api_host
                                else transport._verify_for(realm.split("/")[2]),
                                proxies=transport._proxies(realm))
                r.close()
                ok = r.status_code == 200
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"cannot reach registry {api_host}: "
                                f"{describe_conn_error(e)}") from None
        if not ok:
            raise LoginRefused(f"login to {registry} failed: the registry refused user "
                               f"'{username}' (HTTP {r.status_code})",
                               hint="check the user name and password (or token)")
        return None
    finally:
        transport.close()


def auth_file_path(explicit=None):
    return auth_file_candidates(explicit)[0]


def _read(path):
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the auth file {path}: {e}",
                          hint="fix or move it; hpcc does not overwrite what it cannot read") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"the auth file {path} is not a JSON object")
    return data


def _write(path, data):
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, 0o700, exist_ok=True)
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)
    except OSError as e:
        raise ConfigError(f"cannot write the auth file {path}: {e.strerror}") from None


def store_credentials(registry, username, password, auth_file=None):
    """Write the entry; returns the file written."""
    _host, key = registry_host(registry)
    path = auth_file_path(auth_file)
    data = _read(path)
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"the auth file {path} has an 'auths' that is not an object")
    auths[key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _write(path, data)
    return path


def remove_credentials(registry, auth_file=None):
    """Remove the registry's entry; returns (file, whether there was one)."""
    _host, key = registry_host(registry)
    path = auth_file_path(auth_file)
    data = _read(path)
    auths = data.get("auths") if isinstance(data.get("auths"), dict) else {}
    if key not in auths:
        return path, False
    del auths[key]
    _write(path, data)
    return path, True


__all__ = ["check_credentials", "store_credentials", "remove_credentials", "registry_host",
           "LoginRefused"]
