"""Named containers (`hpcc run --name NAME[:FLAG]`, `hpcc containers`) and `--save PATH`:
rootless, as root, and as root for another user. Real images, namespaces and squashfs.
"""
import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from tests.fixtures.launcher_images import _hpcc_path, make_image, pwd_gid, run_hpcc

pytestmark = pytest.mark.root


@pytest.fixture
def cfg(launcher_env):
    """A config whose root-owned containers_dir is private to this test."""
    d = tempfile.mkdtemp(prefix="hpcc-named-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "hpcc.toml")
    with open(path, "w") as f:
        f.write(f'[launcher]\nhooks_dir = "{launcher_env["hooks_dir"]}"\nbinds = []\n'
                f'containers_dir = "{d}/containers"\n')
    os.chmod(path, 0o644)
    yield {"config": path, "dir": d, "containers": f"{d}/containers"}
    subprocess.run(["rm", "-rf", d])


@pytest.fixture(scope="module")
def site_base(images):
    """images["base"] where root's launches kernel-mount it (a root-only directory chain):
    the image's files are then idmapped to the user of a writable container."""
    d = tempfile.mkdtemp(prefix="hpcc-site-img-", dir="/run")
    os.chmod(d, 0o755)
    shutil.copy(images["base"], os.path.join(d, "base.sqfs"))
    yield os.path.join(d, "base.sqfs")
    shutil.rmtree(d, ignore_errors=True)


def hpcc(cfg, who, *args, **kw):
    env = kw.pop("env", {})
    if who:  # the user's own named containers live under their XDG_RUNTIME_DIR
        env = {"XDG_RUNTIME_DIR": cfg["dir"] + "/xdg-" + who, **env}
    return run_hpcc(args, user=who, config=cfg["config"], env=env, **kw)


@pytest.fixture
def xdg(cfg, test_user):
    d = cfg["dir"] + "/xdg-" + test_user.pw_name
    os.mkdir(d, 0o700)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def test_named_container_keeps_its_writable_layer_across_runs(images, cfg, who, xdg):
    p = hpcc(cfg, who, "run", "--name", "work", images["base"], "--", "sh", "-c",
             "echo installed > /opt-tool; mkdir -p /usr/local/lib && echo lib > "
             "/usr/local/lib/x; rm /bin/vi")
    assert p.returncode == 0, p.stderr
    p = hpcc(cfg, who, "run", "--name", "work", images["base"], "--", "sh", "-c",
             "cat /opt-tool /usr/local/lib/x; test -e /bin/vi || echo vi-gone")
    assert (p.returncode, p.stdout) == (0, "installed\nlib\nvi-gone\n"), p.stderr
    # an unnamed container of the same image sees none of it
    p = hpcc(cfg, who, "run", images["base"], "--", "sh", "-c", "test -e /opt-tool || echo clean")
    assert p.stdout == "clean\n"
    p = hpcc(cfg, who, "containers", "--json")
    assert p.returncode == 0, p.stderr
    import json
    listed = json.loads(p.stdout)
    assert [(c["name"], c["running"], c["sqfs"]) for c in listed] == \
        [("work", False, images["base"])]
    p = hpcc(cfg, who, "containers", "rm", "work")
    assert p.returncode == 0, p.stderr
    assert json.loads(hpcc(cfg, who, "containers", "--json").stdout) == []
    p = hpcc(cfg, who, "containers", "rm", "work")
    assert p.returncode == 1 and "no container named 'work'" in p.stderr


def test_create_and_exec_flags_refuse_in_one_line(images, cfg, who, xdg):
    assert hpcc(cfg, who, "run", "--name", "c:create", images["base"], "true").returncode == 0
    p = hpcc(cfg, who, "run", "--name", "c:create", images["base"], "true")
    assert p.returncode == 125 and "already exists" in p.stderr
    assert p.stderr.count("\n") == 1
    p = hpcc(cfg, who, "run", "--name", "c:exec", images["base"], "true")
    assert p.returncode == 125 and "is not running" in p.stderr
    assert p.stderr.count("\n") == 1


def _start_background(cfg, who, image, script):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = cfg["config"]
    if who:
        env["XDG_RUNTIME_DIR"] = cfg["dir"] + "/xdg-" + who
    proc = subprocess.Popen([_hpcc_path(), "run", "--name", "live", image, "--", "sh", "-c",
                             script], env=env, user=who, group=pwd_gid(who) if who else None,
                            extra_groups=[] if who else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_exec_attaches_to_the_running_container(images, cfg, who, xdg):
    """A second launch with NAME:exec (or the default flag) joins the running container:
    it sees its tmpfs /tmp, not only its layer; no_exec refuses while it runs."""
    proc = _start_background(cfg, who, images["base"],
                             "echo shared > /tmp/only-in-this-tmpfs; echo ready; sleep 30")
    try:
        for flag in (":exec", ""):
            p = hpcc(cfg, who, "run", "--name", "live" + flag, images["base"], "--", "cat",
                     "/tmp/only-in-this-tmpfs")
            assert (p.returncode, p.stdout) == (0, "shared\n"), p.stderr
        p = hpcc(cfg, who, "run", "--name", "live:no_exec", images["base"], "true")
        assert p.returncode == 125 and "in use by a running launch" in p.stderr
        listed = hpcc(cfg, who, "containers").stdout
        assert "live" in listed and "running" in listed
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    p = hpcc(cfg, who, "run", "--name", "live:exec", images["base"], "true")
    assert p.returncode == 125 and "is not running" in p.stderr


def test_root_keeps_named_state_in_a_root_only_directory(site_base, cfg, test_user):
    """As root for a user: every directory above the layer is root's (0700); the user's
    files are theirs only inside the layer; the user may write anywhere in the container."""
    u = test_user
    p = hpcc(cfg, None, "run", "--user", u.pw_name, "--name", "job", site_base, "--",
             "sh", "-c", "touch /made-by-user && id -u")
    assert (p.returncode, p.stdout) == (0, f"{u.pw_uid}\n"), p.stderr
    base = cfg["containers"]
    for d in (base, f"{base}/user-{u.pw_uid}", f"{base}/user-{u.pw_uid}/job"):
        st = os.lstat(d)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), d
    made = os.lstat(f"{base}/user-{u.pw_uid}/job/upper/made-by-user")
    assert made.st_uid == u.pw_uid


@pytest.mark.parametrize("attack", ["user_writable", "symlink"])
def test_root_refuses_a_containers_dir_the_user_controls(images, cfg, test_user, attack):
    base = cfg["containers"]
    if attack == "user_writable":
        os.mkdir(base, 0o755)
        os.chown(base, test_user.pw_uid, test_user.pw_gid)
    else:
        target = tempfile.mkdtemp(prefix="hpcc-named-target-")
        os.symlink(target, base)
    p = hpcc(cfg, None, "run", "--user", test_user.pw_name, "--name", "x", images["base"],
             "true")
    assert p.returncode == 125 and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr
    if attack == "symlink":
        assert os.listdir(target) == []  # nothing created through the link
        os.rmdir(target)


def test_remove_job_removes_only_that_jobs_containers(images, cfg, test_user):
    """What the Slurm side calls at the end of a job (scope "job")."""
    import json as _json
    code = ("import json, sys; from hpcc.runtime.named import open_named; "
            "from hpcc.runtime.named_admin import remove_job; "
            "from hpcc.image import local_image; "
            f"cfg = {{'launcher': {{'containers_dir': {cfg['containers']!r}}}}}; "
            "img = local_image(sys.argv[1]); "
            "[open_named(n, image=img, privileged=True, uid=1001, job=j, config=cfg).close() "
            " for n, j in (('a', 7), ('b', 7), ('a', 8))]; "
            "print(json.dumps(remove_job(7, cfg)))")
    import sys
    p = subprocess.run([sys.executable, "-c", code, images["base"]], capture_output=True,
                       text=True, cwd="/")
    assert p.returncode == 0, p.stderr
    assert _json.loads(p.stdout) == 1
    assert sorted(os.listdir(cfg["containers"])) == ["job-8-u1001"]


def test_save_writes_an_image_of_the_container(images, cfg, who, shared_dir):
    out = os.path.join(shared_dir, "saved.sqfs")
    p = hpcc(cfg, who, "run", "--writable", "--save", out, images["base"], "--", "sh", "-c",
             "echo kept > /kept; mkdir -p /opt/a && echo b > /opt/a/b; rm /bin/vi; "
             "echo not-saved > /tmp/in-tmpfs", cwd=shared_dir)
    assert p.returncode == 0, p.stderr
    st = os.stat(out)
    assert st.st_uid == (_uid(who) if who else 0)
    assert [n for n in os.listdir(shared_dir) if "hpcc-save" in n] == []
    p = hpcc(cfg, who, "run", out, "--", "sh", "-c",
             "cat /kept /opt/a/b; test -e /bin/vi || echo vi-gone; "
             "test -e /tmp/in-tmpfs || echo tmp-clean; stat -c %u /kept", cwd=shared_dir)
    inside = _uid(who) if who else 0
    assert (p.returncode, p.stdout) == (0, f"kept\nb\nvi-gone\ntmp-clean\n{inside}\n"), p.stderr


def _uid(who):
    import pwd
    return pwd.getpwnam(who).pw_uid


def test_save_as_root_for_a_user_writes_as_the_user(site_base, cfg, test_user, shared_dir):
    """Root never writes into a path the user chose: the image is written with the user's
    rights (a directory only root may write is refused), owned by the user."""
    u = test_user
    out = os.path.join(shared_dir, "mine.sqfs")
    p = hpcc(cfg, None, "run", "--user", u.pw_name, "--writable", "--save", out,
             site_base, "--", "sh", "-c", "echo x > /x")
    assert p.returncode == 0, p.stderr
    assert os.stat(out).st_uid == u.pw_uid
    rootonly = tempfile.mkdtemp(prefix="hpcc-rootonly-")
    os.chmod(rootonly, 0o755)
    try:
        p = hpcc(cfg, None, "run", "--user", u.pw_name, "--writable", "--save",
                 f"{rootonly}/x.sqfs", site_base, "--", "true")
        assert p.returncode == 125 and "Permission denied" in p.stderr, p.stderr
        assert os.listdir(rootonly) == []
    finally:
        os.rmdir(rootonly)


@pytest.fixture(scope="module")
def secret_image():
    d = tempfile.mkdtemp(prefix="hpcc-secret-img-")
    os.chmod(d, 0o755)

    def tweak(tree):
        with open(os.path.join(tree, "secret"), "w") as f:
            f.write("root only\n")
        os.chmod(os.path.join(tree, "secret"), 0o600)

    yield make_image(d, "secret", tweak)
    subprocess.run(["rm", "-rf", d])


def test_save_failure_leaves_nothing_and_says_why(images, secret_image, cfg, test_user,
                                                  shared_dir):
    """A file the user may not read (a read-only container of a site image run by root for
    the user: /secret is root's, mode 0600) stops the save: one line, no file, no
    temporary; the command's own status was 0, the launch's is 125."""
    out = os.path.join(shared_dir, "fail.sqfs")
    p = hpcc(cfg, None, "run", "--user", test_user.pw_name, "--save", out, secret_image,
             "--", "true")
    assert p.returncode == 125, p.stderr
    assert "cannot save /secret: Permission denied" in p.stderr
    assert p.stderr.count("\n") == 1
    assert os.listdir(shared_dir) == []
    p = hpcc(cfg, None, "run", "--save", shared_dir, images["base"], "true")
    assert p.returncode == 125 and "is a directory" in p.stderr


def test_a_named_layer_is_as_hostile_as_an_image(site_base, cfg, test_user, shared_dir):
    """What the user left in a named container's layer (here: /etc/passwd and /etc/hosts
    as symlinks to host files, /tmp as a symlink out of the root) is what root's next
    launch builds on: the files hpcc writes replace the links, mounts stay inside the
    root, and the host's files are untouched."""
    import hashlib

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    before = {p: digest(p) for p in ("/etc/shadow", "/etc/hosts")}
    u = test_user.pw_name
    p = hpcc(cfg, None, "run", "--user", u, "--name", "evil", site_base, "--", "sh", "-c",
             "ln -sf ../../../../../etc/shadow /etc/passwd && ln -sf /../../etc/hosts "
             "/etc/hosts && ls -l /etc/passwd", cwd=shared_dir)
    assert p.returncode == 0, p.stderr
    assert "->" in p.stdout  # the link is in the layer
    p = hpcc(cfg, None, "run", "--user", u, "--name", "evil", site_base, "--", "sh", "-c",
             "test -L /etc/passwd && echo LINK; grep -c '^" + u + ":' /etc/passwd; "
             "echo appended >> /etc/hosts", cwd=shared_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1"]  # a regular file again, with the user's entry
    assert {path: digest(path) for path in before} == before
