"""Private images: pulled by the gateway service with the requesting user's own registry
credentials, readable and runnable by that user only; the credentials are never stored."""
import json
import os
import subprocess

import pytest

from hpcc.testkit.busybox import busybox_image
from tests.test_cli_style import check

pytestmark = [pytest.mark.root]


def test_a_private_image_is_readable_by_its_user_only(gateway_service, service_users,
                                                      token_registry):
    svc = gateway_service()
    token_registry.push("team/secret", "1", busybox_image())
    ref = token_registry.ref("team/secret", "1")
    alice, bob = service_users
    home = svc.base / f"home-{alice.pw_name}"
    svc.run(alice, "version")                       # makes the home
    auth = token_registry.write_auth_file(home / ".docker" / "config.json")
    for p in (auth.parent, auth):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    password = token_registry.credentials[1]

    # without credentials: the registry refuses, in one line
    p = svc.run(bob, "pull", ref)
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "access denied" in p.stderr

    p = svc.run(alice, "pull", "--json", ref)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["private"] is True
    private_dir = svc.store / ".private" / str(alice.pw_uid)
    assert out["path"].startswith(str(private_dir) + "/")
    assert svc.images() == [], "nothing of it in the public part of the store"
    p = svc.run(alice, "run", ref, "cat", "/etc/os-release")
    assert p.returncode == 0 and "hpcc demo image" in p.stdout, p.stderr
    assert svc.home_files(alice) == [".docker/config.json"]

    # bob: cannot list, read, run it by name or by path
    for argv in (["ls", str(svc.store / ".private")], ["ls", str(private_dir)],
                 ["cat", out["path"]]):
        r = subprocess.run(argv, capture_output=True, user=bob.pw_uid, group=bob.pw_gid,
                           extra_groups=[])
        assert r.returncode != 0 and b"Permission denied" in r.stderr, argv
    p = svc.run(bob, "run", ref, "true")
    assert p.returncode == 125 and "not found" in p.stderr, p.stderr
    p = svc.run(bob, "run", out["path"], "true")
    assert p.returncode == 125, p.stderr
    p = svc.run(bob, "status", "--images", "--json", prog="gateway")
    assert json.loads(p.stdout) == []

    # the credentials went with the request only
    for path in svc.base.rglob("*"):
        if path.is_file() and not path.is_relative_to(home):
            assert password.encode() not in path.read_bytes(), path
    rec = [r for r in svc.audit() if r["outcome"] == "pulled"][0]
    assert rec["private"] is True and rec["user"] == alice.pw_name

    # only alice can remove it (through the service, which owns the private store)
    p = svc.run(bob, "rm", ref)
    assert p.returncode == 1 and os.path.exists(out["path"])
    p = svc.run(alice, "rm", "--json", ref)
    assert p.returncode == 0, p.stderr
    check("rm", json.loads(p.stdout))
    assert json.loads(p.stdout)[0]["deleted"] == out["digest"]
    assert not os.path.exists(out["path"])
    assert svc.audit()[-1]["op"] == "rm" and svc.audit()[-1]["outcome"] == "removed"


@pytest.mark.slurm
def test_private_images_count_against_the_store_budget(gateway_service, service_users,
                                                       token_registry, registry,
                                                       slurm_cluster):
    from hpcc.testkit.images import ImageBuilder, directory, file

    def random_image(tag):
        b = ImageBuilder()
        b.layer([directory("d"), file("d/blob", os.urandom(600_000)), file("d/t", tag)])
        return b.build()

    svc = gateway_service(policy={"store_budget_mb": 1}, run=False)
    svc.start(env={"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]})
    alice, bob = service_users
    token_registry.push("team/budget", "1", random_image("private"))
    registry.push("svc/budget", "1", random_image("public"))
    home = svc.base / f"home-{alice.pw_name}"
    svc.run(alice, "version")
    auth = token_registry.write_auth_file(home / ".docker" / "config.json")
    for p in (auth.parent, auth):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    p = svc.run(alice, "pull", "--json", token_registry.ref("team/budget", "1"))
    assert p.returncode == 0, p.stderr
    private_path = json.loads(p.stdout)["path"]
    assert svc.run(bob, "pull", registry.ref("svc/budget", "1")).returncode == 0
    evicted = svc.wait_evicted()
    assert len(evicted) == 1, (svc.audit(), svc.log.read_text())
    assert evicted[0]["store"].endswith(f"/.private/{alice.pw_uid}")
    assert not os.path.exists(private_path)
    assert len(svc.images()) == 1
