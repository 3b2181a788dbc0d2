"""The site's policy, enforced by the real gateway service: registries and repositories,
image sizes, per-user limits, the store's budget (with a real Slurm cluster's pending job),
and the audit log."""
import json
import os
import subprocess
import threading
import time

import pytest

from hpcc.testkit.images import ImageBuilder, directory, file, simple_image
from tests.conftest import tool
from tests.test_cli_style import check

pytestmark = [pytest.mark.root]


def _random_image(tag, size):
    b = ImageBuilder()
    b.layer([directory("data"), file("data/blob", os.urandom(size))])
    b.layer([directory("etc"), file("etc/hello", f"hello {tag}\n".encode())])
    return b.build()


def _one_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_denied_and_not_allowed_images_are_refused_in_one_line(
        gateway_service, service_users, registry):
    svc = gateway_service(policy={"deny": ["*.example.org", f"{registry.host}/svc/denied*"],
                                  "allow": [f"{registry.host}/svc/*", "*.example.org"]})
    registry.push("svc/denied", "1", simple_image("denied"))
    registry.push("svc/fine", "1", simple_image("fine"))
    registry.push("other/repo", "1", simple_image("other"))
    user = service_users[0]
    p = svc.run(user, "pull", "quay.example.org/team/tool:1")
    assert p.returncode == 1 and "denies quay.example.org/team/tool" in _one_line(p)
    p = svc.run(user, "pull", registry.ref("svc/denied", "1"))
    assert p.returncode == 1 and "pattern" in _one_line(p)
    p = svc.run(user, "pull", registry.ref("other/repo", "1"))
    assert p.returncode == 1 and "not among" in _one_line(p)
    assert svc.run(user, "pull", registry.ref("svc/fine", "1")).returncode == 0
    assert [r["outcome"] for r in svc.audit()] == ["denied", "denied", "denied", "pulled"]
    assert len(svc.images()) == 1


def test_images_over_the_size_limits_are_refused_and_leave_nothing(
        gateway_service, service_users, registry):
    registry.push("svc/big", "1", _random_image("big", 3 << 20))
    ref = registry.ref("svc/big", "1")
    user = service_users[0]
    svc = gateway_service(policy={"max_compressed_mb": 1})
    p = svc.run(user, "pull", ref)
    assert p.returncode == 1 and "compressed, more than the site's limit of 1 MB" in _one_line(p)
    assert not (svc.store / ".blobs").exists() or not any((svc.store / ".blobs").rglob("*"))
    svc2 = gateway_service(policy={"max_squashfs_mb": 1})
    p = svc2.run(user, "pull", ref)
    last = p.stderr.strip().splitlines()[-1]   # after the progress lines of the conversion
    assert p.returncode == 1 and "MB, more than the site's limit of 1 MB" in last, p.stderr
    assert "Traceback" not in p.stderr
    assert svc2.images() == [] and list((svc2.store / ".tmp").iterdir()) == []
    rec = svc2.audit()[-1]
    assert rec["outcome"] == "denied" and rec["compressed_size"] > 3_000_000


def test_per_user_limits(gateway_service, service_users, registry, fault_proxy):
    alice, bob = service_users
    for i in range(3):
        registry.push(f"svc/limit{i}", "1", simple_image(f"limit{i}"))
    svc = gateway_service(policy={"user_pulls_per_hour": 2})
    assert svc.run(alice, "pull", registry.ref("svc/limit0", "1")).returncode == 0
    assert svc.run(alice, "pull", registry.ref("svc/limit1", "1")).returncode == 0
    p = svc.run(alice, "pull", registry.ref("svc/limit2", "1"))
    assert p.returncode == 1 and "the site's limit is 2" in _one_line(p)
    assert svc.run(bob, "pull", registry.ref("svc/limit2", "1")).returncode == 0

    registry.push("svc/slow", "1", _random_image("slow", 3 << 20))
    fault_proxy.throttle = 1 << 20
    svc = gateway_service(policy={"user_concurrent_pulls": 1})
    box = {}
    t = threading.Thread(target=lambda: box.update(
        p=svc.run(alice, "pull", fault_proxy.ref("svc/slow", "1"))))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = json.loads(svc.run(alice, "status", "--json", prog="gateway").stdout)
        if st["pulls"]:
            break
        time.sleep(0.1)
    check("status", st)
    assert st["pulls"][0]["ref"] == fault_proxy.ref("svc/slow", "1")
    p = svc.run(alice, "pull", registry.ref("svc/limit0", "1"))
    assert p.returncode == 1 and "already has 1 pull(s) in progress" in _one_line(p)
    assert svc.run(bob, "pull", registry.ref("svc/limit0", "1")).returncode == 0
    t.join(120)
    assert box["p"].returncode == 0, box["p"].stderr


def test_the_audit_log_holds_every_request(gateway_service, service_users, registry):
    svc = gateway_service(policy={"deny": ["*.example.org"]})
    registry.push("svc/audit", "1", simple_image("audit"))
    ref = registry.ref("svc/audit", "1")
    alice, bob = service_users
    svc.run(alice, "pull", ref)
    svc.run(bob, "pull", ref)
    svc.run(bob, "pull", "x.example.org/a/b:1")
    svc.run(alice, "pull", registry.ref("svc/missing", "1"))
    svc.run(alice, "pull", ref, config=svc.tcp_config)
    recs = svc.audit()
    assert [(r["user"], r["outcome"]) for r in recs] == [
        ("hpcctest", "pulled"), ("hpcctest2", "present"), ("hpcctest2", "denied"),
        ("hpcctest", "failed"), ("hpcctest", "present")]
    pulled = recs[0]
    for key in ("time", "uid", "user", "via", "ref", "digest", "compressed_size",
                "squashfs_size", "seconds", "outcome"):
        assert key in pulled, key
    assert recs[3]["error"] and "not found" in recs[3]["error"]
    assert recs[4]["via"] == "tcp" and recs[4]["host"] == "127.0.0.1"


@pytest.mark.slurm
def test_eviction_keeps_the_images_of_pending_jobs(gateway_service, service_users, registry,
                                                   slurm_cluster):
    refs, images = {}, {}
    for name in ("jobimage", "old", "new"):
        images[name] = _random_image(name, 600_000)
        registry.push(f"svc/{name}", "1", images[name])
        refs[name] = registry.ref(f"svc/{name}", "1")
    svc = gateway_service(policy={"store_budget_mb": 1}, run=False)
    svc.start(env={"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]})
    p = slurm_cluster.run("sbatch", "--hold", "--parsable", f"--container={refs['jobimage']}",
                          "--wrap", "true", user="slurmuser1")
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    user = service_users[0]
    try:
        # gateway prefetch (root, from cron) asks the service for the pending job's image
        p = subprocess.run([tool("gateway"), "prefetch", "--json"], capture_output=True,
                           text=True, timeout=120,
                           env=dict(slurm_cluster.env, HPCC_CONFIG=str(svc.config)))
        assert p.returncode == 0, p.stderr
        assert {"image": refs["jobimage"], "status": "pulled"}.items() <= \
            [e for e in json.loads(p.stdout) if e["image"] == refs["jobimage"]][0].items()
        rec = svc.audit()[-1]
        assert (rec["user"], rec["via"], rec["outcome"]) == ("root", "unix", "pulled")
        for name in ("jobimage", "old", "new"):   # oldest first
            assert svc.run(user, "pull", refs[name]).returncode == 0
            time.sleep(0.05)
        evicted = svc.wait_evicted()
        assert [r["tags"] for r in evicted] == [[refs["old"]]], svc.audit()
        assert svc.run(user, "inspect", refs["jobimage"]).returncode == 0
        assert svc.run(user, "inspect", refs["new"]).returncode == 0
        assert svc.run(user, "inspect", refs["old"]).returncode == 1
        # the evicted image's own layer blob went with it; the kept images' stay
        blobs = {p.name for p in (svc.store / ".blobs").rglob("*") if p.is_file()}
        for name, image in images.items():
            hexes = {layer.digest.split(":")[1] for layer in image.layers}
            assert bool(hexes & blobs) == (name != "old"), (name, hexes, blobs)
    finally:
        slurm_cluster.run("scancel", job_id)


def test_an_oversized_squashfs_is_refused_while_it_is_converted(
        gateway_service, service_users, registry, fault_proxy):
    b = ImageBuilder()
    b.layer([directory("data")] + [file(f"data/{i}", os.urandom(512 << 10)) for i in range(24)])
    registry.push("svc/huge", "1", b.build())
    fault_proxy.throttle = 3 << 20          # 12 MB arrive over ~4 s, converted as they come
    svc = gateway_service(policy={"max_squashfs_mb": 1})
    t0 = time.monotonic()
    p = svc.run(service_users[0], "pull", fault_proxy.ref("svc/huge", "1"))
    took = time.monotonic() - t0
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "more than the site's limit of 1 MB" in last, p.stderr
    written = int(last.split("grew to ")[1].split(" MB")[0])
    assert written < 8, f"stopped at {written} MB of 12 ({took:.1f} s)"
    assert svc.images() == [] and list((svc.store / ".tmp").iterdir()) == []
