"""OCI distribution / Docker registry v2 client used by `gateway pull`.

    client = RegistryClient(config)
    img = client.resolve(parse_reference("127.0.0.1:5000/app:1"), platform="linux/amd64")
    paths = client.fetch_layers(img, BlobCache(root))

What it does: anonymous, Basic and Bearer-token (WWW-Authenticate challenge) access with
credentials from docker/containers auth files; Docker schema2 and OCI manifests; manifest
lists / OCI indexes with platform selection; gzip, zstd and uncompressed layers (media type
checked against the blob's magic bytes); digest and size verification of every manifest and
blob; retries with exponential backoff on 5xx and connection errors; resumable blob
downloads (HTTP Range from the partial file in the cache); concurrent layer downloads into
the digest-addressed blob cache.

The parts, one module each: `transport` (TLS/http per host, authentication, retries, HTTP
errors), `manifest` (media types, platforms, manifest and config checks), `download` (blobs
into the cache). This module puts them together: resolve a reference, fetch its blobs.
"""
import hashlib

import requests

from hpcc.errors import ImageError, RegistryError
from hpcc.reference import DIGEST_RE

from . import download
from .manifest import (
    ACCEPT,
    INDEX_TYPES,
    MAX_MANIFEST,
    Layer,
    ResolvedImage,
    config_platform,
    host_platform,
    manifest_parts,
    media_type,
    parse_json,
    parse_platform,
    select_platform,
    sniff_compression,
)
from .transport import Transport, describe_conn_error, is_loopback


class RegistryClient:
    """A client for one or more registries; thread-safe (one requests.Session).

    `notice`: an optional callable given one line when a request waits (rate limit);
    `trace`: one given a line per response (method, URL, status: `gateway -v`)."""

    def __init__(self, config=None, *, auth_file=None, insecure=False, ca_file=None,
                 retries=None, timeout=(10, 60), backoff=0.5, notice=None, trace=None):
        config = config or {}
        self.config = config
        gw = config.get("gateway", {}) or {}
        self.default_platform = gw.get("platform", "") or None
        self.concurrency = gw.get("concurrent_downloads", 4)
        self.transport = Transport(config, auth_file=auth_file, insecure=insecure,
                                   ca_file=ca_file, retries=retries, timeout=timeout,
                                   backoff=backoff, notice=notice, trace=trace)

    @property
    def retries(self):
        return self.transport.retries

    @property
    def request_log(self):
        """(method, url, status) of every response."""
        return self.transport.request_log

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- manifests -------------------------------------------------------------------------
    def _get_manifest(self, ref, reference):
        r = self.transport.request(ref, "GET", f"/v2/{ref.path}/manifests/{reference}",
                          headers={"Accept": ACCEPT}, stream=True, what=f"image {ref}")
        if r.status_code != 200:
            raise self.transport.http_error(ref, r, f"image {ref}", "manifest")
        try:
            body = self._read_limited(r, MAX_MANIFEST, f"the manifest of {ref}")
        except (requests.exceptions.RequestException, OSError) as e:
            raise RegistryError(f"cannot fetch the manifest of {ref} from {ref.api_host}: "
                                f"{describe_conn_error(e)}") from None
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST_RE.match(reference) and digest != reference:
            raise ImageError(f"manifest of {ref} has digest {digest} instead of {reference}; "
                             "the registry served corrupt data")
        served = r.headers.get("Docker-Content-Digest")
        if served and served.startswith("sha256:") and served != digest:
            raise ImageError(f"manifest of {ref} has digest {digest} but the registry "
                             f"announced {served}; the registry served corrupt data")
        ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        return body, digest, ctype

    @staticmethod
    def _read_limited(r, limit, what):
        cl = r.headers.get("Content-Length")
        if cl and cl.isdigit() and int(cl) > limit:
            r.close()
            raise ImageError(f"{what} is {cl} bytes, more than the {limit} allowed")
        buf = bytearray()
        for chunk in r.iter_content(65536):
            buf += chunk
            if len(buf) > limit:
                r.close()
                raise ImageError(f"{what} is more than the {limit} bytes allowed")
        return bytes(buf)

    def resolve(self, ref, platform=None):
        """Fetch and check the manifest (following a manifest list / index to the entry of
        `platform`, default the config's gateway.platform or this machine) and the image
        config. Returns a ResolvedImage; no layer is downloaded."""
        explicit = platform is not None
        plat = platform or self.default_platform or host_platform()
        want = parse_platform(plat)
        reference = ref.digest or ref.tag
        body, digest, ctype = self._get_manifest(ref, reference)
        data = parse_json(body, f"manifest of {ref}")
        mt = media_type(ctype, data, f"manifest of {ref}")
        index_digest = None
        depth = 0
        while mt in INDEX_TYPES:
            depth += 1
            if depth > 2:
                raise ImageError(f"manifest list of {ref} nests too deeply")
            index_digest = index_digest or digest
            entry = select_platform(ref, data, want)
            child = entry.get("digest", "")
            if not DIGEST_RE.match(str(child)):
                raise ImageError(f"manifest list of {ref} has an entry with a malformed "
                                 f"digest '{child}'")
            body, digest, ctype = self._get_manifest(ref, child)
            if isinstance(entry.get("size"), int) and entry["size"] != len(body):
                raise ImageError(f"manifest {child} of {ref} has {len(body)} bytes instead of "
                                 f"{entry['size']}; the registry served corrupt data")
            data = parse_json(body, f"manifest {child} of {ref}")
            mt = media_type(ctype or entry.get("mediaType", ""), data,
                            f"manifest {child} of {ref}")
        return self._resolve_manifest(ref, data, body, digest, mt, want, explicit, index_digest)

    def _resolve_manifest(self, ref, data, body, digest, mt, want, explicit, index_digest):
        cfg, layers = manifest_parts(ref, data)
        cfg_bytes = self._fetch_small_blob(ref, cfg["digest"], cfg["size"], f"config of {ref}")
        config = parse_json(cfg_bytes, f"image config of {ref}")
        plat = config_platform(ref, config, len(layers), want, explicit, index_digest is not None)
        return ResolvedImage(
            ref=ref.with_digest(digest) if ref.digest is None else ref,
            manifest_digest=digest, manifest=data, manifest_bytes=body, media_type=mt,
            config=config, config_digest=cfg["digest"], layers=layers,
            platform=plat, index_digest=index_digest)

    def _fetch_small_blob(self, ref, digest, size, what):
        r = self.transport.request(ref, "GET", f"/v2/{ref.path}/blobs/{digest}", stream=True,
                                   what=what)
        if r.status_code != 200:
            raise self.transport.http_error(ref, r, f"{what} ({digest})", "blob")
        try:
            body = self._read_limited(r, MAX_MANIFEST, what)
        except (requests.exceptions.RequestException, OSError) as e:
            raise RegistryError(f"cannot fetch the {what} from {ref.api_host}: "
                                f"{describe_conn_error(e)}") from None
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if len(body) != size:
            raise ImageError(f"{what} has {len(body)} bytes instead of {size}; "
                             "the registry served corrupt data")
        if actual != digest:
            raise ImageError(f"{what} has digest {actual} instead of {digest}; "
                             "the registry served corrupt data")
        return body

    # -- blobs -----------------------------------------------------------------------------
    def fetch_blob(self, ref, digest, size, cache, progress=None, what=None, abort=None):
        """Download one blob into `cache`; see download.fetch_blob."""
        return download.fetch_blob(self.transport, ref, digest, size, cache, progress, what,
                                   abort)

    def fetch_layers(self, img, cache, progress=None, concurrency=None):
        """Download every layer of `img` concurrently; see download.fetch_layers."""
        return download.fetch_layers(self.transport, img, cache, progress,
                                     concurrency or self.concurrency)

    check_layer = staticmethod(download.check_layer)


__all__ = ["RegistryClient", "ResolvedImage", "Layer", "host_platform", "parse_platform",
           "is_loopback", "select_platform", "sniff_compression"]
