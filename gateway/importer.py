"""`gateway import FILE`: images from air-gapped sources, without a registry.

Accepted inputs:
- an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`),
- an oci-archive (a tar of such a layout, as `skopeo copy ... oci-archive:` writes),
- a docker-archive (`docker save` output: `manifest.json`, config JSON, layer tars).

Archives are read in place: each layer is streamed from its byte range inside the
(uncompressed) archive, so nothing is extracted. Every blob is verified before use: OCI
blobs against their digests, docker-archive layers (compressed or not) against the
config's diff_ids, which name the uncompressed tar.
The store key is the manifest digest (OCI) or the config digest, Docker's image ID
(docker-archive, which has no manifest).
"""
import hashlib
import json
import os
import tarfile

from hpcc.errors import ImageError, UsageError
from hpcc.reference import DIGEST_RE, parse_local_reference, parse_reference

from .convert import convert_image
from .layersource import LayerSource, open_raw
from .progress import drop_summary, short

_MAX_JSON = 4 << 20
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


class _Blobs:
    """Access to named members: a directory, or an uncompressed tar read in place."""

    def __init__(self, path):
        self.path = path
        self.dir = os.path.isdir(path)
        self.members = {}
        if not self.dir:
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if m.isfile():
                            name = os.path.normpath(m.name).lstrip("/")
                            self.members[name] = (m.offset_data, m.size)
            except tarfile.ReadError:
                with open(path, "rb") as f:
                    head = f.read(4)
                if head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd":
                    raise UsageError(f"{path} is a compressed archive",
                                     hint="decompress it first (e.g. gunzip or unzstd), "
                                          "then import the .tar") from None
                raise ImageError(f"{path} is neither an image directory nor a tar archive") \
                    from None

    def has(self, name):
        if self.dir:
            return os.path.isfile(os.path.join(self.path, name))
        return os.path.normpath(name) in self.members

    def size(self, name):
        if self.dir:
            return os.path.getsize(os.path.join(self.path, name))
        return self.members[os.path.normpath(name)][1]

    def open(self, name):
        if self.dir:
            full = os.path.realpath(os.path.join(self.path, name))
            if not full.startswith(os.path.realpath(self.path) + os.sep):
                raise ImageError(f"{name} points outside the image directory")
            return open(full, "rb")
        try:
            off, size = self.members[os.path.normpath(name)]
        except KeyError:
            raise ImageError(f"{self.path} lacks {name}") from None
        return open_raw(self.path, off, size)

    def read(self, name, limit=_MAX_JSON):
        if not self.has(name):
            raise ImageError(f"{self.path} lacks {name}; is it an image archive?")
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{name} in {self.path} is too large")
        return data

    def layer_source(self, name, compression, digest):
        if self.dir:
            return LayerSource(os.path.join(self.path, name), compression, digest)
        off, size = self.members[os.path.normpath(name)]
        return LayerSource(self.path, compression, digest, off, size)

    def sha256(self, name):
        with self.open(name) as f:
            return _stream_sha256(f)


def _stream_sha256(f):
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def _uncompressed_sha256(source, name):
    try:
        with source.open() as f:
            return _stream_sha256(f)
    except Exception as e:  # OSError, EOFError, zstandard.ZstdError, isal's errors...
        raise ImageError(f"layer {name} cannot be decompressed ({type(e).__name__}: {e}); "
                         "the archive is corrupt") from None


def _json(data, what):
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(doc, (dict, list)):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def _sniff(blobs, name):
    with blobs.open(name) as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if len(head) >= 262 and head[257:262] == b"ustar" or not head.strip(b"\0"):
        return "none"
    raise ImageError(f"layer {name} is neither a gzip, zstd nor tar stream")


def _blob_name(digest):
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ImageError(f"malformed digest {digest!r} in the image")
    return "blobs/" + digest.replace(":", "/", 1)


def _verified_blob(blobs, digest, what):
    name = _blob_name(digest)
    if not blobs.has(name):
        raise ImageError(f"{what} {digest} is missing from {blobs.path}")
    actual = blobs.sha256(name)
    if actual != digest:
        raise ImageError(f"{what} {name} has digest {actual} instead of {digest}; "
                         "the archive is corrupt")
    return name


def _load_oci(blobs, platform):
    index = _json(blobs.read("index.json"), "index.json")
    manifests = index.get("manifests") or []
    if not manifests:
        raise ImageError(f"{blobs.path}: index.json lists no image")
    desc = manifests[0]
    tag = (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name")
    for _depth in range(4):
        mt = desc.get("mediaType", "")
        name = _verified_blob(blobs, desc.get("digest"), "manifest")
        doc = _json(blobs.read(name), "the manifest")
        if mt in _INDEX_TYPES or doc.get("mediaType") in _INDEX_TYPES or "manifests" in doc:
            desc = _pick_platform(doc, platform, blobs.path)
            continue
        return desc["digest"], doc, tag
    raise ImageError(f"{blobs.path}: image indexes nested too deeply")


def _pick_platform(index, platform, where):
    from .manifest import host_platform, parse_platform, select_platform

    manifests = index.get("manifests") or []
    if len(manifests) == 1 and not manifests[0].get("platform"):
        return manifests[0]  # a one-image index without platform data (skopeo writes these)
    return select_platform(where, index, parse_platform(platform or host_platform()))


def import_image(path, *, store, config, tag=None, platform=None, reporter=None):
    """Import an archive or layout directory into `store`. Returns (record, report)."""
    from .progress import Reporter

    reporter = reporter or Reporter(quiet=True)
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    blobs = _Blobs(path)
    refs = []
    is_oci = blobs.has("index.json") and (blobs.has("oci-layout") or not blobs.has("manifest.json"))
    if not is_oci and blobs.has("manifest.json"):
        digest, image_config, layers, names = _docker_archive(blobs)
        meta_source = "docker-archive"
        config_digest = digest
    elif is_oci:
        digest, manifest, ann_tag = _load_oci(blobs, platform)
        config_digest = manifest.get("config", {}).get("digest")
        cname = _verified_blob(blobs, config_digest, "config")
        image_config = _json(blobs.read(cname), "the image config")
        layers = []
        for d in manifest.get("layers") or []:
            lname = _verified_blob(blobs, d.get("digest"), "layer")
            layers.append(blobs.layer_source(lname, _sniff(blobs, lname), d["digest"]))
        names = [ann_tag] if ann_tag and ":" in ann_tag and "/" in ann_tag else []
        meta_source = "oci-layout" if blobs.dir else "oci-archive"
    else:
        raise ImageError(f"{path} is not an OCI layout, oci-archive or docker-archive",
                         hint="expected index.json/oci-layout or manifest.json inside")
    if tag:
        refs = [parse_local_reference(tag)]
    else:
        for n in names:
            try:
                refs.append(parse_reference(n))
            except Exception:  # a RepoTag we cannot express: keep the image untagged
                continue
    refs = [r for r in refs if r.tag]
    store.ensure()
    same = _same_image(store, digest, config_digest)
    if same is not None:
        # The store has this image (the same manifest, or a pulled image with the same
        # config, which names every layer's content): tag it, convert nothing.
        for r in refs:
            store.tag(r, same.digest)
        reporter.done(f"{path} is already in the store as {short(same.digest)} "
                      f"({same.sqfs_path}); nothing converted")
        return store.get(same.digest), dict(same.meta.get("conversion") or {},
                                            already_present=True)
    reporter.line(f"importing {path} ({meta_source}, {len(layers)} layers) as {short(digest)}")
    reporter.converting(sum(getattr(src, "length", None) or 0 for src in layers))
    with store.lock(digest):
        meta = {
            "source": str(refs[0]) if refs else os.path.abspath(path),
            "imported_from": os.path.abspath(path),
            "import_format": meta_source,
            "config_digest": config_digest,
            "created": image_config.get("created"),
            "architecture": image_config.get("architecture"),
            "os": image_config.get("os"),
            "layers": [{"digest": lay.digest, "size": (lay.length if lay.length is not None
                                                       else os.path.getsize(lay.path))}
                       for lay in layers],
        }
        getters = [(lambda lay=lay: lay) for lay in layers]
        rec, _stats, report = convert_image(store, digest, getters, config=config,
                                            image_config=image_config, meta=meta, refs=refs,
                                            progress=reporter.converted_bytes)
    drops = drop_summary(report)
    reporter.done(f"imported {path} -> {rec.sqfs_path}" + (f"; {drops}" if drops else ""))
    return rec, report


def _same_image(store, digest, config_digest):
    """The image of `store` with this digest, or (by its config digest: the same config
    lists the same layer diff_ids) one pulled or imported under another digest."""
    rec = store.get(digest)
    if rec is not None or not config_digest:
        return rec
    for rec in store.images():
        if rec.meta.get("config_digest") == config_digest:
            return rec
    return None


def _docker_archive(blobs):
    manifest = _json(blobs.read("manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise ImageError(f"{blobs.path}: manifest.json lists no image")
    entry = manifest[0]
    cname = entry.get("Config")
    if not isinstance(cname, str):
        raise ImageError(f"{blobs.path}: manifest.json has no Config")
    config_bytes = blobs.read(cname)
    digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    image_config = _json(config_bytes, "the image config")
    diff_ids = (image_config.get("rootfs") or {}).get("diff_ids") or []
    lnames = entry.get("Layers") or []
    if len(diff_ids) != len(lnames):
        raise ImageError(f"{blobs.path}: {len(lnames)} layers but {len(diff_ids)} diff_ids "
                         "in the config; the archive is inconsistent")
    layers = []
    for lname, diff_id in zip(lnames, diff_ids):
        if not isinstance(lname, str) or not blobs.has(lname):
            raise ImageError(f"{blobs.path}: layer {lname} is missing")
        comp = _sniff(blobs, lname)
        source = blobs.layer_source(lname, comp, diff_id)
        # diff_ids name the uncompressed tar: a compressed layer (skopeo and other tools
        # write them; `docker save` does not) is checked after decompression
        actual = blobs.sha256(lname) if comp == "none" else _uncompressed_sha256(source, lname)
        if actual != diff_id:
            raise ImageError(f"layer {lname} has digest {actual} instead of {diff_id}; "
                             "the archive is corrupt")
        layers.append(source)
    return digest, image_config, layers, [t for t in entry.get("RepoTags") or []
                                          if isinstance(t, str)]
