"""Cosign signatures required by the site's policy: checked by `gateway pull` and by the
gateway service, with keys the tests make and signatures pushed to the real registry."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from hpcc.testkit.images import simple_image
from hpcc.testkit.signing import new_key_pair, sign
from tests.conftest import tool
from tests.fixtures.gateway_service import write_config


@pytest.fixture
def keys():
    """The site's key pair (public key readable by the service account) and another one."""
    d = tempfile.mkdtemp(prefix="hpcc-keys-", dir="/tmp")
    os.chmod(d, 0o755)
    site, site_pub = new_key_pair(os.path.join(d, "site"))
    os.chmod(site_pub, 0o644)
    other, _ = new_key_pair(os.path.join(d, "other"))
    yield {"site": site, "site_pub": site_pub, "other": other}
    shutil.rmtree(d, ignore_errors=True)


def _gateway(config, *args):
    return subprocess.run([tool("gateway"), *args], capture_output=True, text=True,
                          env=dict(os.environ, HPCC_CONFIG=str(config)), timeout=120)


def _last_line(p):
    return p.stderr.strip().splitlines()[-1]


def test_gateway_pull_requires_a_valid_signature_by_a_site_key(tmp_path, registry, keys):
    config = tmp_path / "hpcc.toml"
    write_config(config, {"store": {"path": str(tmp_path / "store")},
                          "policy": {"audit_log": "", "signatures": [
                              {"match": f"{registry.host}/signed/*",
                               "keys": [keys["site_pub"]]}]}})
    good = registry.push("signed/good", "1", simple_image("good"))
    sign(registry, "signed/good", good, keys["site"])
    registry.push("signed/unsigned", "1", simple_image("unsigned"))
    wrong = registry.push("signed/wrongkey", "1", simple_image("wrongkey"))
    sign(registry, "signed/wrongkey", wrong, keys["other"])
    moved = registry.push("signed/moved", "1", simple_image("moved"))
    sign(registry, "signed/moved", moved, keys["site"], signed_digest=good)
    registry.push("free/image", "1", simple_image("free"))

    p = _gateway(config, "pull", registry.ref("signed/unsigned", "1"))
    assert p.returncode == 1 and "is not signed" in _last_line(p), p.stderr
    p = _gateway(config, "pull", registry.ref("signed/wrongkey", "1"))
    assert p.returncode == 1 and "none by the site's keys" in _last_line(p), p.stderr
    p = _gateway(config, "pull", registry.ref("signed/moved", "1"))
    assert p.returncode == 1 and "none by the site's keys" in _last_line(p), p.stderr
    for p in (_gateway(config, "images", "--json"),):
        assert json.loads(p.stdout) == [], "nothing refused reached the store"

    p = _gateway(config, "pull", registry.ref("signed/good", "1"))
    assert p.returncode == 0, p.stderr
    p = _gateway(config, "inspect", registry.ref("signed/good", "1"))
    assert f"Signed by:   {keys['site_pub']}" in p.stdout, p.stdout
    assert good in p.stdout.split("Signed by:")[1].splitlines()[0]
    meta = json.loads(_gateway(config, "inspect", "--json",
                               registry.ref("signed/good", "1")).stdout)
    assert meta["signature"]["digest"] == good
    assert meta["signature"]["fingerprint"].startswith("sha256:")
    # the rule covers signed/*, not other repositories
    assert _gateway(config, "pull", registry.ref("free/image", "1")).returncode == 0


@pytest.mark.root
def test_the_service_refuses_unsigned_images_in_one_line(gateway_service, service_users,
                                                         registry, keys):
    svc = gateway_service(policy={"signatures": [{"match": f"{registry.host}/svcsigned/*",
                                                  "keys": [keys["site_pub"]]}]})
    good = registry.push("svcsigned/good", "1", simple_image("svc-good"))
    sign(registry, "svcsigned/good", good, keys["site"])
    registry.push("svcsigned/bad", "1", simple_image("svc-bad"))
    user = service_users[0]
    p = svc.run(user, "pull", registry.ref("svcsigned/bad", "1"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "is not signed" in p.stderr
    p = svc.run(user, "pull", registry.ref("svcsigned/good", "1"))
    assert p.returncode == 0, p.stderr
    recs = svc.audit()
    assert [r["outcome"] for r in recs] == ["denied", "pulled"]
    assert recs[1]["signed_by"] == keys["site_pub"]
