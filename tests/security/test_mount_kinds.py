"""Unprivileged launches of a site image: the kernel mount from the setuid mount helper
(libexec/hpcc-mount) and squashfuse_ll give the command the same (absent) powers; `hpcc -v`
says which mount a launch got and why; root launches keep their own loop mount.

The image is root's, in a site store whose every directory is root's (under /var/lib, not
/tmp), and holds what an image must not be able to use: a setuid-root program (the probe,
which reports its ids, no_new_privs, capabilities, and tries a device node of the image and a
remount) and a world-readable device node."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hpcc.testkit.busybox import busybox_tree
from tests.fixtures.mount_helper import no_loops_left

pytestmark = [pytest.mark.root]

@pytest.fixture(scope="module")
def site(test_user, mount_helper_site):
    for t in ("mksquashfs", "cc", "squashfuse_ll"):
        if not shutil.which(t):
            pytest.skip(f"{t} missing")
    base = mount_helper_site.base
    tree = base / "tree"
    busybox_tree(tree)
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o",
                    str(tree / "probe"), str(Path(__file__).parent / "mount_probe.c")],
                   check=True, capture_output=True, text=True)
    os.chmod(tree / "probe", 0o4755)
    os.mknod(tree / "node", 0o20666, os.makedev(1, 3))
    (tree / "hello").write_text("hello from the site image\n")
    image = mount_helper_site.store / "probe.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-all-root", "-quiet",
                    "-no-progress"], check=True, capture_output=True)
    os.chmod(image, 0o644)
    shutil.rmtree(tree)
    own = Path(tempfile.mkdtemp(prefix="hpcc-mount-kinds-user-"))
    os.chmod(own, 0o755)
    user_image = own / "mine.sqfs"
    shutil.copy(image, user_image)
    os.chown(user_image, test_user.pw_uid, test_user.pw_gid)

    def variant(name, helper):
        path = base / "etc" / f"{name}.toml"
        path.write_text(mount_helper_site.config.read_text().replace(
            f'mount_helper = "{mount_helper_site.helper}"', f'mount_helper = "{helper}"'))
        os.chmod(path, 0o644)
        return str(path)

    yield {"base": base, "image": image, "user_image": user_image,
           "with": str(mount_helper_site.config), "without": variant("off", ""),
           "missing": variant("missing", f"{base}/bin/absent"),
           "relative": variant("relative", "hpcc-mount")}
    image.unlink()
    shutil.rmtree(own)


@pytest.fixture
def helper_mounts(run_cli, site, test_user):
    """Skip where this kernel cannot give the helper's (id-mapped) squashfs mount."""
    p, how = hpcc(run_cli, site, "with", site["image"], "true", user=test_user.pw_name)
    if how and "cannot id-map" in how:
        pytest.skip(how)
    assert p.returncode == 0 and how == "(kernel, from the mount helper)", (how, p.stderr)


def hpcc(run_cli, site, config, image, *cmd, user=None):
    p = run_cli("hpcc", "-v", "run", image, *cmd, user=user,
                env={"HPCC_CONFIG": site[config], "XDG_RUNTIME_DIR": ""})
    mounted = [ln for ln in p.stderr.splitlines() if "image mounted" in ln]
    return p, (mounted[0].split("image mounted", 1)[1].strip() if mounted else None)


def test_hpcc_v_says_which_mount_and_why(run_cli, site, test_user, helper_mounts):
    u = test_user.pw_name
    cases = [
        ("with", site["image"], "(kernel, from the mount helper)"),
        ("without", site["image"], "(squashfuse_ll: launcher.mount_helper is off)"),
        ("missing", site["image"], f"(squashfuse_ll: mount helper {site['base']}/bin/absent: "
                                   "No such file or directory)"),
        ("with", site["user_image"], "(squashfuse_ll: not an image of the site store "),
        ("relative", site["image"], "(squashfuse_ll: launcher.mount_helper must be an "
                                    "absolute path, not 'hpcc-mount')"),
    ]
    for config, image, expect in cases:
        p, how = hpcc(run_cli, site, config, image, "cat", "/hello", user=u)
        assert p.returncode == 0, p.stderr
        assert p.stdout == "hello from the site image\n"
        assert how is not None and how.startswith(expect), (config, image, how)
    # the helper refusing: the site image writable by others
    os.chmod(site["image"], 0o666)
    try:
        p, how = hpcc(run_cli, site, "with", site["image"], "cat", "/hello", user=u)
    finally:
        os.chmod(site["image"], 0o644)
    assert p.returncode == 0 and p.stdout == "hello from the site image\n", p.stderr
    assert how.startswith("(squashfuse_ll: the mount helper refused: ") and \
        "writable only by its owner" in how, how
    # root launches (the Slurm path too) keep their own loop mount, never the helper's
    p, how = hpcc(run_cli, site, "with", site["image"], "cat", "/hello")
    assert p.returncode == 0 and how == "(kernel)", (how, p.stderr)
    assert no_loops_left(site["base"])


@pytest.mark.parametrize("config", ["with", "without"])
def test_command_has_no_privileges_in_either_mount_kind(run_cli, site, test_user, config,
                                                       helper_mounts):
    p, how = hpcc(run_cli, site, config, site["image"], "/probe", user=test_user.pw_name)
    assert p.returncode == 0, p.stderr
    assert ("kernel" in how) == (config == "with"), how
    out = dict(ln.split("=", 1) for ln in p.stdout.splitlines())
    uid = str(test_user.pw_uid)
    assert out["euid"] == uid and out["ruid"] == uid  # the image's setuid bit does nothing
    assert out["no_new_privs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(out[cap].strip(), 16) == 0, (cap, out[cap])
    assert out["device_node"] == "Permission denied"  # nodev
    assert out["remount_root"] == "Operation not permitted"
    assert out["setuid0"] in ("Operation not permitted", "Invalid argument")  # 0: unmapped
    assert no_loops_left(site["base"])  # the helper's loop device went with the container


def test_writable_and_named_containers_on_the_helpers_mount(run_cli, site, test_user,
                                                            helper_mounts):
    """The overlay copies the id-mapped kernel mount's files up as it does squashfuse_ll's
    (root's files are the user's in the setup namespace), and the image is unchanged."""
    u = test_user.pw_name
    before = site["image"].read_bytes()
    p, how = hpcc(run_cli, site, "with", "--writable", site["image"], "sh", "-c",
                  "echo changed >> /hello && cat /hello && echo new > /bin/new && cat /bin/new",
                  user=u)
    assert p.returncode == 0, p.stderr
    assert how == "(kernel, from the mount helper)"
    assert p.stdout == "hello from the site image\nchanged\nnew\n"
    name = f"mount-kinds-{os.getpid()}"
    try:
        p, how = hpcc(run_cli, site, "with", "--name", name, site["image"], "sh", "-c",
                      "echo kept > /kept", user=u)
        assert p.returncode == 0 and how == "(kernel, from the mount helper)", p.stderr
        p, _ = hpcc(run_cli, site, "with", "--name", name, site["image"], "cat", "/kept",
                    user=u)
        assert p.returncode == 0 and p.stdout == "kept\n", p.stderr
    finally:
        run_cli("hpcc", "containers", "rm", name, user=u,
                env={"HPCC_CONFIG": site["with"], "XDG_RUNTIME_DIR": ""})
    assert site["image"].read_bytes() == before
