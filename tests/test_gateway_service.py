"""`gateway serve`, the real service, started by the tests as a dedicated unprivileged
account, and its clients (`hpcc pull`, `gateway status`) run as unprivileged users."""
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from hpcc.testkit.busybox import BUSYBOX
from hpcc.testkit.images import ImageBuilder, directory, file, simple_image, symlink
from tests.fixtures.gateway_service import _new_munged
from tests.test_cli_style import check

pytestmark = [pytest.mark.root]


def _big_image(tag, size=3 << 20):
    """An image whose layer does not compress: a throttled registry makes it slow."""
    b = ImageBuilder()
    data = Path(BUSYBOX).read_bytes()
    b.layer([directory("bin"), file("bin/busybox", data, 0o755), symlink("bin/cat", "busybox"),
             symlink("bin/sh", "busybox")])
    b.layer([directory("data"), file("data/blob", os.urandom(size))], compression="gzip")
    b.layer([directory("etc"), file("etc/hello", f"hello {tag}\n".encode())])
    return b.env("PATH=/bin").cmd(["/bin/sh"]).build()


def _wait(pred, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _outcomes(svc, op="pull"):
    return [r["outcome"] for r in svc.audit() if r.get("op") == op]


def test_two_users_pulling_one_image_at_once_share_one_conversion(
        gateway_service, service_users, registry, fault_proxy):
    svc = gateway_service()
    image = _big_image("shared")
    registry.push("svc/shared", "1", image)
    fault_proxy.throttle = 1 << 20          # ~3 s for the big layer: the requests overlap
    ref = fault_proxy.ref("svc/shared", "1")
    alice, bob = service_users
    results = {}

    def pull(user):
        results[user.pw_name] = svc.run(user, "pull", "--json", ref)

    threads = [threading.Thread(target=pull, args=(u,)) for u in (alice, bob)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for user in (alice, bob):
        p = results[user.pw_name]
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        check("pull", out)
        assert out["via"] == "service" and out["store"] == str(svc.store)
        assert os.path.exists(out["path"])
        assert svc.home_files(user) == [], "nothing of the image may land in the home"
    assert sorted(_outcomes(svc)) == ["joined", "pulled"]
    assert len(svc.images()) == 1
    layers = {lay.digest for lay in image.layers}
    gets = [r["path"].rsplit("/", 1)[1] for r in fault_proxy.log
            if r["kind"] == "blob" and r["method"] == "GET"]
    assert sorted(d for d in gets if d in layers) == sorted(layers), "each layer once"
    # the image is usable by everyone from the site store
    p = svc.run(bob, "run", ref, "cat", "/etc/hello")
    assert p.returncode == 0 and p.stdout == "hello shared\n", p.stderr
    # again: answered from the store, no conversion
    p = svc.run(alice, "pull", "--json", ref)
    assert p.returncode == 0 and json.loads(p.stdout)["converted"] is False
    assert _outcomes(svc)[-1] == "present"


def test_progress_reaches_every_requester(gateway_service, service_users, registry,
                                          fault_proxy):
    svc = gateway_service()
    registry.push("svc/progress", "1", _big_image("progress"))
    fault_proxy.throttle = 1 << 20
    ref = fault_proxy.ref("svc/progress", "1")
    results = {}

    def pull(user):
        results[user.pw_name] = svc.run(user, "pull", ref)

    threads = [threading.Thread(target=pull, args=(u,)) for u in service_users]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(120)
    for p in results.values():
        assert p.returncode == 0, p.stderr
        assert "converting to squashfs" in p.stderr, p.stderr
        assert "is in the site store" in p.stderr, p.stderr


def test_insecure_and_force_are_not_for_the_service(gateway_service, service_users):
    svc = gateway_service()
    for flag in ("--insecure", "--force"):
        p = svc.run(service_users[0], "pull", flag, "busybox")
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert flag in p.stderr
    assert svc.audit() == []


def test_absent_service_is_one_line_naming_the_socket(gateway_service, service_users):
    svc = gateway_service(run=False)
    p = svc.run(service_users[0], "pull", "docker.io/library/busybox:latest")
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert str(svc.socket) in lines[0] and "systemctl start hpcc-gateway" in lines[0]
    assert svc.home_files(service_users[0]) == []


def test_service_killed_mid_pull_leaves_nothing_and_the_next_pull_resumes(
        gateway_service, service_users, registry, fault_proxy):
    svc = gateway_service()
    registry.push("svc/killed", "1", _big_image("killed", size=4 << 20))
    fault_proxy.throttle = 1 << 20
    ref = fault_proxy.ref("svc/killed", "1")
    user = service_users[0]
    box = {}
    t = threading.Thread(target=lambda: box.update(p=svc.run(user, "pull", ref)))
    t.start()
    blobs = svc.store / ".blobs"
    _wait(lambda: any(p.name.endswith(".partial") and p.stat().st_size > (1 << 20)
                      for p in blobs.rglob("*")), what="a partial download")
    svc.kill()
    t.join(60)
    p = box["p"]
    assert p.returncode == 3
    assert len(p.stderr.strip().splitlines()[-1:]) == 1
    assert "closed the connection" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert svc.images() == [], "no visible image after the kill"
    svc.start()
    before = len(fault_proxy.log)
    p = svc.run(user, "pull", "--json", ref)
    assert p.returncode == 0, p.stderr
    ranges = [r for r in fault_proxy.log[before:] if r["kind"] == "blob" and r.get("range")]
    assert ranges, "the big layer's download resumed from the blob cache (Range request)"
    assert len(svc.images()) == 1


def test_forged_identities_are_refused(gateway_service, service_users, munged):
    from hpcc.gateway import munge, protocol

    svc = gateway_service()
    user = service_users[0]

    def ask(line, tcp=False):
        if tcp:
            s = socket.create_connection(("127.0.0.1", svc.port))
        else:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(svc.socket))
        with s, s.makefile("rwb") as f:
            protocol.send(f, line)
            return protocol.recv(f)

    # UNIX socket: a request claiming another uid than the kernel reports
    ev = ask({"op": "status", "uid": user.pw_uid})
    assert ev["event"] == "error" and "claims uid" in ev["message"]
    # TCP: no credential, a garbage one, a replayed one, one for another uid's claim
    ev = ask({"op": "status"}, tcp=True)
    assert ev["event"] == "error" and "munge credential" in ev["message"]
    ev = ask({"munge": "MUNGE:garbage:"}, tcp=True)
    assert ev["event"] == "error" and "munge credential refused" in ev["message"]
    cred = munge.encode(json.dumps({"op": "status", "uid": 0}).encode(), socket=munged.socket)
    assert ask({"munge": cred}, tcp=True)["event"] == "result"
    ev = ask({"munge": cred}, tcp=True)
    assert ev["event"] == "error" and "replayed" in ev["message"].lower(), ev
    cred = munge.encode(json.dumps({"op": "status", "uid": user.pw_uid}).encode(),
                        socket=munged.socket)
    ev = ask({"munge": cred}, tcp=True)
    assert ev["event"] == "error" and "claims uid" in ev["message"]
    # a credential sealed with another cluster's key
    other = _new_munged()
    try:
        cred = munge.encode(json.dumps({"op": "status"}).encode(), socket=other.socket)
    finally:
        other.stop()
        shutil.rmtree(other.dir, ignore_errors=True)
    ev = ask({"munge": cred}, tcp=True)
    assert ev["event"] == "error" and "munge credential refused" in ev["message"], ev
    refused = [r for r in svc.audit() if r["outcome"] == "refused"]
    assert len(refused) == 6, svc.audit()


def test_a_user_on_another_host_pulls_over_tcp_with_munge(gateway_service, service_users,
                                                         registry):
    svc = gateway_service()
    registry.push("svc/tcp", "1", simple_image("tcp"))
    user = service_users[1]
    p = svc.run(user, "pull", "--json", registry.ref("svc/tcp", "1"), config=svc.tcp_config)
    assert p.returncode == 0, p.stderr
    rec = svc.audit()[-1]
    assert rec["via"] == "tcp" and rec["uid"] == user.pw_uid and rec["outcome"] == "pulled"


def test_status_and_list(gateway_service, service_users, registry):
    svc = gateway_service()
    registry.push("svc/list", "1", simple_image("list"))
    user = service_users[0]
    assert svc.run(user, "pull", registry.ref("svc/list", "1")).returncode == 0
    p = svc.run(user, "status", "--json", prog="gateway")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    check("status", st)
    assert st["store"] == str(svc.store) and st["pulls"] == []
    p = svc.run(user, "status", "--images", "--json", prog="gateway")
    images = json.loads(p.stdout)
    check("status_images", images)
    assert [i["tags"] for i in images] == [[registry.ref("svc/list", "1")]]


def test_the_policy_is_validated_by_the_schema(tmp_path, run_cli):
    from tests.fixtures.gateway_service import write_config

    for section, bad, key in (("policy", {"max_squashfs_mb": -1}, "policy.max_squashfs_mb"),
                              ("policy", {"allow": ["has space"]}, "policy.allow.0"),
                              ("policy", {"signatures": [{"match": "x/*"}]}, "policy.signatures.0"),
                              ("service", {"listen": "nope"}, "service.listen"),
                              ("service", {"sockt": "/x"}, "service.sockt")):
        cfg = tmp_path / "hpcc.toml"
        write_config(cfg, {section: bad})
        p = run_cli("hpcc", "config", "check", cfg)
        assert p.returncode == 1 and key in p.stderr, (bad, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1


def test_connections_held_open_cannot_starve_the_service(gateway_service, service_users):
    from hpcc.gateway import protocol

    svc = gateway_service(service={"max_connections": 2})
    idle = []

    def busy_line(s, timeout):
        s.settimeout(timeout)
        try:
            with s.makefile("rwb") as f:
                return protocol.recv(f)
        except TimeoutError:
            return None

    try:
        # Two connections that never ask anything hold both slots; a third is refused. A
        # connection of the fixture's (its readiness probe) may still hold a slot a moment
        # on a loaded machine: then the second one was refused, and the attempt is redone.
        for _attempt in range(3):
            if idle:                        # the last attempt's: let the service see them go
                for s in idle:
                    s.close()
                time.sleep(1)
            idle = []
            for _ in range(2):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(svc.socket))
                idle.append(s)
            time.sleep(0.2)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(svc.socket))
                ev = busy_line(s, 10)
            if ev is not None:
                break
            refused = [x for x in (busy_line(i, 0.5) for i in idle) if x is not None]
            assert refused and "busy" in refused[0]["message"], "a third connection was served"
        assert ev["event"] == "error" and "busy" in ev["message"], ev
        p = svc.run(service_users[0], "status", prog="gateway")
        assert p.returncode == 3 and "busy" in p.stderr, p.stderr
    finally:
        for s in idle:
            s.close()
    _wait(lambda: svc.run(service_users[0], "status", prog="gateway").returncode == 0,
          what="the service to serve again")
