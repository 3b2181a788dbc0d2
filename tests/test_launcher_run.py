"""hpcc run/exec/shell end to end, privileged (root) and unprivileged (the test user).

Real squashfs images (mksquashfs of busybox-static), real namespaces, real squashfuse_ll and
kernel loop mounts.
"""
import os
import signal
import subprocess
import tempfile
import time

import pytest

from tests.fixtures.launcher_images import run_hpcc

pytestmark = pytest.mark.root


def hpcc(launcher_env, who, *args, **kw):
    return run_hpcc(args, user=who, config=launcher_env["HPCC_CONFIG"], **kw)


def test_run_prints_output_from_inside_the_image(images, launcher_env, who):
    p = hpcc(launcher_env, who, "run", images["base"], "--", "sh", "-c",
             "echo inside; test -x /bin/busybox && echo has-busybox")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "inside\nhas-busybox\n"


def test_exit_status_is_the_commands(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c", "exit 42")
    assert p.returncode == 42


def test_death_by_signal_gives_128_plus_n(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c", "kill -SEGV $$")
    assert p.returncode == 128 + signal.SIGSEGV


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_sent_to_hpcc_reaches_the_command(images, launcher_env, who, sig):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = launcher_env["HPCC_CONFIG"]
    script = (f"trap 'echo got-{sig.name}; exit 7' {sig.name[3:]}; echo ready; "
              "while true; do sleep 0.05; done")
    hp = os.path.join(os.path.dirname(__import__("sys").executable), "hpcc")
    proc = subprocess.Popen([hp, "exec", images["base"], "sh", "-c", script], env=env,
                            user=who, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd="/", start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == f"got-{sig.name}\n", err
    assert proc.returncode == 7


def test_command_not_found_is_127_and_not_executable_is_126(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["base"], "no-such-command")
    assert p.returncode == 127
    assert "no-such-command: command not found" in p.stderr
    p = hpcc(launcher_env, who, "exec", images["entry"], "/app/noexec.sh")
    assert p.returncode == 126
    assert "cannot execute /app/noexec.sh" in p.stderr


def test_failure_before_the_command_is_125_with_one_line(images, launcher_env, who, shared_dir):
    p = hpcc(launcher_env, who, "run", "/nonexistent/image.sqfs", "true")
    assert p.returncode == 125
    assert p.stderr.count("\n") == 1 and "does not exist" in p.stderr
    p = hpcc(launcher_env, who, "run", "--mount", "/nonexistent-src:/x", images["base"], "true")
    assert p.returncode == 125 and "Traceback" not in p.stderr
    notsqfs = os.path.join(shared_dir, "bad.sqfs")
    with open(notsqfs, "wb") as f:
        f.write(b"not a squashfs" * 100)
    os.chmod(notsqfs, 0o644)
    p = hpcc(launcher_env, who, "run", notsqfs, "true")
    assert p.returncode == 125 and "not a squashfs image" in p.stderr


def test_usage_errors_exit_2(images, launcher_env, who):
    p = hpcc(launcher_env, who, "run", "--bogus", images["base"])
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr
    p = hpcc(launcher_env, who, "run", "--mount", "/tmp:relative/x", images["base"], "true")
    assert p.returncode == 2 and "must be an absolute path" in p.stderr
    p = hpcc(launcher_env, who, "exec", images["base"])
    assert p.returncode == 2


def test_entrypoint_and_cmd_follow_docker(images, launcher_env, who):
    img = images["entry"]
    assert hpcc(launcher_env, who, "run", img).stdout == "entry:default cmd\n"
    assert hpcc(launcher_env, who, "run", img, "--", "a", "b").stdout == "entry:a b\n"
    p = hpcc(launcher_env, who, "run", "--entrypoint", "/bin/echo", img, "x")
    assert p.stdout == "x\n"
    # --entrypoint drops the image's CMD too
    p = hpcc(launcher_env, who, "run", "--entrypoint", "/bin/echo", img)
    assert p.stdout == "\n"
    # exec ignores the entrypoint
    assert hpcc(launcher_env, who, "exec", img, "echo", "plain").stdout == "plain\n"


def test_environment_precedence(images, launcher_env, who, shared_dir):
    envfile = os.path.join(shared_dir, "env")
    with open(envfile, "w") as f:
        f.write("# comment\nFROM_FILE=file\nOVR=file\n")
    os.chmod(envfile, 0o644)
    p = hpcc(launcher_env, who, "exec", "--env-file", envfile, "-e", "OVR=option",
             "-e", "HOSTVAR", images["entry"], "env",
             env={"TERM": "host-term", "SLURM_JOB_ID": "77", "PMI_RANK": "3",
                  "HOSTVAR": "fromhost", "SECRET_HOST_VAR": "x"})
    env = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert env["IMG_VAR"] == "image"            # image Env
    assert env["PATH"] == "/app:/bin:/usr/bin"  # image PATH replaces the default
    assert env["TERM"] == "host-term"           # passthrough beats the image
    assert env["SLURM_JOB_ID"] == "77" and env["PMI_RANK"] == "3"
    assert env["FROM_FILE"] == "file"
    assert env["OVR"] == "option"               # --env beats --env-file beats the image
    assert env["HOSTVAR"] == "fromhost"         # -e NAME takes the host's value
    assert "SECRET_HOST_VAR" not in env         # other host variables do not leak in
    assert env["HPCC_CONTAINER"] == "1"


def test_workdir_from_image_option_and_cwd(images, launcher_env, who, shared_dir):
    assert hpcc(launcher_env, who, "run", "--no-cwd", images["entry"], "--", "x").stdout \
        == "entry:x\n"
    p = hpcc(launcher_env, who, "exec", "--no-cwd", images["entry"], "pwd")
    assert p.stdout == "/app/data\n"
    p = hpcc(launcher_env, who, "exec", "-w", "/app", images["entry"], "pwd")
    assert p.stdout == "/app\n"
    # a workdir missing in the image is created (in the overlay, not in the image)
    p = hpcc(launcher_env, who, "exec", "-w", "/new/dir", images["entry"], "pwd")
    assert p.stdout == "/new/dir\n"
    # the current directory is bound and is the default workdir
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c", "pwd; ls", cwd=shared_dir)
    assert p.stdout.splitlines()[0] == shared_dir


def test_a_current_directory_the_user_cannot_read_is_not_bound(images, launcher_env, test_user):
    """A shell left in a directory its user cannot read (`su` from root's home): the default
    bind of the current directory is skipped with one line saying so, and the command starts
    where it would with --no-cwd, instead of the launch failing on a bind nobody asked for."""
    d = tempfile.mkdtemp(prefix="hpcc-rootonly-")       # root's, mode 0700
    try:
        p = hpcc(launcher_env, test_user.pw_name, "exec", images["entry"], "pwd", cwd=d)
        assert (p.returncode, p.stdout) == (0, "/app/data\n"), p.stderr
        assert p.stderr == f"hpcc: not binding the current directory {d}: you cannot read it\n"
        p = hpcc(launcher_env, test_user.pw_name, "exec", "-q", images["base"], "pwd", cwd=d)
        assert (p.returncode, p.stdout, p.stderr) == (0, "/\n", "")
        # root starting a container for the user (--user) decides by the user's rights too
        p = hpcc(launcher_env, None, "exec", "--user", test_user.pw_name, images["entry"], "pwd",
                 cwd=d)
        assert (p.returncode, p.stdout) == (0, "/app/data\n"), p.stderr
        assert p.stderr == f"hpcc: not binding the current directory {d}: you cannot read it\n"
        p = hpcc(launcher_env, None, "exec", images["base"], "pwd", cwd=d)   # root may
        assert (p.returncode, p.stdout, p.stderr) == (0, f"{d}\n", "")
    finally:
        os.rmdir(d)


def test_a_removed_current_directory_is_not_bound(images, launcher_env, who, test_user):
    """A shell whose directory was removed under it: one line says so and the command starts
    where --no-cwd would start it; a relative --mount source is then one line, exit 125."""
    d = tempfile.mkdtemp(prefix="hpcc-gone-")
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = launcher_env["HPCC_CONFIG"]
    hp = os.path.join(os.path.dirname(__import__("sys").executable), "hpcc")

    def in_removed_dir(*args):
        return subprocess.run(["sh", "-c", f'cd {d} && rmdir {d} && exec "$@"', "sh", hp,
                               *args], env=env, user=who, cwd="/", capture_output=True,
                              text=True, timeout=60)
    p = in_removed_dir("exec", images["entry"], "pwd")
    assert (p.returncode, p.stdout) == (0, "/app/data\n"), p.stderr
    assert p.stderr == "hpcc: not binding the current directory: it no longer exists\n"
    os.mkdir(d)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    p = in_removed_dir("exec", "--mount", "data:/data", images["base"], "true")
    assert p.returncode == 125 and "Traceback" not in p.stderr, p.stderr
    assert "mount source data is relative and the current directory no longer exists" \
        in p.stderr, p.stderr
    os.mkdir(d)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    p = in_removed_dir("exec", "./image.sqfs", "true")
    assert p.returncode == 125 and "Traceback" not in p.stderr, p.stderr
    assert "image file ./image.sqfs is a relative path and the current directory no longer " \
        "exists" in p.stderr, p.stderr


def test_binds_read_only_and_read_write(images, launcher_env, who, shared_dir):
    src = os.path.join(shared_dir, "data")
    os.mkdir(src)
    with open(os.path.join(src, "in.txt"), "w") as f:
        f.write("from host\n")
    os.chmod(src, 0o777)
    p = hpcc(launcher_env, who, "exec", "--mount", f"{src}:/data", images["base"], "sh", "-c",
             "cat /data/in.txt && echo written > /data/out.txt")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "from host\n"
    with open(os.path.join(src, "out.txt")) as f:
        assert f.read() == "written\n"
    p = hpcc(launcher_env, who, "exec", "--mount", f"{src}:/data:ro", images["base"], "sh",
             "-c", "cat /data/in.txt; echo x > /data/ro.txt")
    assert p.returncode != 0 and "Read-only file system" in p.stderr
    assert not os.path.exists(os.path.join(src, "ro.txt"))
    # a single file
    p = hpcc(launcher_env, who, "exec", "--mount", f"{src}/in.txt:/etc/motd:ro",
             images["base"], "cat", "/etc/motd")
    assert p.stdout == "from host\n"


def test_root_is_read_only_unless_writable_and_writes_are_discarded(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c", "echo x > /bin/new")
    assert p.returncode != 0 and "Read-only file system" in p.stderr
    p = hpcc(launcher_env, who, "exec", "--writable", images["base"], "sh", "-c",
             "echo x > /bin/new && cat /bin/new && rm /bin/busybox.x 2>/dev/null; echo ok")
    assert p.returncode == 0 and p.stdout == "x\nok\n"
    p = hpcc(launcher_env, who, "exec", "--writable", images["base"], "sh", "-c",
             "test -e /bin/new && echo leaked || echo fresh")
    assert p.stdout == "fresh\n"
    # /tmp is a tmpfs in both cases
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c",
             "echo t > /tmp/t && cat /tmp/t")
    assert p.stdout == "t\n"


def test_stdin_is_piped_without_a_tty(images, launcher_env, who):
    data = "".join(f"line {i}\n" for i in range(5000))
    p = hpcc(launcher_env, who, "exec", images["base"], "wc", "-l", input=data)
    assert p.stdout.strip() == "5000"


def test_identity_inside_is_the_user(images, launcher_env, who, test_user):
    p = hpcc(launcher_env, who, "exec", images["base"], "id")
    if who:
        u = test_user
        assert p.stdout.startswith(f"uid={u.pw_uid}({u.pw_name}) gid={u.pw_gid}")
    else:
        assert p.stdout.startswith("uid=0(root) gid=0(root)")
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c", "echo $HOME; echo $USER")
    home = test_user.pw_dir if who else "/root"
    name = who or "root"
    assert p.stdout.splitlines()[1] == name
    if who:
        assert p.stdout.splitlines()[0] == home


def test_root_runs_as_another_user_with_user_option(images, launcher_env, test_user):
    p = run_hpcc(["exec", "--user", test_user.pw_name, images["base"], "id"],
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"uid={test_user.pw_uid}({test_user.pw_name})")


def test_user_option_refused_for_unprivileged_callers(images, launcher_env, test_user):
    p = run_hpcc(["exec", "--user", "root", images["base"], "id"], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 2 and "root callers only" in p.stderr


def test_no_file_descriptor_of_hpcc_leaks_in(images, launcher_env, who):
    # ls opens the directory itself (one fd beyond 0-2): list with a shell glob instead
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c",
             "cd /proc/self/fd && echo *")
    assert p.returncode == 0, p.stderr
    # the shell's own fds: 0-2, plus the one it used for the glob, at most
    fds = sorted(int(x) for x in p.stdout.split())
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c",
             "for f in /proc/$$/fd/*; do readlink $f; done")
    assert "/dev/fuse" not in p.stdout and ".sqfs" not in p.stdout and "/run/hpcc" not in p.stdout


def test_pmi_fd_is_kept_open(images, launcher_env, who):
    r, w = os.pipe()
    os.set_inheritable(w, True)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env.update(HPCC_CONFIG=launcher_env["HPCC_CONFIG"], PMI_FD=str(w))
    hp = os.path.join(os.path.dirname(__import__("sys").executable), "hpcc")
    p = subprocess.run([hp, "exec", images["base"], "sh", "-c", f"echo pmi >&{w}"],
                       env=env, user=who, pass_fds=(w,), capture_output=True, text=True,
                       cwd="/", timeout=30)
    os.close(w)
    assert p.returncode == 0, p.stderr
    assert os.read(r, 100) == b"pmi\n"
    os.close(r)


def test_no_capabilities_and_no_new_privs(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", images["base"], "grep", "-E", "^(Cap|NoNewPrivs)",
             "/proc/self/status")
    fields = dict(line.split(":\t") for line in p.stdout.splitlines())
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[k], 16) == 0, (k, fields[k])
    assert fields["NoNewPrivs"].strip() == "1"


def test_no_host_path_reachable_after_pivot(images, launcher_env, who):
    p = hpcc(launcher_env, who, "exec", "--no-home", "--no-cwd", images["base"], "sh", "-c",
             "ls /; test -e /work && echo host-visible; cat /proc/1/root/etc/hostname 2>&1 |"
             " head -c 0; echo done")
    assert "host-visible" not in p.stdout
    top = set(p.stdout.split()) - {"done"}
    assert top <= {"bin", "dev", "etc", "proc", "root", "sys", "tmp", "home"}, top


def test_etc_passwd_and_group_have_the_user_and_image_is_unchanged(images, launcher_env, who,
                                                                  test_user):
    p = hpcc(launcher_env, who, "exec", images["base"], "sh", "-c",
             "cat /etc/passwd; echo ---; cat /etc/group")
    passwd, group = p.stdout.split("---\n")
    name = who or "root"
    assert any(line.startswith(f"{name}:x:") for line in passwd.splitlines())
    assert "nobody:x:65534" in passwd  # the image's other entries are kept
    out = subprocess.run(["unsquashfs", "-cat", images["base"], "etc/passwd"],
                         capture_output=True, text=True).stdout
    assert "hpcctest" not in out


def test_shell_starts_the_users_shell_or_bin_sh(images, launcher_env, who):
    p = hpcc(launcher_env, who, "shell", images["base"], input="echo from-shell $0\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("from-shell")


def test_privileged_mode_fuse_mounts_a_users_own_image(images, launcher_env, test_user,
                                                      shared_dir):
    # a file the user could have written is never handed to the kernel's squashfs driver
    import shutil
    mine = os.path.join(shared_dir, "mine.sqfs")
    shutil.copy(images["base"], mine)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    p = run_hpcc(["-v", "exec", mine, "echo", "ok"], config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    assert "(squashfuse_ll)" in p.stderr and p.stdout == "ok\n"
    # a root-owned copy reached only through root-owned directories is the site's own
    # (/tmp, where the test images are, is writable by everyone: not trusted for the kernel)
    import tempfile
    site = tempfile.mkdtemp(dir="/run")
    try:
        os.chmod(site, 0o755)
        shutil.copy(images["base"], os.path.join(site, "base.sqfs"))
        p = run_hpcc(["-v", "exec", os.path.join(site, "base.sqfs"), "echo", "ok"],
                     config=launcher_env["HPCC_CONFIG"])
        assert "(kernel)" in p.stderr
        p = run_hpcc(["-v", "exec", images["base"], "echo", "ok"],
                     config=launcher_env["HPCC_CONFIG"])
        assert "(squashfuse_ll)" in p.stderr
    finally:
        shutil.rmtree(site)


def test_time_to_launch_is_reported_with_verbose(images, launcher_env, who):
    t = time.monotonic()
    p = hpcc(launcher_env, who, "-v", "exec", images["base"], "true")
    assert p.returncode == 0
    assert "image mounted" in p.stderr and "root assembled" in p.stderr
    assert time.monotonic() - t < 10


def test_terminal_passes_through(images, launcher_env, who):
    """Under a pseudo-terminal (script(1)), the command sees the same terminal."""
    hp = os.path.join(os.path.dirname(__import__("sys").executable), "hpcc")
    inner = f"{hp} exec {images['base']} sh -c 'tty; test -t 0 && test -t 1 && echo is-a-tty'"
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["HPCC_CONFIG"] = launcher_env["HPCC_CONFIG"]
    p = subprocess.run(["script", "-qec", inner, "/dev/null"], user=who, env=env, cwd="/",
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines()]
    assert lines[0].startswith("/dev/pts/") and "is-a-tty" in lines


@pytest.fixture(scope="module")
def site_store(images):
    """A site store holding the ENTRYPOINT image as example.org/demo/entry:1 (published
    with hpcc.store's API, as the gateway does)."""
    import hashlib
    import shutil
    import tempfile

    from hpcc.reference import parse_reference
    from hpcc.store import Store
    d = tempfile.mkdtemp(prefix="hpcc-launcher-store-")
    os.chmod(d, 0o755)
    store = Store(os.path.join(d, "site"), create=True)
    with open(images["entry"], "rb") as f:
        digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    tmp = store.temp_path(digest, ".sqfs")
    shutil.copy(images["entry"], tmp)
    import json
    with open(images["entry"][:-5] + ".json") as f:
        meta = json.load(f)
    with store.lock(digest):
        store.publish(digest, tmp, meta, refs=[parse_reference("example.org/demo/entry:1")])
    cfg = os.path.join(d, "hpcc.toml")
    with open(cfg, "w") as f:
        f.write(f'[store]\npath = "{d}/site"\nuser_path = "{d}/user-$USER"\n'
                f'[launcher]\nhooks_dir = "{d}/no-hooks"\n')
    os.chmod(cfg, 0o644)
    yield {"config": cfg, "digest": digest}
    shutil.rmtree(d, ignore_errors=True)


def test_store_reference_and_digest_resolve(site_store, who):
    p = run_hpcc(["run", "example.org/demo/entry:1", "--", "from-store"], user=who,
                 config=site_store["config"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == "entry:from-store\n"
    p = run_hpcc(["exec", site_store["digest"], "cat", "/app/data/hello.txt"], user=who,
                 config=site_store["config"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello from the image\n"
    p = run_hpcc(["run", "example.org/demo/entry:2"], user=who, config=site_store["config"])
    assert p.returncode == 125 and "hpcc pull example.org/demo/entry:2" in p.stderr
