"""Gateway service benchmark (run as root; see bench/service.sh).

    (1) N concurrent requests (default 10) for one image the store does not have, through
        `gateway serve`, against one plain `gateway pull` of the same image into an empty
        store; both start with empty blob caches and talk to the same local registry.
        Target: the N requests take <= 1.1x the single pull (one conversion serves all).
        Measured twice: N requests from threads of one client process (the service's own
        cost), and N `hpcc pull` processes started at once (what users see; each process
        start costs CPU too).
    (2) a request for an image already in the store: the client library's round trip
        (median of 30), and a whole `hpcc pull` process. Target: <= 50 ms.

The image: two layers made of this host's /usr/lib/python3.X and /usr/share/perl (many
small files, like a scientist's userland), gzip-compressed. `--repeat R` alternates the
single pull and the N requests R times (fresh stores each time) and reports medians: the
development VM's speed drifts with the other work on it.
The service runs as a dedicated account (hpccgw, created if missing) owning its store.
"""
import argparse
import gzip
import io
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ACCOUNT = "hpccgw"


def account():
    try:
        return pwd.getpwnam(ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--home-dir", f"/var/lib/{ACCOUNT}",
                        "--create-home", "--shell", "/usr/sbin/nologin", ACCOUNT], check=True)
        return pwd.getpwnam(ACCOUNT)


def _layer(path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(path, arcname=path.lstrip("/"),
               filter=lambda ti: None if ti.isdev() else ti)
    tar = buf.getvalue()
    return tar, gzip.compress(tar, 6)


def build_image():
    from hpcc.testkit.images import MT_DOCKER_LAYER, ImageBuilder

    b = ImageBuilder()
    for path in (sysconfig.get_paths()["stdlib"], "/usr/share/perl"):
        if os.path.isdir(path):
            tar, blob = _layer(path)
            b.raw_layer(blob, MT_DOCKER_LAYER["gzip"], tar=tar)
    return b.env("PATH=/usr/bin:/bin").build()


def write_config(path, store, sock=None):
    text = f'[store]\npath = "{store}"\n[policy]\naudit_log = ""\n'
    if sock:
        text += f'[service]\nenabled = true\nsocket = "{sock}"\n'
    Path(path).write_text(text)
    os.chmod(path, 0o644)


def timed(argv, env):
    t0 = time.monotonic()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{argv} failed: {p.stderr}")
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10, help="concurrent requests (default 10)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (medians are reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (a service account is created and used)")
    from hpcc.config import load_config
    from hpcc.gateway import service_client
    from hpcc.testkit.registry import LocalRegistry

    acct = account()
    base = Path(tempfile.mkdtemp(prefix="hpcc-bench-svc-", dir="/tmp"))
    os.chmod(base, 0o755)
    serve = None
    try:
        with LocalRegistry() as reg:
            image = build_image()
            reg.push("bench/svc", "1", image)
            ref = reg.ref("bench/svc", "1")
            size = sum(len(layer.blob) for layer in image.layers)
            print(f"image {ref}: {len(image.layers)} layers, {size / 1e6:.1f} MB compressed")

            def single_pull(tag):
                plain = base / f"plain-{tag}.toml"
                write_config(plain, base / f"plain-store-{tag}")
                return timed([BIN / "gateway", "pull", "-q", ref],
                             dict(os.environ, HPCC_CONFIG=str(plain)))

            # the service, as its account
            def start(tag):
                store = base / f"store-{tag}"
                store.mkdir()
                os.chown(store, acct.pw_uid, acct.pw_gid)
                run = base / f"run-{tag}"
                run.mkdir()
                os.chown(run, acct.pw_uid, acct.pw_gid)
                cfg = base / f"svc-{tag}.toml"
                write_config(cfg, store, run / "gw.sock")
                senv = {"PATH": os.environ["PATH"], "HPCC_CONFIG": str(cfg),
                        "HOME": acct.pw_dir}
                proc = subprocess.Popen([BIN / "gateway", "serve"], env=senv,
                                        user=acct.pw_uid, group=acct.pw_gid, extra_groups=[],
                                        stderr=subprocess.DEVNULL, start_new_session=True)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        with socket.socket(socket.AF_UNIX) as s:
                            s.connect(str(run / "gw.sock"))
                        break
                    except OSError:
                        time.sleep(0.05)
                return proc, cfg

            def requests_at_once(config):
                errors = []

                def request():
                    try:
                        service_client.pull(config, ref)
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(e)

                threads = [threading.Thread(target=request) for _ in range(args.n)]
                t0 = time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    sys.exit(f"requests failed: {errors[0]}")
                return time.monotonic() - t0

            singles, concurrents = [], []
            for r in range(args.repeat):
                singles.append(single_pull(r))
                if serve is not None:
                    serve.terminate()
                    serve.wait()
                serve, cfg = start(f"threads-{r}")
                config = load_config(str(cfg))
                concurrents.append(requests_at_once(config))
                print(f"round {r + 1}: single {singles[-1]:.2f} s, {args.n} requests "
                      f"{concurrents[-1]:.2f} s, ratio {concurrents[-1] / singles[-1]:.2f}",
                      flush=True)
            single = statistics.median(singles)
            concurrent = statistics.median(concurrents)
            ratios = [c / s for c, s in zip(concurrents, singles)]
            os.environ["HPCC_CONFIG"] = str(cfg)

            # (2) an image already in the store
            rtts = []
            for _ in range(30):
                t0 = time.monotonic()
                service_client.pull(config, ref)
                rtts.append(time.monotonic() - t0)
            present_proc = timed([BIN / "hpcc", "pull", "-q", ref], dict(os.environ))
            serve.terminate()
            serve.wait()

            # (1c) N `hpcc pull` processes at once
            serve, cfg = start("procs")
            penv = dict(os.environ, HPCC_CONFIG=str(cfg))
            t0 = time.monotonic()
            procs = [subprocess.Popen([BIN / "hpcc", "pull", "-q", ref], env=penv,
                                      stderr=subprocess.PIPE) for _ in range(args.n)]
            rcs = [p.wait() for p in procs]
            processes = time.monotonic() - t0
            failed = [p for p, rc in zip(procs, rcs) if rc]
            if failed:
                sys.exit(f"hpcc pull failed: {failed[0].stderr.read().decode()}")
    finally:
        if serve is not None and serve.poll() is None:
            serve.terminate()
            serve.wait()
        shutil.rmtree(base, ignore_errors=True)

    med = statistics.median(rtts) * 1000
    print(f"single gateway pull:                          {single:7.2f} s")
    print(f"{args.n} concurrent requests (one client process): {concurrent:7.2f} s   "
          f"ratio {concurrent / single:.2f} (target <= 1.10; median of the rounds' ratios "
          f"{statistics.median(ratios):.2f})")
    print(f"{args.n} concurrent `hpcc pull` processes:       {processes:7.2f} s   "
          f"ratio {processes / single:.2f}")
    print(f"image already in the store: request {med:.1f} ms median "
          f"(max {max(rtts) * 1000:.1f} ms; target <= 50 ms), "
          f"whole `hpcc pull` process {present_proc * 1000:.0f} ms")
    print(json.dumps({"single_s": round(single, 3), "concurrent_s": round(concurrent, 3),
                      "processes_s": round(processes, 3),
                      "ratio": round(concurrent / single, 3),
                      "present_request_ms": round(med, 1),
                      "present_process_ms": round(present_proc * 1000)}))


if __name__ == "__main__":
    main()
