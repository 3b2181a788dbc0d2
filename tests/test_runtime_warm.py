"""Warming the page cache with the command's files from the freshly mounted image, in the
background (hpcc.runtime.warm).

The unit tests use a plain directory as the image root (the warming only reads through
open_in_root); the end-to-end tests launch real images (squashfuse_ll as the test user, the
kernel as root) and read what `hpcc -v` reports.
"""
import os
import shutil
import subprocess
import tempfile

import pytest

from hpcc.runtime import elf, warm
from tests.fixtures.launcher_images import run_hpcc

HOST_LS = shutil.which("ls") or "/bin/ls"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    for d in ("bin", "lib/x86_64-linux-gnu", "lib64", "etc"):
        (r / d).mkdir(parents=True)
    yield r


def _open(r):
    return os.open(r, os.O_PATH | os.O_DIRECTORY)


def test_elf_interpreter_and_needed_libraries_are_read_from_a_real_binary():
    fd = os.open(HOST_LS, os.O_RDONLY)
    try:
        interp, needed = elf.elf_deps(os.pread(fd, 64, 0), fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert interp and interp.startswith("/") and "ld-linux" in interp
    assert "libc.so.6" in needed


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\xff" * 58,
                                  b"\x7fELF\x01\x01" + bytes(58), b"#!/bin/sh\n", os.urandom(4096),
                                  # a header whose program table points past the end
                                  b"\x7fELF\x02\x01" + bytes(26) + (1 << 40).to_bytes(8, "little")
                                  + bytes(14) + (56).to_bytes(2, "little")
                                  + (3).to_bytes(2, "little") + bytes(6)])
def test_malformed_or_foreign_files_give_nothing_and_never_raise(tmp_path, data):
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        interp, needed = elf.elf_deps(data[:64], fd, len(data))
    finally:
        os.close(fd)
    assert (interp, needed) == (None, [])


def test_command_found_on_the_containers_path_inside_the_root(root):
    (root / "bin" / "tool").write_bytes(b"x" * 100)
    fd = _open(root)
    try:
        assert warm.command_path(fd, "tool", "/usr/bin:relative:/bin") == "/bin/tool"
        assert warm.command_path(fd, "missing", "/usr/bin:/bin") is None
        assert warm.command_path(fd, "/bin/tool", "") == "/bin/tool"
        assert warm.command_path(fd, "./tool", "/bin") is None  # relative to an unknown cwd
    finally:
        os.close(fd)


def test_program_interpreter_and_libraries_are_read_up_to_the_budget(root):
    # the host's ls with its loader and libraries, laid out as in a Debian image
    shutil.copy(HOST_LS, root / "bin" / "ls")
    fd = os.open(HOST_LS, os.O_RDONLY)
    interp, needed = elf.elf_deps(os.pread(fd, 64, 0), fd, os.fstat(fd).st_size)
    os.close(fd)
    shutil.copy(interp, root / interp.lstrip("/"))
    for name in needed:
        src = next(f"{d}/{name}" for d in warm.LIB_DIRS if os.path.exists(f"{d}/{name}"))
        shutil.copy(src, root / "lib/x86_64-linux-gnu" / name)
    rfd = _open(root)
    try:
        report = []
        total = warm.warm_files(rfd, ["/bin/ls"], 1 << 30, report)
        paths = [p for p, _ in report]
        assert paths[0] == interp  # the loader first: the kernel maps it first
        assert "/bin/ls" in paths
        assert {f"/lib/x86_64-linux-gnu/{n}" for n in needed} <= set(paths)
        assert total == sum(n for _, n in report) == sum(
            os.path.getsize(root / p.lstrip("/")) for p in paths)
        capped = []
        assert warm.warm_files(rfd, ["/bin/ls"], 5000, capped) == 5000
    finally:
        os.close(rfd)


def test_symlinks_in_the_image_never_lead_out_of_the_root(root, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    (root / "bin" / "evil").symlink_to(str(secret))               # absolute: stays inside
    (root / "bin" / "evil2").symlink_to("../../../../../" + str(secret))
    (root / "bin" / "script").write_bytes(b"#!" + str(secret).encode() + b"\n")
    rfd = _open(root)
    try:
        for prog in ("/bin/evil", "/bin/evil2", "/bin/script"):
            report = []
            warm.warm_files(rfd, [prog], 1 << 20, report)
            assert all(p != str(secret) or n == 0 for p, n in report), report
            assert sum(n for _, n in report) == (len(b"#!" + str(secret).encode() + b"\n")
                                                 if prog == "/bin/script" else 0)
    finally:
        os.close(rfd)


# --- end to end: unprivileged launches through squashfuse_ll ---------------------------

@pytest.fixture(params=["warm_mb", "prefetch_mb"])
def config_without_warming(launcher_env, request):
    """warm_mb = 0, or the key's old name, prefetch_mb = 0, which still works."""
    d = tempfile.mkdtemp(prefix="hpcc-warm-cfg-")
    os.chmod(d, 0o755)
    cfg = os.path.join(d, "hpcc.toml")
    with open(cfg, "w") as f:
        f.write(f'[launcher]\nhooks_dir = "{launcher_env["hooks_dir"]}"\n{request.param} = 0\n')
    os.chmod(cfg, 0o644)
    yield cfg
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_unprivileged_launch_warms_the_command(images, launcher_env, test_user):
    p = run_hpcc(["-v", "exec", images["base"], "true"], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stderr.splitlines() if "warmed" in x)
    assert "warmed 1 file(s)" in line and "/bin/true" in line, line
    if "still reading" not in line:  # `true` may exit before the whole file is read
        size = os.path.getsize(shutil.which("busybox") or "/bin/busybox")
        assert f"{size / 1e6:.1f} MB" in line, line


@pytest.mark.root
def test_a_script_warms_its_interpreter_and_a_missing_command_is_still_127(
        images, launcher_env, test_user):
    p = run_hpcc(["-v", "run", images["entry"]], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 0 and p.stdout == "entry:default cmd\n", p.stderr
    line = next(x for x in p.stderr.splitlines() if "warmed" in x)
    files = line.rsplit(": ", 1)[1].split(", ")
    assert files[0] == "/bin/sh", line              # the interpreter is read first
    if "still reading" not in line:  # the script may end first (a loaded machine)
        assert "/app/entry.sh" in files, line
    p = run_hpcc(["exec", images["base"], "no-such-command"], user=test_user.pw_name,
                 config=launcher_env["HPCC_CONFIG"])
    assert p.returncode == 127 and "not found" in p.stderr


@pytest.mark.root
def test_warming_for_kernel_mounts_too_and_off_in_the_config(images, launcher_env, test_user,
                                                              config_without_warming):
    # the kernel mounts only images reached through root-only directories (not /tmp's)
    site = tempfile.mkdtemp(dir="/run")
    try:
        os.chmod(site, 0o755)
        shutil.copy(images["base"], os.path.join(site, "base.sqfs"))
        p = run_hpcc(["-v", "exec", os.path.join(site, "base.sqfs"), "true"],
                     config=launcher_env["HPCC_CONFIG"])
    finally:
        shutil.rmtree(site)
    assert p.returncode == 0, p.stderr
    assert "(kernel)" in p.stderr and "warmed 1 file(s)" in p.stderr
    for user in (None, test_user.pw_name):
        p = run_hpcc(["-v", "exec", images["base"], "true"], user=user,
                     config=config_without_warming)
        assert p.returncode == 0, p.stderr
        assert "image mounted" in p.stderr and "warmed" not in p.stderr


@pytest.mark.root
def test_command_that_exits_while_the_warming_runs_is_reaped(images, launcher_env, test_user):
    # `false` exits at once while a large file is still being read: hpcc must still see the
    # command's exit (the warming thread takes no signals) and exit with its status
    for _ in range(5):
        p = run_hpcc(["exec", images["base"], "false"], user=test_user.pw_name,
                     config=launcher_env["HPCC_CONFIG"], timeout=30)
        assert p.returncode == 1, p.stderr
    out = subprocess.run(["pgrep", "-u", test_user.pw_name, "squashfuse_ll"],
                         capture_output=True, text=True)
    assert out.stdout == ""
