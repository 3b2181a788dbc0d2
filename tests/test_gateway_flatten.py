"""One-pass flattening: layer semantics, equality with `umoci unpack` + `mksquashfs`, and
hostile layers. The squashfs files are checked by mounting them for real."""
import os
import subprocess
import tarfile

import pytest

from hpcc.errors import ImageError
from hpcc.gateway.flatten import Flattener
from hpcc.gateway.layersource import LayerSource
from hpcc.squashfs import SquashfsReader, SquashfsWriter
from hpcc.testkit.busybox import busybox_image
from hpcc.testkit.images import (
    ImageBuilder,
    blockdev,
    capability_xattr,
    chardev,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    raw,
    symlink,
    whiteout,
    write_oci_layout,
)
from tests.sqfstree import diff, have, mounted, snapshot

root_only = pytest.mark.root
MTIME = 1_600_000_000


def convert(image, tmp_path, name="ours.sqfs", compressor="zstd", **opts):
    """Flatten a built image's layers (blobs written to files) into a squashfs."""
    d = tmp_path / f"{name}.layers"
    d.mkdir(exist_ok=True)
    sources = []
    for i, lay in enumerate(image.layers):
        p = d / f"{i}.blob"
        p.write_bytes(lay.blob)
        sources.append(LayerSource(p, lay.compression, lay.digest))
    out = tmp_path / name
    with SquashfsWriter(str(out), compressor=compressor, block_size=131072, workers=2) as w:
        fl = Flattener(w, default_mtime=MTIME, **opts)
        fl.add_layers(sources)
        w.finish(fl.root)
    return out, fl.report


def reader_tree(sqfs):
    with SquashfsReader(str(sqfs)) as r:
        return {e.path.strip("/"): e for e in r.walk()}


def content(sqfs, path):
    with SquashfsReader(str(sqfs)) as r:
        return r.read_file(path)


def layered_image(compression="gzip", oci=True):
    """Whiteouts, an opaque dir, a dir replaced by a file and vice versa, hard links,
    symlinks, odd modes and owners, a metadata-only change of a directory."""
    t = MTIME
    l1 = [
        directory("a", 0o755, mtime=t), directory("a/b", 0o700, 1000, 1000, mtime=t + 1),
        file("a/file1", b"one\n", 0o644, mtime=t),
        file("a/b/deep", b"deep" * 1000, 0o600, 1000, 1000, mtime=t),
        file("a/keep", b"keep\n", 0o640, 0, 50, mtime=t + 2),
        hardlink("a/keep-link", "a/keep", mtime=t + 2),
        directory("x", mtime=t), file("x/old1", b"old", mtime=t), directory("x/sub", mtime=t),
        file("x/sub/old2", b"old2", mtime=t),
        directory("r", mtime=t), file("r/child", b"c", mtime=t),
        file("f", b"file becomes dir", mtime=t),
        symlink("s", "a/file1", mtime=t), symlink("abs", "/etc/passwd", mtime=t),
        fifo("pipe", 0o600),
        file("big", os.urandom(300_000), 0o755, mtime=t),
        file("dup1", b"D" * 200_000, mtime=t), file("dup2", b"D" * 200_000, mtime=t),
        file("empty", b"", mtime=t),
        directory("meta", 0o755, mtime=t), file("meta/f", b"m", mtime=t),
    ]
    l2 = [
        directory("a", 0o755, mtime=t + 10), whiteout("a/file1"),
        directory("x", 0o750, mtime=t + 10), opaque("x"), file("x/new", b"new\n", mtime=t + 10),
        file("r", b"dir became file", mtime=t + 10),
        directory("f", mtime=t + 10), file("f/inside", b"in", mtime=t + 10),
        directory("meta", 0o711, 5, 5, mtime=t + 11),
        file("b1", b"hard", 0o644, mtime=t + 12), hardlink("b2", "b1", mtime=t + 12),
    ]
    l3 = [
        directory("a", 0o755, mtime=t + 20), file("a/file1", b"back again\n", mtime=t + 20),
        whiteout("s"), directory("s", mtime=t + 20), file("s/now-a-dir", b"!", mtime=t + 20),
        whiteout("pipe"),
    ]
    return (ImageBuilder(oci=oci).layer(l1, compression).layer(l2, compression)
            .layer(l3, compression).cmd(["/bin/sh"]).build())


# ---- semantics, checked with the reader ----------------------------------------------

def test_whiteouts_opaque_dirs_and_replacements(tmp_path):
    sqfs, report = convert(layered_image(), tmp_path)
    t = reader_tree(sqfs)
    assert "a/file1" in t and content(sqfs, "a/file1") == b"back again\n"
    assert "x/old1" not in t and "x/sub" not in t and "x/new" in t
    assert t["x"].mode & 0o7777 == 0o750
    assert t["r"].type == "file" and "r/child" not in t
    assert t["f"].type == "dir" and "f/inside" in t
    assert t["s"].type == "dir" and "s/now-a-dir" in t
    assert "pipe" not in t
    assert (t["meta"].mode & 0o7777, t["meta"].uid, t["meta"].gid) == (0o711, 5, 5)
    assert "meta/f" in t
    assert t["a/keep"].inode_number == t["a/keep-link"].inode_number
    assert t["a/keep"].nlink == 2
    assert t["b1"].inode_number == t["b2"].inode_number
    assert t["a/b/deep"].uid == 1000 and t["a/b"].mode & 0o7777 == 0o700
    assert report.shadowed > 0


def test_zstd_image_gives_the_same_tree_as_its_gzip_twin(tmp_path):
    gz, _ = convert(layered_image("gzip"), tmp_path, "gz.sqfs")
    zs, _ = convert(layered_image("zstd"), tmp_path, "zs.sqfs")
    none, _ = convert(layered_image("none"), tmp_path, "none.sqfs")

    def norm(sqfs):
        return {p: (e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.target, e.nlink)
                for p, e in reader_tree(sqfs).items()}

    assert norm(gz) == norm(zs) == norm(none)


def test_mixed_gzip_and_zstd_layers(tmp_path):
    img = (ImageBuilder(oci=True)
           .layer([file("a", b"1"), file("b", b"2")], "gzip")
           .layer([whiteout("a"), file("c", b"3")], "zstd")
           .layer([file("d", b"4")], "none").build())
    t = reader_tree(convert(img, tmp_path)[0])
    assert {"b", "c", "d"} <= set(t) and "a" not in t


def test_whiteout_applies_only_to_lower_layers(tmp_path):
    img = ImageBuilder(oci=True).layer([file("k", b"lower")]).layer(
        [file("k", b"same layer"), whiteout("k"), directory("o"), file("o/x", b"x"),
         opaque("o")]).layer([]).build()
    sqfs, _ = convert(img, tmp_path)
    assert content(sqfs, "k") == b"same layer"
    assert "o/x" in reader_tree(sqfs)


def test_later_entry_in_one_layer_replaces_earlier(tmp_path):
    img = ImageBuilder(oci=True).layer([file("f", b"first"), file("f", b"second")]).build()
    sqfs, _ = convert(img, tmp_path)
    assert content(sqfs, "f") == b"second"


def test_hardlink_keeps_its_layers_content_when_an_upper_layer_replaces_the_target(tmp_path):
    img = (ImageBuilder(oci=True)
           .layer([file("orig", b"lower content"), hardlink("alias", "orig")])
           .layer([file("orig", b"upper content")]).build())
    sqfs, _ = convert(img, tmp_path)
    assert content(sqfs, "orig") == b"upper content"
    assert content(sqfs, "alias") == b"lower content"


# ---- hostile layers -------------------------------------------------------------------

def _ti(name, type_=tarfile.REGTYPE, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def test_dotdot_path_refuses_the_image(tmp_path):
    img = ImageBuilder(oci=True).layer([raw(_ti("../../etc/evil"), b"pwned")]).build()
    with pytest.raises(ImageError, match="leaves the image root"):
        convert(img, tmp_path)


def test_hardlink_escaping_the_root_refuses_the_image(tmp_path):
    img = ImageBuilder(oci=True).layer(
        [raw(_ti("etc-shadow", tarfile.LNKTYPE, linkname="../../../etc/shadow"))]).build()
    with pytest.raises(ImageError, match="leaves the image root"):
        convert(img, tmp_path)


def test_absolute_paths_stay_inside_the_image(tmp_path):
    img = ImageBuilder(oci=True).layer([raw(_ti("/abs/file"), b"data")]).build()
    sqfs, _ = convert(img, tmp_path)
    assert content(sqfs, "abs/file") == b"data"


def test_entry_below_a_symlink_is_dropped(tmp_path):
    img = ImageBuilder(oci=True).layer(
        [symlink("evil", "/etc"), file("evil/passwd", b"root::0:0::/:/bin/sh\n"),
         symlink("rel", "../../.."), file("rel/x", b"x")]).build()
    sqfs, report = convert(img, tmp_path)
    t = reader_tree(sqfs)
    assert t["evil"].type == "symlink" and "evil/passwd" not in t and "rel/x" not in t
    assert report.dropped["entry below a symbolic link"] == 2


def test_hardlink_to_a_path_not_in_the_layer_is_dropped(tmp_path):
    img = ImageBuilder(oci=True).layer([file("etc/passwd", b"lower")]).layer(
        [raw(_ti("steal", tarfile.LNKTYPE, linkname="/etc/passwd"))]).build()
    sqfs, report = convert(img, tmp_path)
    assert "steal" not in reader_tree(sqfs)
    assert sum(report.dropped.values()) == 1


def test_device_nodes_are_dropped(tmp_path):
    img = ImageBuilder(oci=True).layer(
        [chardev("dev-mem", 1, 1), blockdev("sda", 8, 0), file("ok", b"ok")]).build()
    sqfs, report = convert(img, tmp_path)
    t = reader_tree(sqfs)
    assert "dev-mem" not in t and "sda" not in t and "ok" in t
    assert report.dropped["device node"] == 2


def test_setuid_and_setgid_bits_are_stripped_by_default(tmp_path):
    img = ImageBuilder(oci=True).layer(
        [file("suid", b"x", 0o4755), file("sgid", b"x", 0o2755), directory("sgdir", 0o2775),
         file("sticky", b"x", 0o1777)]).build()
    t = reader_tree(convert(img, tmp_path)[0])
    assert t["suid"].mode & 0o7777 == 0o755
    assert t["sgid"].mode & 0o7777 == 0o755
    assert t["sgdir"].mode & 0o7777 == 0o775
    assert t["sticky"].mode & 0o7777 == 0o1777


def test_setuid_stripping_is_configurable(tmp_path):
    img = ImageBuilder(oci=True).layer([file("suid", b"x", 0o4755),
                                        file("st", b"x", 0o1755)]).build()
    t = reader_tree(convert(img, tmp_path, strip_setuid=False, strip_sticky=True)[0])
    assert t["suid"].mode & 0o7777 == 0o4755
    assert t["st"].mode & 0o7777 == 0o755


def test_security_capability_xattr_never_enters_the_image(tmp_path):
    img = ImageBuilder(oci=True).layer(
        [capability_xattr("ping", b"\x7fELF"),
         file("u", b"x", pax={"SCHILY.xattr.user.comment": "kept"})]).build()
    sqfs, report = convert(img, tmp_path)
    t = reader_tree(sqfs)
    assert not (t["ping"].xattrs or {}).get("security.capability")
    assert (t["u"].xattrs or {}).get("user.comment") == b"kept"
    assert report.dropped["xattr security.capability"] == 1


def test_truncated_layer_is_a_clear_error(tmp_path):
    good = ImageBuilder(oci=True).layer([file("big", os.urandom(200_000))]).build()
    blob = good.layers[0].blob[: len(good.layers[0].blob) // 2]
    img = ImageBuilder(oci=True).raw_layer(blob, good.layers[0].media_type).build()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        convert(img, tmp_path)


def test_garbage_layer_is_a_clear_error(tmp_path):
    import gzip

    img = ImageBuilder(oci=True).raw_layer(gzip.compress(os.urandom(5000)),
                                           "application/vnd.oci.image.layer.v1.tar+gzip").build()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        convert(img, tmp_path)


# ---- equality with umoci unpack + mksquashfs, on real mounts ---------------------------

def _umoci_reference(image, tmp_path):
    layout = tmp_path / "layout"
    write_oci_layout(str(layout), image, tag="t")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True,
                   capture_output=True)
    ref = tmp_path / "ref.sqfs"
    subprocess.run(["mksquashfs", str(bundle / "rootfs"), str(ref), "-noappend", "-quiet",
                    "-no-progress"], check=True, capture_output=True)
    return ref


@root_only
@pytest.mark.skipif(not have("umoci", "mksquashfs"), reason="umoci and squashfs-tools needed")
@pytest.mark.parametrize("build", [layered_image, lambda: busybox_image(oci=True)],
                         ids=["layered", "busybox"])
def test_result_equals_umoci_unpack_plus_mksquashfs(tmp_path, build):
    image = build()
    ours, _ = convert(image, tmp_path)
    ref = _umoci_reference(image, tmp_path)
    with mounted(ours) as a, mounted(ref) as b:
        sa, sb = snapshot(a), snapshot(b)
    # The root directory's metadata is the one thing umoci makes up (the bundle dir).
    sa.pop("."), sb.pop(".")
    assert sa == sb, diff(sa, sb)


@root_only
def test_squashfuse_sees_the_same_tree_as_the_kernel(tmp_path):
    ours, _ = convert(layered_image("zstd"), tmp_path)
    with mounted(ours, "kernel") as a, mounted(ours, "squashfuse") as b:
        sa, sb = snapshot(a), snapshot(b)
    assert sa == sb, diff(sa, sb)
