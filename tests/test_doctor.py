"""`hpcc doctor`: each condition is broken for real (in namespaces of the test's own, so the
machine and the other tests are untouched) and the diagnosis is checked."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.nouserns import run_without_userns

pytestmark = pytest.mark.root

HPCC = str(Path(sys.executable).parent / "hpcc")
CHECK_IDS = {"host.userns", "host.fuse", "host.squashfuse", "host.kernel_squashfs",
             "host.overlay", "host.loop", "host.syscalls", "host.mount_helper", "store.site",
             "store.user", "gateway.service", "mpi.host", "gpu.driver"}


def _public_dir(prefix):
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def tmp_path():
    """A temp dir the test user can read (pytest's own sits under a 0700 directory)."""
    d = _public_dir("hpcc-doctor-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def site():
    """A site config with a readable store, and a user environment without Slurm."""
    d = _public_dir("hpcc-doctor-site-")
    store = d / "store"
    store.mkdir(mode=0o755)
    cfg = d / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{store}"\n[launcher]\nhooks_dir = ""\n')
    os.chmod(cfg, 0o644)
    yield {"dir": d, "config": str(cfg), "store": store}
    shutil.rmtree(d, ignore_errors=True)


def _env(user, config, **extra):
    import pwd
    ent = pwd.getpwnam(user)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ent.pw_dir, "USER": user,
           "HPCC_CONFIG": config, "SLURM_CONF": "/nonexistent/slurm.conf"}
    env.update(extra)
    return env


def _report(p):
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stdout, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema"] == "hpcc-doctor/1"
    return doc, {c["id"]: c for c in doc["checks"]}


def doctor(user, config, *args, wrap=(), **env):
    """hpcc doctor --json as `user` (optionally inside a wrapper command run as root)."""
    import pwd
    ent = pwd.getpwnam(user)
    if wrap:
        cmd = [*wrap, "setpriv", f"--reuid={ent.pw_uid}", f"--regid={ent.pw_gid}",
               "--clear-groups", "--", HPCC, "doctor", "--json", *args]
        return subprocess.run(cmd, env=_env(user, config, **env), capture_output=True,
                              text=True, timeout=120, cwd="/", check=False)
    return subprocess.run([HPCC, "doctor", "--json", *args], env=_env(user, config, **env),
                          user=ent.pw_uid, group=ent.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=120, cwd="/", check=False)


def test_a_working_host_passes_every_check(site, test_user):
    p = doctor(test_user.pw_name, site["config"])
    doc, checks = _report(p)
    assert CHECK_IDS <= set(checks)
    for c in doc["checks"]:
        assert c["status"] in ("ok", "warn", "fail", "off", "skip")
        assert isinstance(c["summary"], str) and c["summary"]
        assert set(c) == {"id", "title", "status", "summary", "fix", "details"}
    for cid in ("host.userns", "host.fuse", "host.squashfuse", "host.overlay",
                "host.syscalls", "store.site", "store.user"):
        assert checks[cid]["status"] == "ok", checks[cid]
    assert checks["host.squashfuse"]["details"]["version"]
    assert checks["gateway.service"]["status"] == "off"
    assert doc["user"]["uid"] == test_user.pw_uid
    assert doc["ok"] is True and p.returncode == 0, p.stdout


def test_root_also_tries_the_kernel_squashfs_zstd_mount_and_a_loop_device(site):
    p = subprocess.run([HPCC, "doctor", "--json"], env=_env("root", site["config"]),
                       capture_output=True, text=True, timeout=120, check=False)
    _, checks = _report(p)
    assert checks["host.kernel_squashfs"]["status"] == "ok", checks["host.kernel_squashfs"]
    assert checks["host.kernel_squashfs"]["details"]["probe"] == {"ok": True}
    assert checks["host.loop"]["status"] == "ok"
    # the unprivileged probes ran as nobody, not as root
    assert checks["host.userns"]["details"]["as_uid"] == 65534
    assert checks["host.userns"]["status"] == "ok"


def test_no_usable_loop_device(site):
    """As root, in a mount namespace of the test's own, /dev/loop-control is /dev/null."""
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null /dev/loop-control && exec "$@"', "sh",
            HPCC, "doctor", "--json"]
    p = subprocess.run(wrap, env=_env("root", site["config"]), capture_output=True, text=True,
                       timeout=120, check=False)
    _, checks = _report(p)
    c = checks["host.loop"]
    assert c["status"] == "fail" and "no usable loop device" in c["summary"], c
    assert "modprobe loop" in c["fix"]
    assert checks["host.kernel_squashfs"]["status"] == "skip"
    assert p.returncode == 1


def test_text_output_says_all_checks_passed(site, test_user):
    p = subprocess.run([HPCC, "doctor"], env=_env(test_user.pw_name, site["config"]),
                       user=test_user.pw_uid, group=test_user.pw_gid, extra_groups=[],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[ok  ] unprivileged user namespaces" in p.stdout
    assert p.stdout.rstrip().endswith("all checks passed")


def test_a_host_without_user_namespaces(site, test_user):
    p = run_without_userns([HPCC, "doctor", "--json"], test_user.pw_uid, test_user.pw_gid,
                           env=_env(test_user.pw_name, site["config"]), cwd="/",
                           capture_output=True, text=True, timeout=120, check=False)
    doc, checks = _report(p)
    c = checks["host.userns"]
    assert c["status"] == "fail"
    assert "user.max_user_namespaces = 0" in c["summary"]
    assert "sysctl -w user.max_user_namespaces=" in c["fix"] and "srun" in c["fix"]
    assert c["details"]["sysctls"]["user.max_user_namespaces"] == 0
    assert c["details"]["probe"]["errno"] == "ENOSPC"
    # what needs a namespace is reported as not tried, not as broken
    assert checks["host.overlay"]["status"] == "skip"
    assert doc["ok"] is False and p.returncode == 1


def test_without_user_namespaces_a_slurm_site_gets_a_warning(site, test_user, tmp_path,
                                                              spank_plugin):
    """A site that runs everything through Slurm may switch user namespaces off."""
    conf = _slurm_conf(tmp_path, [f"required {spank_plugin} python={sys.executable}"])
    p = run_without_userns([HPCC, "doctor", "--json"], test_user.pw_uid, test_user.pw_gid,
                           env=_env(test_user.pw_name, site["config"], SLURM_CONF=conf),
                           cwd="/", capture_output=True, text=True, timeout=120)
    _, checks = _report(p)
    c = checks["host.userns"]
    assert c["status"] == "warn" and "srun --container-image can" in c["summary"], c
    assert checks["slurm.plugin"]["status"] == "ok"


def test_dev_fuse_that_users_cannot_open(site, test_user, tmp_path):
    """In a mount namespace of the test's own, /dev/fuse is covered by a 0600 node."""
    os.chmod(tmp_path, 0o755)
    node = tmp_path / "fuse"
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mknod -m 0600 {node} c 10 229 && mount --bind {node} /dev/fuse && exec "$@"',
            "sh"]
    p = doctor(test_user.pw_name, site["config"], wrap=wrap)
    doc, checks = _report(p)
    c = checks["host.fuse"]
    assert c["status"] == "fail", c
    assert c["details"]["mode"] == "0600"
    assert "cannot open /dev/fuse" in c["summary"] and "chmod 0666 /dev/fuse" in c["fix"]
    assert checks["host.squashfuse"]["status"] == "fail"  # its mount needs /dev/fuse
    assert doc["ok"] is False and p.returncode == 1
    assert os.stat("/dev/fuse").st_mode & 0o777 == 0o666  # the host's is untouched


def test_squashfuse_ll_missing(site, test_user, tmp_path):
    """squashfuse_ll hidden: PATH without it, and /usr/bin's copy covered (in a mount
    namespace of the test's own) by a file that is not executable."""
    os.chmod(tmp_path, 0o755)
    stub = tmp_path / "empty"
    stub.write_text("")
    os.chmod(stub, 0o644)
    exe = shutil.which("squashfuse_ll")
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind {stub} {exe} && exec "$@"', "sh"]
    p = doctor(test_user.pw_name, site["config"], wrap=wrap)
    _, checks = _report(p)
    c = checks["host.squashfuse"]
    assert c["status"] == "fail", c
    assert "squashfuse_ll is not installed" in c["summary"]
    assert "squashfuse package" in c["fix"]
    assert p.returncode == 1


SECCOMP = str(Path(__file__).parent / "fixtures" / "seccomp_deny.py")


@pytest.mark.parametrize("denied,status", [("openat2", "warn"),
                                           ("openat2,mount_setattr", "fail"),
                                           ("open_tree", "fail")])
def test_system_calls_refused_by_seccomp(site, test_user, denied, status):
    """A seccomp filter (as container runtimes' default profiles have) answers ENOSYS."""
    p = doctor(test_user.pw_name, site["config"], wrap=[sys.executable, SECCOMP, denied])
    _, checks = _report(p)
    c = checks["host.syscalls"]
    assert c["status"] == status, c
    for name in denied.split(","):
        key = "openat2" if name == "openat2" else "mount_api"
        assert c["details"]["probe"][key]["errno"] == "ENOSYS"
    assert "seccomp profile" in c["fix"]
    assert p.returncode == (1 if status == "fail" else 0)


@pytest.mark.parametrize("case", ["off", "missing", "not-setuid", "user-owned", "setuid"])
def test_mount_helper(site, test_user, tmp_path, case):
    helper = tmp_path / "hpcc-mount"
    if case not in ("off", "missing"):
        shutil.copy("/bin/true", helper)
        os.chmod(helper, 0o755)
        if case == "user-owned":
            os.chown(helper, test_user.pw_uid, test_user.pw_gid)
            os.chmod(helper, 0o4755)
        if case == "setuid":
            os.chmod(helper, 0o4755)
    cfg = tmp_path / "hpcc.toml"
    value = "" if case == "off" else str(helper)
    cfg.write_text(f'[store]\npath = "{site["store"]}"\n[launcher]\nmount_helper = "{value}"\n')
    os.chmod(cfg, 0o644)
    _, checks = _report(doctor(test_user.pw_name, str(cfg)))
    c = checks["host.mount_helper"]
    nosuid = bool(os.statvfs(tmp_path).f_flag & os.ST_NOSUID)
    # "setuid": root's and setuid, but /bin/true, not the helper: doctor runs it and says so
    # (the real helper's "ok": test_mount_helper_installed_off_missing_not_setuid_or_...)
    want = {"off": "off", "missing": "warn", "not-setuid": "warn", "user-owned": "fail",
            "setuid": "warn"}[case]
    assert c["status"] == want, c
    if case == "user-owned":
        assert "someone other than root can replace it" in c["summary"]
        assert f"chown root:root {helper}" in c["fix"]
    if case in ("missing", "not-setuid"):
        assert "squashfuse_ll" in c["summary"]
    if case == "setuid" and not nosuid:
        assert "does not answer as the mount helper does" in c["summary"], c


def test_unreadable_site_store(site, test_user, tmp_path):
    os.chmod(tmp_path, 0o755)
    store = tmp_path / "private-store"
    store.mkdir(mode=0o700)
    cfg = tmp_path / "hpcc.toml"
    cfg.write_text(f'[store]\npath = "{store}"\n')
    os.chmod(cfg, 0o644)
    _, checks = _report(doctor(test_user.pw_name, str(cfg)))
    c = checks["store.site"]
    assert c["status"] == "fail" and "not readable by you" in c["summary"]
    assert f"chmod a+rx {store}" in c["fix"]


def test_gateway_service_answers_or_is_down(gateway_service, service_users):
    """A real `gateway serve` (tests/fixtures/gateway_service.py), asked for its status over
    its socket, then stopped."""
    svc = gateway_service(listen=False)
    user = service_users[0]
    _, checks = _report(doctor(user.pw_name, str(svc.config)))
    c = checks["gateway.service"]
    assert c["status"] == "ok", c
    assert c["details"]["answer"]["store"] == str(svc.store)
    svc.stop()
    p = doctor(user.pw_name, str(svc.config))
    _, checks = _report(p)
    c = checks["gateway.service"]
    assert c["status"] == "fail" and str(svc.socket) in c["summary"], c
    assert "systemctl start hpcc-gateway" in c["fix"]
    assert p.returncode == 1


def test_gateway_service_not_enabled_is_off(site, test_user):
    _, checks = _report(doctor(test_user.pw_name, site["config"]))
    assert checks["gateway.service"]["status"] == "off"


# ------------------------------------------------------------------------------------------
# Slurm


def _slurm_conf(tmp_path, lines, oci=False):
    from hpcc.testkit.slurmcluster import SlurmCluster
    c = SlurmCluster(tmp_path / "cluster", plugstack_lines=lines)
    c._write_config()   # the files srun reads; no daemon is started
    if oci:
        (c.conf.parent / "oci.conf").write_text("RunTimeQuery=true\n")
    return str(c.conf)


def test_slurm_plugin_loaded(site, test_user, tmp_path, spank_plugin):
    line = f"required {spank_plugin} python={sys.executable}"
    conf = _slurm_conf(tmp_path, [line])
    _, checks = _report(doctor(test_user.pw_name, site["config"], SLURM_CONF=conf))
    assert checks["slurm.plugin"]["status"] == "ok", checks["slurm.plugin"]
    assert checks["slurm.plugstack"]["status"] == "ok"
    assert checks["slurm.plugstack"]["details"]["lines"][0]["plugin"] == str(spank_plugin)
    assert checks["slurm.oci_conf"]["status"] == "ok"


def test_slurm_plugstack_names_a_missing_plugin(site, test_user, tmp_path):
    conf = _slurm_conf(tmp_path, ["required /nonexistent/spank_hpcc.so"])
    p = doctor(test_user.pw_name, site["config"], SLURM_CONF=conf)
    _, checks = _report(p)
    assert checks["slurm.plugstack"]["status"] == "fail"
    assert "/nonexistent/spank_hpcc.so" in checks["slurm.plugstack"]["summary"]
    assert checks["slurm.plugin"]["status"] == "fail"
    assert p.returncode == 1


def test_slurm_without_the_plugin_and_an_oci_conf(site, test_user, tmp_path, spank_plugin):
    conf = _slurm_conf(tmp_path, [f"required {spank_plugin} python={sys.executable}"], oci=True)
    _, checks = _report(doctor(test_user.pw_name, site["config"], SLURM_CONF=conf))
    c = checks["slurm.oci_conf"]
    assert c["status"] == "warn" and "--container-image" in c["summary"]
    conf = _slurm_conf(tmp_path / "b", [])
    _, checks = _report(doctor(test_user.pw_name, site["config"], SLURM_CONF=conf))
    assert checks["slurm.plugstack"]["status"] == "off"
    assert "spank_hpcc.so" in checks["slurm.plugstack"]["fix"]


# ------------------------------------------------------------------------------------------
# MPI (the hook's own logic on real images)


@pytest.fixture(scope="module")
def mpi_images():
    from tests.hooks_images import LIBDIR, _copy_lib, base_tree, finish, ldd
    work = _public_dir("hpcc-doctor-mpi-")
    out = {"nompi": str(finish(base_tree(work / "t-nompi"), work / "nompi.sqfs"))}
    ompi = Path(LIBDIR) / "libmpi.so.40"
    if ompi.exists():
        t = base_tree(work / "t-openmpi")
        _copy_lib(t, ompi)
        for lib in ldd(ompi):
            _copy_lib(t, lib)
        out["openmpi"] = str(finish(t, work / "openmpi.sqfs"))
    for d in work.glob("t-*"):
        shutil.rmtree(d)
    for f in out.values():
        os.chmod(f, 0o644)
    yield out
    shutil.rmtree(work, ignore_errors=True)


def test_host_mpi_is_reported(site, test_user):
    _, checks = _report(doctor(test_user.pw_name, site["config"]))
    c = checks["mpi.host"]
    assert c["status"] == "ok"
    assert c["details"]["libraries"]["c"]["soname"] in ("libmpich.so.12", "libmpi.so.12")
    assert os.path.isfile(c["details"]["libraries"]["c"]["file"])
    # the hook's own dependency closure, as for an image with no libraries of its own
    deps = {d["soname"] for d in c["details"]["dependencies"]}
    needed = subprocess.run(["readelf", "-d", c["details"]["libraries"]["c"]["file"]],
                            capture_output=True, text=True, check=True).stdout
    direct = {n for n in re.findall(r"\[(lib[^\]]+)\]", needed)
              if not n.startswith(("libc.so", "libm.so", "ld-linux", "libpthread", "libdl",
                                   "librt", "libmpich"))}
    assert direct and direct <= deps, (direct, deps)
    assert re.fullmatch(r"\d+\.\d+", c["details"]["glibc_needed"])


@pytest.mark.parametrize("who", ["root", "user"])
def test_image_whose_mpi_the_hook_accepts(site, test_user, mpi_images, who):
    user = "root" if who == "root" else test_user.pw_name
    image = mpi_images["nompi"]
    trusted = None
    if who == "root":
        # the kernel parses only images in root-owned directories all the way up (not /tmp)
        trusted = Path(tempfile.mkdtemp(prefix="hpcc-doctor-", dir="/run"))
        os.chmod(trusted, 0o755)
        image = str(trusted / "nompi.sqfs")
        shutil.copy(mpi_images["nompi"], image)
    try:
        p = doctor(user, site["config"], "--image", image)
    finally:
        if trusted:
            shutil.rmtree(trusted)
    _, checks = _report(p)
    assert checks["image.mount"]["status"] == "ok"
    assert checks["image.mount"]["details"]["mounted"] == ("kernel" if who == "root"
                                                           else "squashfuse_ll")
    c = checks["image.mpi"]
    assert c["status"] == "ok", c
    binds = [a for a in c["details"]["plan"]["actions"] if a["op"] == "bind"]
    assert any(os.path.basename(a["src"]).startswith("libmpich.so.12") for a in binds), binds


def test_open_mpi_image_is_refused_with_the_reason(site, test_user, mpi_images):
    if "openmpi" not in mpi_images:
        pytest.skip("Debian's libopenmpi3 is not installed")
    p = doctor(test_user.pw_name, site["config"], "--image", mpi_images["openmpi"])
    _, checks = _report(p)
    c = checks["image.mpi"]
    assert c["status"] == "warn", c
    assert "Open MPI (libmpi.so.40" in c["summary"]
    assert c["details"]["ok"] is False
    assert p.returncode == 0   # the image still runs, only not with --mpi


def test_missing_image_is_one_line(site, test_user):
    p = doctor(test_user.pw_name, site["config"], "--image", "no/such:image")
    _, checks = _report(p)
    assert checks["image.mount"]["status"] == "fail"
    assert p.returncode == 1


def test_bad_usage(site, test_user):
    p = subprocess.run([HPCC, "doctor", "--bogus"], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and p.stderr.startswith("hpcc: unknown argument --bogus")
    p = subprocess.run([HPCC, "doctor", "--help"], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "usage: hpcc doctor" in p.stdout


def test_mount_helper_installed_off_missing_not_setuid_or_another_store(test_user,
                                                                        mount_helper_site):
    """host.mount_helper runs the helper for real: it must be setuid root and read the
    launcher's site store."""
    site = mount_helper_site
    cfg_text = site.config.read_text()
    variants = site.base / "doctor"
    variants.mkdir(mode=0o755, exist_ok=True)
    plain = variants / "hpcc-mount-plain"
    shutil.copy(site.helper, plain)
    os.chmod(plain, 0o755)

    def config(name, helper=None, store=None):
        text = cfg_text
        if helper is not None:
            text = text.replace(f'mount_helper = "{site.helper}"', f'mount_helper = "{helper}"')
        if store is not None:
            text = text.replace(f'path = "{site.store}"', f'path = "{store}"')
        path = variants / f"{name}.toml"
        path.write_text(text)
        os.chmod(path, 0o644)
        return str(path)

    cases = {
        config("installed"): ("ok", f"reads the site store {site.store}"),
        config("off", helper=""): ("off", "launcher.mount_helper is off"),
        config("missing", helper=variants / "absent"): ("warn", "No such file or directory"),
        config("plain", helper=plain): ("warn", "is not setuid"),
        config("other", store=variants): ("warn", f"reads the site store {site.store} (from "
                                                  f"its own config), the launcher {variants}"),
    }
    for cfg, (status, words) in cases.items():
        doc, checks = _report(doctor(test_user.pw_name, cfg))
        c = checks["host.mount_helper"]
        assert c["status"] == status and words in c["summary"], (cfg, c)
        assert c["status"] == "ok" or c["status"] == "off" or c["fix"], c
