"""Image selection rules of spank_hpcc.so: nested --container, user stores, oci.conf."""
import os
import subprocess
import time

import pytest

from tests.fixtures.slurm import busybox_tree, publish_tree

pytestmark = [pytest.mark.root, pytest.mark.slurm]

U1, U2 = "slurmuser1", "slurmuser2"


def test_container_option_beats_a_stale_slurm_container(slurm_cluster):
    # srun leaves an inherited SLURM_CONTAINER alone; the plugin asks the controller.
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/other:1", "cat",
                          "/etc/os-release", user=U1,
                          env={"SLURM_CONTAINER": "hpcctest/busybox:1"})
    assert p.returncode == 0, p.stderr
    assert 'NAME="hpcc other image"' in p.stdout
    # without --container the inherited value is the image (steps inherit the job's)
    p = slurm_cluster.run("srun", "-n1", "cat", "/etc/os-release", user=U1,
                          env={"SLURM_CONTAINER": "hpcctest/busybox:1"})
    assert 'NAME="hpcc test image"' in p.stdout, p.stderr


def test_nested_srun_in_an_allocation_uses_its_own_container(slurm_cluster):
    script = ("srun -n1 --container=hpcctest/busybox:1 grep ^NAME= /etc/os-release; "
              "srun -n1 --container=hpcctest/other:1 grep ^NAME= /etc/os-release")
    p = slurm_cluster.run("salloc", "-n1", "--container=hpcctest/busybox:1", "sh", "-c",
                          script, user=U1)
    if "use_interactive_step" in p.stderr:
        pytest.skip("salloc --container needs LaunchParameters=use_interactive_step")
    assert p.stdout.splitlines() == ['NAME="hpcc test image"', 'NAME="hpcc other image"'], \
        p.stdout + p.stderr


@pytest.fixture
def user_store_image(slurm_users, slurm_site):
    """An image in slurmuser2's own store (~/.local/share/hpcc/images), owned by them."""
    u = slurm_users[U2]
    root = os.path.join(u.pw_dir, ".local", "share", "hpcc", "images")
    tree = busybox_tree(slurm_site.root / "tree-mine",
                        os_release='NAME="slurmuser2 private image"\n')
    rec = publish_tree(root, tree, ["hpcctest/mine:1"])
    subprocess.run(["chown", "-R", f"{u.pw_uid}:{u.pw_gid}",
                    os.path.join(u.pw_dir, ".local")], check=True)
    subprocess.run(["chmod", "-R", "go-rwx", os.path.join(u.pw_dir, ".local")], check=True)
    yield rec
    subprocess.run(["rm", "-rf", os.path.join(u.pw_dir, ".local", "share", "hpcc")])


def _squashfuse_pids():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "squashfuse_ll":
                        out.append(int(d))
            except OSError:
                pass
    return out


def test_user_store_image_runs_for_its_owner_only(slurm_cluster, user_store_image):
    before = _squashfuse_pids()
    p = slurm_cluster.run("srun", "-n2", "--container=hpcctest/mine:1", "sh", "-c",
                          "grep ^NAME= /etc/os-release; grep ' / ' /proc/self/mounts | "
                          "cut -d' ' -f3", user=U2)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('NAME="slurmuser2 private image"') == 2
    # a user's own file is never given to the kernel's squashfs driver
    assert "overlay" in p.stdout
    deadline = time.monotonic() + 10
    while _squashfuse_pids() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _squashfuse_pids() == before, "the FUSE daemon outlived the step"
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/mine:1", "true", user=U1)
    assert p.returncode == 125
    assert "not found" in p.stderr


def test_oci_conf_on_the_site_is_reported_not_ignored(slurm_cluster):
    oci = slurm_cluster.conf.parent / "oci.conf"
    oci.write_text("RunTimeQuery=true\n")
    try:
        p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "true",
                              user=U1)
        assert "oci.conf" in p.stderr and "--container-image=hpcctest/busybox:1" in p.stderr, \
            p.stderr
        # --container-image still selects an hpcc image
        p = slurm_cluster.run("srun", "-n1", "--container-image=hpcctest/busybox:1", "cat",
                              "/etc/os-release", user=U1)
        assert 'NAME="hpcc test image"' in p.stdout, p.stderr
    finally:
        oci.unlink()


def test_misconfigured_helper_path_is_one_clear_line(slurm_site):
    import tempfile

    from hpcc.testkit.slurmcluster import SlurmCluster

    line = (f"required {slurm_site.plugin} python=/nonexistent/python3 "
            f"config={slurm_site.config}")
    c = SlurmCluster(tempfile.mkdtemp(dir=slurm_site.root), nodes=1, plugstack_lines=[line])
    c.start()
    try:
        p = c.run("srun", "-n2", "--container=hpcctest/busybox:1", "echo", "RAN", user=U1)
        assert p.returncode == 125
        assert "RAN" not in p.stdout
        assert "hpcc: cannot start the helper /nonexistent/python3" in p.stderr, p.stderr
        # steps without a container are not affected
        assert c.run("srun", "-n1", "true", user=U1).returncode == 0
    finally:
        c.stop()


def _one_served_step(cluster):
    """Run a container step and wait for the node's helper server; its pids."""
    p = cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "true", user=U1)
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + 20
    while not cluster.helper_server_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    servers = cluster.helper_server_pids()
    assert len(servers) == 1
    return servers


def test_per_node_helper_server_is_reused_and_replaced_when_gone(slurm_cluster):
    import signal

    servers = _one_served_step(slurm_cluster)
    # served steps work, and do not start more servers
    for _ in range(3):
        p = slurm_cluster.run("srun", "-n2", "--container=hpcctest/other:1", "grep", "-c",
                              "hpcc other", "/etc/os-release", user=U1)
        assert p.stdout.split() == ["1", "1"], p.stderr
    assert slurm_cluster.helper_server_pids() == servers
    # a dead server (stale socket left behind) costs nothing but a one-shot helper
    os.kill(servers[0], signal.SIGKILL)
    time.sleep(0.2)
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "cat",
                          "/etc/os-release", user=U1)
    assert 'NAME="hpcc test image"' in p.stdout, p.stderr
    # errors from a served step are the same one line
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/nothere:1", "true", user=U1)
    assert p.returncode == 125
    assert "hpcc: image 'hpcctest/nothere:1' not found in the store" in p.stderr


def test_helper_server_ends_when_any_installed_hpcc_file_changes(slurm_cluster):
    # The server's code stamp covers the whole installed package, not a list of files: a
    # change to a module the old list did not name (the batch-step code) retires it too.
    import hpcc.slurm.batch

    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "true", user=U1)
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + 20
    while not slurm_cluster.helper_server_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    servers = slurm_cluster.helper_server_pids()
    assert len(servers) == 1
    path = hpcc.slurm.batch.__file__
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        deadline = time.monotonic() + 10
        while slurm_cluster.helper_server_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm_cluster.helper_server_pids() == []
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    p = slurm_cluster.run("srun", "-n1", "--container=hpcctest/busybox:1", "true", user=U1)
    assert p.returncode == 0, p.stderr


def test_helper_server_serves_a_changed_site_config_at_once(slurm_cluster, slurm_site):
    # The server loads the config once and its steps check the file by stat: an admin's
    # edit (here a site bind) counts from the next step, with the server still running.
    servers = _one_served_step(slurm_cluster)
    src = slurm_site.root / "site-bind"
    src.mkdir(exist_ok=True)
    (src / "marker").write_text("from the site config\n")
    os.chmod(src, 0o755)
    os.chmod(src / "marker", 0o644)
    argv = ("srun", "-n1", "--container=hpcctest/busybox:1", "cat", "/mnt/site/marker")
    before = slurm_site.config.read_text()
    assert slurm_cluster.run(*argv, user=U1).returncode != 0  # no such bind yet
    try:
        slurm_site.config.write_text(before.replace(
            "[launcher]\n", f'[launcher]\nbinds = ["{src}:/mnt/site:ro"]\n'))
        p = slurm_cluster.run(*argv, user=U1)
        assert p.stdout == "from the site config\n", p.stderr
        assert slurm_cluster.helper_server_pids() == servers  # served, not a new helper
    finally:
        slurm_site.config.write_text(before)
    p = slurm_cluster.run(*argv, user=U1)
    assert p.returncode != 0 and "from the site config" not in p.stdout
