"""The test kit itself (hpcc.testkit) is checked against independent
real tools: skopeo reads what we push and the archives we write; umoci unpacks our OCI
layout; tarfile reads our layers back."""
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from hpcc.testkit.busybox import BASE_ETC, busybox_image, busybox_tree, squash
from hpcc.testkit.images import (
    ImageBuilder,
    capability_xattr,
    chardev,
    directory,
    fifo,
    file,
    hardlink,
    image_index,
    opaque,
    raw,
    simple_image,
    symlink,
    whiteout,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)

skopeo = shutil.which("skopeo")
umoci = shutil.which("umoci")


def _skopeo_inspect(*args):
    p = subprocess.run([skopeo, "inspect", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_busybox_image_layers():
    img = busybox_image()
    assert len(img.layers) == 2
    with tarfile.open(fileobj=io.BytesIO(img.layers[0].tar)) as tf:
        names = {m.name: m for m in tf.getmembers()}
    assert names["bin/busybox"].isreg() and names["bin/busybox"].mode == 0o755
    assert names["bin/sh"].issym() and names["bin/sh"].linkname == "busybox"
    assert names["bin/env"].islnk() and names["bin/env"].linkname == "bin/busybox"
    assert "etc/motd" in names and names["tmp"].mode == 0o1777
    with tarfile.open(fileobj=io.BytesIO(img.layers[1].tar)) as tf:
        top = set(tf.getnames())
    assert {"app/hello.sh", "etc/.wh.motd"} <= top
    cfg = img.config["config"]
    assert cfg["Cmd"] == ["/bin/sh"] and cfg["Env"][0].startswith("PATH=")
    assert img.config["rootfs"]["diff_ids"] == [lay.diff_id for lay in img.layers]


def test_hostile_and_special_entries_are_written_verbatim():
    evil = tarfile.TarInfo("../escape")
    evil.size = 0
    absolute = tarfile.TarInfo("/etc/shadow")
    setuid = tarfile.TarInfo("bin/su")
    setuid.mode = 0o4755
    entries = [directory("d"), file("d/f", b"data", 0o600, uid=1000, gid=1000),
               symlink("d/link", "/etc/passwd"), hardlink("d/hard", "d/f"),
               fifo("d/fifo"), chardev("d/null", 1, 3), whiteout("old/file"), opaque("d"),
               raw(evil), raw(absolute, b"root::0:"), raw(setuid, b"\x7fELF"),
               capability_xattr("bin/ping", b"\x7fELF")]
    img = ImageBuilder(oci=True).layer(entries, compression="zstd").build()
    with tarfile.open(fileobj=io.BytesIO(img.layers[0].tar)) as tf:
        m = {x.name: x for x in tf.getmembers()}
    assert m["d/f"].uid == 1000 and m["d/f"].mode == 0o600
    assert m["d/link"].linkname == "/etc/passwd" and m["d/hard"].islnk()
    assert m["d/fifo"].isfifo() and m["d/null"].ischr() and m["d/null"].devminor == 3
    assert "old/.wh.file" in m and "d/.wh..wh..opq" in m
    assert "../escape" in m and "/etc/shadow" in m
    assert m["bin/su"].mode == 0o4755
    assert "SCHILY.xattr.security.capability" in m["bin/ping"].pax_headers


@pytest.mark.skipif(not skopeo, reason="skopeo is not installed")
def test_pushed_index_is_readable_by_skopeo(registry):
    imgs = [simple_image("a", architecture="amd64", oci=True),
            simple_image("b", architecture="arm64", oci=True)]
    index = image_index(imgs, oci=True)
    registry.push("testing/skopeo", "multi", index)
    info = _skopeo_inspect("--tls-verify=false", "--override-arch", "arm64",
                           f"docker://{registry.ref('testing/skopeo', 'multi')}")
    assert info["Digest"] == index.digest          # skopeo reports the top-level digest
    assert info["Architecture"] == "arm64"
    assert info["Layers"] == [lay.digest for lay in imgs[1].layers]


@pytest.mark.skipif(not skopeo, reason="skopeo is not installed")
def test_archives_are_readable_by_skopeo(tmp_path):
    img = busybox_image(oci=True)
    write_oci_layout(tmp_path / "layout", img, tag="demo")
    info = _skopeo_inspect(f"oci:{tmp_path / 'layout'}:demo")
    assert info["Digest"] == img.digest and info["Env"][0].startswith("PATH=")
    write_oci_archive(tmp_path / "img.oci.tar", img, tag="demo")
    info = _skopeo_inspect(f"oci-archive:{tmp_path / 'img.oci.tar'}:demo")
    assert info["Layers"] == [lay.digest for lay in img.layers]
    docker_img = busybox_image()
    write_docker_archive(tmp_path / "img.docker.tar", docker_img, "hpcc/busybox:demo")
    info = _skopeo_inspect(f"docker-archive:{tmp_path / 'img.docker.tar'}")
    assert info["Labels"]["org.opencontainers.image.title"] == "hpcc busybox demo"
    assert len(info["Layers"]) == 2


@pytest.mark.skipif(not umoci, reason="umoci is not installed")
def test_oci_layout_unpacks_with_umoci(tmp_path):
    img = busybox_image(oci=True)
    write_oci_layout(tmp_path / "layout", img, tag="demo")
    p = subprocess.run([umoci, "raw", "unpack", "--rootless", "--image",
                        f"{tmp_path / 'layout'}:demo", str(tmp_path / "rootfs")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    root = tmp_path / "rootfs"
    assert (root / "bin" / "busybox").stat().st_size > 100000
    assert (root / "bin" / "sh").is_symlink()
    assert (root / "app" / "hello.sh").exists()
    assert not (root / "etc" / "motd").exists()          # removed by the whiteout
    out = subprocess.run([str(root / "bin" / "busybox"), "cat", str(root / "etc/os-release")],
                         capture_output=True, text=True)
    assert "hpcc busybox" in out.stdout


def test_busybox_tree_squashes_to_a_runnable_root(tmp_path):
    tree = busybox_tree(tmp_path / "root", os_release="NAME=kit\n", files={"app/x": b"\0x"},
                        extra_dirs=("work",))
    assert os.stat(tree / "tmp").st_mode & 0o7777 == 0o1777
    out = squash(tree, tmp_path / "img.sqfs")
    listing = subprocess.run(["unsquashfs", "-lls", str(out)], capture_output=True, text=True,
                             check=True).stdout
    for name in ("bin/busybox", "bin/sh -> busybox", "etc/passwd", "etc/os-release", "app/x",
                 "work", "proc"):
        assert f"squashfs-root/{name}" in listing, name
    assert "root/root" in listing.splitlines()[-1]    # -all-root
    text = subprocess.run(["unsquashfs", "-cat", str(out), "etc/passwd"], capture_output=True,
                          text=True, check=True).stdout
    assert text == BASE_ETC["etc/passwd"]
