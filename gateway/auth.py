"""Registry credentials and the authentication handshake.

Credential sources, first match wins:
  1. the auth file given explicitly (`gateway pull --auth-file`, RegistryClient(auth_file=))
  2. $REGISTRY_AUTH_FILE (containers-auth.json(5), as podman/skopeo write it)
  3. $DOCKER_CONFIG/config.json, else ~/.docker/config.json

Both formats hold `{"auths": {"<host>": {"auth": base64("user:pass")}}}` (or separate
`username`/`password` fields, or an `identitytoken` for OAuth2 refresh). Keys may carry a
scheme ("https://host/v1/") and, in auth.json, a repository path ("host/ns/repo"): the
longest key that is a prefix of "<host>/<repository>" wins.

The handshake follows the registry's `WWW-Authenticate` challenge: `Basic` sends the
credentials; `Bearer realm=...,service=...,scope=...` asks the token server for a token
(anonymously when there are no credentials) and sends it as `Authorization: Bearer`.
"""
import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpcc.errors import ConfigError

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io", "https://registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None
    identity_token: str | None = None
    source: str = ""           # file the credentials came from (for error messages)

    def basic_header(self):
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_file_candidates(explicit=None):
    """Credential files in the order they are consulted (existing or not)."""
    out = []
    if explicit:
        out.append(Path(explicit))
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append(Path(env))
    docker_dir = os.environ.get("DOCKER_CONFIG")
    if docker_dir:
        out.append(Path(docker_dir) / "config.json")
    else:
        out.append(Path(os.path.expanduser("~")) / ".docker" / "config.json")
    return out


def _normalise_key(key):
    """'https://host:5000/v1/' -> 'host:5000'; 'host/ns/repo' stays."""
    k = re.sub(r"^[a-z]+://", "", key.strip())
    k = k.rstrip("/")
    if k.endswith("/v1") or k.endswith("/v2"):
        k = k[:-3]
    return k


def _entry_credentials(entry, path, key):
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: auths.\"{key}\" is not an object")
    user = entry.get("username")
    password = entry.get("password")
    token = entry.get("identitytoken") or None
    blob = entry.get("auth")
    if blob:
        try:
            decoded = base64.b64decode(blob, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ConfigError(f"{path}: auths.\"{key}\".auth is not base64 of 'user:password'",
                              hint="log in again (docker login / podman login)") from None
        if ":" not in decoded:
            raise ConfigError(f"{path}: auths.\"{key}\".auth is not base64 of 'user:password'",
                              hint="log in again (docker login / podman login)")
        user, password = decoded.split(":", 1)
    if not user and not token:
        return None
    return Credentials(user, password, token, str(path))


def _read_auths(path):
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError(f"cannot read credentials file {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read credentials file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"credentials file {path} is not valid JSON ({e.msg}, line {e.lineno})",
                          hint="fix or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"credentials file {path} is not a JSON object")
    auths = data.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"credentials file {path}: 'auths' is not an object")
    return auths


def find_credentials(host, repository="", auth_file=None, domain=None):
    """Credentials for registry `host` (host[:port]) and `repository`, or None.

    `domain` is the reference's domain when it differs from the API host (docker.io).
    """
    wanted = {host}
    if domain:
        wanted.add(domain)
    if wanted & set(DOCKER_HUB_KEYS):
        wanted |= {_normalise_key(k) for k in DOCKER_HUB_KEYS}
    for path in auth_file_candidates(auth_file):
        auths = _read_auths(path)
        if auths is None:
            if auth_file and path == Path(auth_file):
                raise ConfigError(f"credentials file {path} does not exist")
            continue
        best, best_len = None, -1
        for key, entry in auths.items():
            norm = _normalise_key(key)
            h, _, repo_prefix = norm.partition("/")
            if h not in wanted:
                continue
            if repo_prefix and not (repository == repo_prefix
                                    or repository.startswith(repo_prefix + "/")):
                continue
            if len(norm) > best_len:
                best, best_len = (key, entry), len(norm)
        if best is not None:
            creds = _entry_credentials(best[1], path, best[0])
            if creds is not None:
                return creds
    return None


_CHALLENGE_RE = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header):
    """'Bearer realm="https://a/token",service="reg",scope="repository:x:pull"'
    -> ("bearer", {"realm": ..., "service": ..., "scope": ...}).

    Returns (None, {}) for an empty or unparsable header.
    """
    if not header:
        return None, {}
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params = {}
    for m in _CHALLENGE_RE.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params
