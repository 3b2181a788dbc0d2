"""`gateway login` / `hpcc login` against real registries (htpasswd Basic over TLS, and a
Bearer token server): credentials are checked, then written in docker's format where the
next pull reads them; refused ones change nothing."""
import base64
import json
import os
import subprocess

import pytest

from tests.conftest import tool
from tests.fixtures.registry import REGISTRY_USERS, TOKEN_USERS
from tests.test_cli_style import check


@pytest.fixture
def env(tmp_path, tls_registry, no_ambient_credentials):
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path}/site"\nuser_path = "{tmp_path}/user"\n'
                   f'[registries."{tls_registry.host}"]\nca_file = "{tls_registry.ca_file}"\n')
    e = dict(os.environ, HPCC_CONFIG=str(cfg), HOME=str(no_ambient_credentials))
    e.pop("REGISTRY_AUTH_FILE", None)
    e.pop("DOCKER_CONFIG", None)
    return e


def login(prog, env, registry, user, password, *extra):
    return subprocess.run([tool(prog), "login", registry, "-u", user, "--password-stdin",
                           *extra], input=password + "\n", env=env, capture_output=True,
                          text=True, timeout=60)


def test_login_writes_the_docker_config_and_the_pull_uses_it(env, tls_registry,
                                                              no_ambient_credentials):
    from hpcc.testkit.images import simple_image
    tls_registry.push("login/img", "1", simple_image("login"))
    user, password = next(iter(REGISTRY_USERS.items()))
    p = login("gateway", env, tls_registry.host, user, password)
    assert p.returncode == 0, p.stderr
    conf = no_ambient_credentials / ".docker" / "config.json"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    entry = json.loads(conf.read_text())["auths"][tls_registry.host]
    assert base64.b64decode(entry["auth"]).decode() == f"{user}:{password}"
    pull = subprocess.run([tool("gateway"), "pull", tls_registry.ref("login/img", "1")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pull.returncode == 0, pull.stderr
    out = subprocess.run([tool("gateway"), "logout", tls_registry.host, "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0
    check("logout", json.loads(out.stdout))
    assert tls_registry.host not in json.loads(conf.read_text())["auths"]
    again = login("gateway", env, tls_registry.host, user, password, "--json")
    assert again.returncode == 0, again.stderr
    check("login", json.loads(again.stdout))


def test_refused_credentials_are_one_line_and_change_nothing(env, tls_registry,
                                                             no_ambient_credentials):
    conf = no_ambient_credentials / ".docker" / "config.json"
    conf.parent.mkdir()
    conf.write_text('{"auths": {"other.example": {"auth": "eDp5"}}, "credsStore": ""}')
    p = login("hpcc", env, tls_registry.host, "alice", "wrong-password")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "refused user 'alice'" in p.stderr, p.stderr
    assert json.loads(conf.read_text()) == {"auths": {"other.example": {"auth": "eDp5"}},
                                            "credsStore": ""}


def test_token_registry_login_and_auth_file_option(env, token_registry, tmp_path):
    user, password = next(iter(TOKEN_USERS.items()))
    auth = tmp_path / "auth.json"
    p = login("hpcc", env, token_registry.host, user, password, "--auth-file", auth)
    assert p.returncode == 0, p.stderr
    assert token_registry.host in json.loads(auth.read_text())["auths"]
    p = login("hpcc", env, token_registry.host, user, "nope", "--auth-file", tmp_path / "x")
    assert p.returncode == 1 and not (tmp_path / "x").exists()
    from hpcc.testkit.images import simple_image
    token_registry.push("login/tok", "1", simple_image("tok"))
    pull = subprocess.run([tool("gateway"), "pull", "--auth-file", str(auth),
                           token_registry.ref("login/tok", "1")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert pull.returncode == 0, pull.stderr


def test_login_without_a_terminal_needs_password_stdin(env, tls_registry):
    p = subprocess.run([tool("gateway"), "login", tls_registry.host, "-u", "alice"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert p.returncode == 2 and "--password-stdin" in p.stderr
    assert p.stderr.count("\n") == 1
