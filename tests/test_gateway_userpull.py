"""`hpcc pull` without a gateway service, and the admin commands run by a user."""
import json
import os
import subprocess

import pytest

from hpcc.testkit.images import simple_image
from tests.conftest import tool

pytestmark = [pytest.mark.root]


def test_hpcc_pull_of_an_image_the_site_store_has_only_tags_it(
        gateway_service, service_users, registry):
    svc = gateway_service(run=False)
    registry.push("user/shared", "1", simple_image("shared"))
    ref = registry.ref("user/shared", "1")
    env = dict(os.environ, HPCC_CONFIG=str(svc.plain_config))
    p = subprocess.run([tool("gateway"), "pull", ref], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    user = service_users[0]
    p = svc.run(user, "pull", "--json", ref, config=svc.plain_config)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["converted"] is False and out["store"] == str(svc.store)
    files = svc.home_files(user)
    assert not any(f.endswith((".sqfs", ".json")) and "sha256" in f for f in files), files
    assert any("/refs/" in f for f in files), "the user's store has the tag"
    p = svc.run(user, "run", ref, "true", config=svc.plain_config)
    assert p.returncode == 127 and "not found in the store" not in p.stderr, p.stderr
    p = svc.run(user, "inspect", "--json", ref, config=svc.plain_config)
    assert p.returncode == 0 and json.loads(p.stdout)["path"].startswith(str(svc.store))
    # hpcc gc keeps that tag: the site store holds its image
    p = svc.run(user, "gc", config=svc.plain_config)
    assert p.returncode == 0, p.stderr
    assert svc.run(user, "inspect", ref, config=svc.plain_config).returncode == 0


def test_hpcc_pull_drops_its_layer_blobs_and_gc_cleans(gateway_service, service_users,
                                                       registry):
    svc = gateway_service(run=False)
    registry.push("user/own", "1", simple_image("own"))
    ref = registry.ref("user/own", "1")
    user = service_users[1]
    p = svc.run(user, "pull", ref, config=svc.plain_config)
    assert p.returncode == 0, p.stderr
    files = svc.home_files(user)
    assert any(f.endswith(".sqfs") for f in files)
    assert not any("/.blobs/" in f and len(os.path.basename(f)) == 64 for f in files), files
    # debris of an interrupted pull goes with hpcc gc
    store = svc.base / f"home-{user.pw_name}" / "data" / "hpcc" / "images"
    debris = store / ".tmp" / ("sha256-" + "0" * 64 + ".1.2.sqfs")
    debris.write_bytes(b"x")
    os.chown(debris, user.pw_uid, user.pw_gid)
    p = svc.run(user, "gc", config=svc.plain_config)
    assert p.returncode == 0, p.stderr
    assert not debris.exists()


@pytest.mark.parametrize("argv", [["pull", "REF"], ["rm", "REF"], ["gc"],
                                  ["import", "/nonexistent.tar"]])
def test_admin_commands_of_a_user_on_the_site_store_are_one_line(
        gateway_service, service_users, registry, argv):
    svc = gateway_service(run=False)
    argv = [a.replace("REF", registry.ref("user/any", "1")) for a in argv]
    p = svc.run(service_users[0], *argv, config=svc.plain_config, prog="gateway")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "is the site admins'" in lines[0] and "hpcc " in lines[0]
