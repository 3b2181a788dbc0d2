"""Images built in memory from explicit tar entries, hostile ones included: Docker schema2
or OCI manifests, indexes over several platforms, and the archive forms `gateway import`
reads (OCI layout, oci-archive, docker-archive). Reproducible: every mtime is EPOCH.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

EPOCH = 1700000000          # fixed mtime: built images are reproducible

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                   "none": "application/vnd.docker.image.rootfs.diff.tar",
                   "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                "none": "application/vnd.oci.image.layer.v1.tar",
                "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# =========================================================================================
# Building images in memory
# =========================================================================================
@dataclass
class Entry:
    """One tar entry of a layer. Build them with the helper functions below."""
    name: str
    kind: str = "file"               # file dir symlink hardlink fifo char block raw
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH
    target: str = ""                 # symlink target / hardlink source
    devmajor: int = 0
    devminor: int = 0
    pax: dict = field(default_factory=dict)
    uname: str = ""
    gname: str = ""
    tarinfo: tarfile.TarInfo | None = None   # kind == "raw": written exactly as given


def file(name, content=b"", mode=0o644, uid=0, gid=0, mtime=EPOCH, pax=None, **kw):
    if isinstance(content, str):
        content = content.encode()
    return Entry(name, "file", content, mode, uid, gid, mtime, pax=dict(pax or {}), **kw)


def directory(name, mode=0o755, uid=0, gid=0, mtime=EPOCH, pax=None):
    return Entry(name, "dir", mode=mode, uid=uid, gid=gid, mtime=mtime, pax=dict(pax or {}))


def symlink(name, target, uid=0, gid=0, mtime=EPOCH):
    return Entry(name, "symlink", mode=0o777, uid=uid, gid=gid, mtime=mtime, target=target)


def hardlink(name, target, mtime=EPOCH):
    return Entry(name, "hardlink", mode=0o644, mtime=mtime, target=target)


def fifo(name, mode=0o644):
    return Entry(name, "fifo", mode=mode)


def chardev(name, major, minor, mode=0o666):
    return Entry(name, "char", mode=mode, devmajor=major, devminor=minor)


def blockdev(name, major, minor, mode=0o660):
    return Entry(name, "block", mode=mode, devmajor=major, devminor=minor)


def whiteout(path):
    """Delete `path` of a lower layer: the entry DIR/.wh.NAME."""
    d, _, base = path.rstrip("/").rpartition("/")
    return Entry((d + "/" if d else "") + ".wh." + base, "file", b"", 0o644)


def opaque(dirpath):
    """Hide every lower-layer entry under `dirpath`: DIR/.wh..wh..opq."""
    return Entry(dirpath.rstrip("/") + "/.wh..wh..opq", "file", b"", 0o644)


def raw(tarinfo, content=b""):
    """An arbitrary TarInfo written as is (for hostile cases: '../x', '/abs', setuid...)."""
    return Entry(tarinfo.name, "raw", content, tarinfo=tarinfo)


def capability_xattr(name, content=b"", mode=0o755):
    """A file carrying a security.capability xattr (cap_net_raw+ep) in a PAX header."""
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    return file(name, content, mode,
                pax={"SCHILY.xattr.security.capability": cap.decode("latin-1")})


_KIND_TYPE = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
              "block": tarfile.BLKTYPE}


def layer_tar(entries):
    """Serialise entries to an uncompressed PAX tar (bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for e in entries:
            if e.kind == "raw":
                ti = e.tarinfo
                data = e.content if e.content else None
                if data is not None:
                    ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data) if data is not None and ti.isreg() else None)
                continue
            ti = tarfile.TarInfo(e.name)
            ti.type = _KIND_TYPE[e.kind]
            default = 0o755 if e.kind == "dir" else 0o644
            ti.mode = default if e.mode is None else e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname, ti.gname = e.uname, e.gname
            ti.mtime = e.mtime
            if e.kind in ("symlink", "hardlink"):
                ti.linkname = e.target
            if e.kind in ("char", "block"):
                ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.pax:
                ti.pax_headers = dict(e.pax)
            if e.kind == "file":
                ti.size = len(e.content)
                tf.addfile(ti, io.BytesIO(e.content))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(data, compression):
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression}")


@dataclass
class LayerBlob:
    tar: bytes                      # uncompressed tar
    blob: bytes                     # as stored in the registry
    compression: str
    media_type: str
    digest: str                     # of blob
    diff_id: str                    # of tar

    @property
    def size(self):
        return len(self.blob)

    def descriptor(self):
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass
class Image:
    """A built image: every blob in memory, manifest bytes fixed."""
    layers: list
    config: dict
    config_bytes: bytes
    config_digest: str
    manifest: dict
    manifest_bytes: bytes
    media_type: str
    oci: bool
    platform: dict

    @property
    def digest(self):
        return sha256(self.manifest_bytes)

    def blobs(self):
        out = {self.config_digest: self.config_bytes}
        for lay in self.layers:
            out[lay.digest] = lay.blob
        return out

    def descriptor(self):
        return {"mediaType": self.media_type, "size": len(self.manifest_bytes),
                "digest": self.digest, "platform": dict(self.platform)}


@dataclass
class ImageIndex:
    images: list
    index: dict
    index_bytes: bytes
    media_type: str
    oci: bool

    @property
    def digest(self):
        return sha256(self.index_bytes)


class ImageBuilder:
    """Build an image from layer specs:

        img = (ImageBuilder(oci=True)
               .layer([directory("bin"), file("bin/hello", b"#!/bin/sh\\n", 0o755)])
               .layer([whiteout("bin/hello")], compression="zstd")
               .env("PATH=/bin").cmd(["/bin/sh"]).label("org.example", "1")
               .build())
    """

    def __init__(self, *, oci=False, os="linux", architecture="amd64", variant=None):
        self.oci = oci
        self.platform = {"os": os, "architecture": architecture}
        if variant:
            self.platform["variant"] = variant
        self._layers = []
        self._cfg = {"Env": [], "Labels": {}}
        self._history = []
        self.created = "2023-11-14T22:13:20Z"

    def layer(self, entries, compression="gzip", comment=None):
        tar = layer_tar(entries)
        blob = compress(tar, compression)
        types = MT_OCI_LAYER if self.oci else MT_DOCKER_LAYER
        self._layers.append(LayerBlob(tar, blob, compression, types[compression],
                                      sha256(blob), sha256(tar)))
        self._history.append({"created": self.created, "created_by": comment or
                              f"hpcc.testkit layer {len(self._layers)}"})
        return self

    def add_layer(self, layer_blob):
        """Reuse a LayerBlob of another image (shared base layers)."""
        self._layers.append(layer_blob)
        self._history.append({"created": self.created, "created_by": "shared layer"})
        return self

    def raw_layer(self, blob, media_type, tar=None, compression="gzip"):
        """A layer from bytes as given (for corrupt/unknown-format cases)."""
        tar = blob if tar is None else tar
        self._layers.append(LayerBlob(tar, blob, compression, media_type, sha256(blob),
                                      sha256(tar)))
        self._history.append({"created": self.created, "created_by": "raw layer"})
        return self

    def env(self, *pairs):
        self._cfg["Env"].extend(pairs)
        return self

    def entrypoint(self, argv):
        self._cfg["Entrypoint"] = list(argv)
        return self

    def cmd(self, argv):
        self._cfg["Cmd"] = list(argv)
        return self

    def workdir(self, path):
        self._cfg["WorkingDir"] = path
        return self

    def user(self, user):
        self._cfg["User"] = user
        return self

    def label(self, key, value):
        self._cfg["Labels"][key] = value
        return self

    def config_extra(self, **kw):
        self._cfg.update(kw)
        return self

    def build(self):
        cfg = {k: v for k, v in self._cfg.items() if v not in ([], {})}
        config = {"created": self.created, "architecture": self.platform["architecture"],
                  "os": self.platform["os"], "config": cfg,
                  "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in self._layers]},
                  "history": list(self._history)}
        if "variant" in self.platform:
            config["variant"] = self.platform["variant"]
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = sha256(config_bytes)
        mt = MT_OCI_MANIFEST if self.oci else MT_DOCKER_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mt,
                    "config": {"mediaType": MT_OCI_CONFIG if self.oci else MT_DOCKER_CONFIG,
                               "size": len(config_bytes), "digest": config_digest},
                    "layers": [x.descriptor() for x in self._layers]}
        manifest_bytes = json.dumps(manifest, indent=3).encode()
        return Image(list(self._layers), config, config_bytes, config_digest, manifest,
                     manifest_bytes, mt, self.oci, dict(self.platform))


def image_index(images, oci=True):
    """A manifest list (Docker) or image index (OCI) over images of several platforms."""
    mt = MT_OCI_INDEX if oci else MT_DOCKER_LIST
    index = {"schemaVersion": 2, "mediaType": mt,
             "manifests": [img.descriptor() for img in images]}
    return ImageIndex(list(images), index, json.dumps(index, indent=3).encode(), mt, oci)


def simple_image(text="hello", *, oci=False, compression="gzip", architecture="amd64",
                 variant=None, layers=2):
    """A small image with `layers` layers, each a directory with one file."""
    b = ImageBuilder(oci=oci, architecture=architecture, variant=variant)
    for i in range(layers):
        b.layer([directory(f"l{i}"), file(f"l{i}/data.txt", f"{text} {i}\n" * (200 + i))],
                compression=compression)
    return b.env("PATH=/usr/bin:/bin").cmd(["/bin/sh"]).label("test.text", text).build()


# =========================================================================================
# Archives for `gateway import`
# =========================================================================================
def write_oci_layout(directory_path, image, tag="latest"):
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/*)."""
    d = Path(directory_path)
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    images = image.images if isinstance(image, ImageIndex) else [image]
    for img in images:
        for digest, data in list(img.blobs().items()) + [(img.digest, img.manifest_bytes)]:
            (blobs / digest.split(":", 1)[1]).write_bytes(data)
    if isinstance(image, ImageIndex):
        (blobs / image.digest.split(":", 1)[1]).write_bytes(image.index_bytes)
        top = {"mediaType": image.media_type, "size": len(image.index_bytes),
               "digest": image.digest}
    else:
        top = {"mediaType": image.media_type, "size": len(image.manifest_bytes),
               "digest": image.digest}
    if tag:
        top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (d / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                              "manifests": [top]}))
    return d


def write_oci_archive(tarpath, image, tag="latest"):
    """An oci-archive: the OCI layout as a tar file."""
    with tempfile.TemporaryDirectory(prefix="hpcc-oci-") as tmp:
        write_oci_layout(tmp, image, tag)
        with tarfile.open(tarpath, "w") as tf:
            for name in ("oci-layout", "index.json", "blobs"):
                tf.add(os.path.join(tmp, name), arcname=name)
    return Path(tarpath)


def write_docker_archive(tarpath, image, repo_tag="hpcc-test/image:latest", compressed=False):
    """A `docker save` archive: manifest.json, <config hex>.json, <diff_id hex>/layer.tar
    (uncompressed), and the legacy `repositories` file. compressed=True stores the layers
    as their registry blobs, <digest hex>.tar, as skopeo's docker-archive does."""
    cfg_hex = image.config_digest.split(":", 1)[1]
    files = {f"{cfg_hex}.json": image.config_bytes}
    layer_paths = []
    for lay in image.layers:
        if compressed:
            p = f"{lay.digest.split(':', 1)[1]}.tar"
            files[p] = lay.blob
        else:
            p = f"{lay.diff_id.split(':', 1)[1]}/layer.tar"
            files[p] = lay.tar
        layer_paths.append(p)
    manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": [repo_tag] if repo_tag else [],
                 "Layers": layer_paths}]
    files["manifest.json"] = json.dumps(manifest).encode()
    if repo_tag:
        name, _, tag = repo_tag.rpartition(":")
        files["repositories"] = json.dumps(
            {name: {tag: layer_paths[-1].split("/")[0] if layer_paths else cfg_hex}}).encode()
    with tarfile.open(tarpath, "w") as tf:
        dirs = sorted({p.split("/")[0] for p in files if "/" in p})
        for dname in dirs:
            ti = tarfile.TarInfo(dname)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, EPOCH
            tf.addfile(ti, io.BytesIO(data))
    return Path(tarpath)
