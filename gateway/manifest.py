"""OCI image manifests, indexes and configs: media types, platforms, and the checks that
turn a registry's (or an archive's) JSON into a ResolvedImage.

Pure data handling, no network: `registry.RegistryClient.resolve` fetches the documents and
hands them here; `importer` uses the platform selection for OCI layouts.
"""
import json
import platform as _platform
from dataclasses import dataclass, field

from hpcc.errors import ConfigError, ImageError
from hpcc.reference import DIGEST_RE, Reference

# Media types -----------------------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}

MAX_MANIFEST = 4 << 20        # manifests and configs larger than this are refused


@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    compression: str        # "gzip" | "zstd" | "none"


@dataclass
class ResolvedImage:
    ref: Reference                  # with the manifest digest filled in
    manifest_digest: str
    manifest: dict
    manifest_bytes: bytes
    media_type: str
    config: dict
    config_digest: str
    layers: list = field(default_factory=list)
    platform: str = ""
    index_digest: str | None = None  # the manifest list / index the platform came from


# Platforms -------------------------------------------------------------------------------
_MACHINE_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "i386": "386", "i686": "386",
    "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "armv6l": "arm",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64le",
}


def host_platform():
    """This machine's platform in OCI terms, e.g. 'linux/amd64', 'linux/arm/v7'."""
    m = _platform.machine().lower()
    arch = _MACHINE_ARCH.get(m, m)
    if m == "armv7l":
        return "linux/arm/v7"
    if m == "armv6l":
        return "linux/arm/v6"
    return f"linux/{arch}"


def parse_platform(s):
    """'linux/arm64/v8' -> ('linux', 'arm64', 'v8'); raises ConfigError if malformed."""
    parts = s.strip().split("/") if s else []
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"invalid platform '{s}'",
                          hint="expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")
    arch = _MACHINE_ARCH.get(parts[1], parts[1])
    return parts[0], arch, parts[2] if len(parts) == 3 else None


def _platform_str(p):
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += "/" + p["variant"]
    return s


def _variant_matches(want, have, arch):
    if want is None:
        return True
    if have == want:
        return True
    # arm64 images usually carry no variant; v8 is implied.
    return arch == "arm64" and want == "v8" and not have


# Manifest lists, layers, manifests ------------------------------------------------------
def select_platform(ref, index, want):
    """The entry of a manifest list / OCI index for platform `want` (os, arch, variant);
    `ref` names the image in the error, which lists the platforms there are."""
    os_, arch, variant = want
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"manifest list of {ref} has no 'manifests' array")
    available = []
    candidates = []
    for d in entries:
        if not isinstance(d, dict):
            continue
        p = d.get("platform") or {}
        if p.get("os") in (None, "unknown") or p.get("architecture") in (None, "unknown"):
            continue      # attestations and other non-image entries
        available.append(_platform_str(p))
        if p.get("os") == os_ and p.get("architecture") == arch and \
                _variant_matches(variant, p.get("variant"), arch):
            candidates.append(d)
    if not candidates:
        wanted = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
        avail = ", ".join(dict.fromkeys(available)) or "none"
        raise ImageError(f"image {ref} has no variant for platform {wanted}; "
                         f"available platforms: {avail}",
                         hint="choose one with --platform")
    # Prefer the entry with no os.version/features constraint, then the first listed.
    return candidates[0]


def sniff_compression(head):
    """'gzip' | 'zstd' | 'none' (a tar header) from a blob's first 512 bytes, else None."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if len(head) >= 512:
        block = head[:512]
        if block == b"\0" * 512:
            return "none"           # an empty tar archive
        if block[257:262] == b"ustar":
            return "none"
        try:                        # pre-POSIX (v7) tar: check the header checksum
            stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            return None
        if stored == sum(block[:148]) + 8 * 32 + sum(block[156:]):
            return "none"
    return None


def parse_json(body, what):
    """A JSON object from a manifest/config body; ImageError naming `what` otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    return data


def media_type(ctype, data, what):
    """The manifest's media type from its body and the served Content-Type `ctype`."""
    mt = data.get("mediaType") or ""
    if ctype in DOCKER_SCHEMA1 or mt in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise ImageError(f"{what} uses the deprecated Docker schema 1 manifest format, "
                         "which hpcc does not support",
                         hint="push the image again with a current docker/podman/skopeo")
    for cand in (mt, ctype):
        if cand in MANIFEST_TYPES or cand in INDEX_TYPES:
            return cand
    if "manifests" in data:
        return OCI_INDEX
    if "layers" in data and "config" in data:
        return OCI_MANIFEST
    raise ImageError(f"{what} has an unsupported media type '{mt or ctype}'",
                     hint="hpcc pulls Docker schema 2 and OCI images")


def manifest_parts(ref, data):
    """Check an image manifest's config descriptor and layers: (config descriptor, [Layer])."""
    what = f"manifest of {ref}"
    cfg = data.get("config")
    if not isinstance(cfg, dict) or not DIGEST_RE.match(str(cfg.get("digest", ""))):
        raise ImageError(f"{what} has no valid config descriptor")
    cfg_type = cfg.get("mediaType", "")
    if cfg_type and cfg_type not in (DOCKER_CONFIG, OCI_CONFIG):
        raise ImageError(f"{ref} is not a container image (its config has media type "
                         f"'{cfg_type}')")
    layers = []
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{what} has no 'layers' array")
    for i, lay in enumerate(raw_layers):
        if not isinstance(lay, dict):
            raise ImageError(f"{what}: layer {i} is not an object")
        ld = str(lay.get("digest", ""))
        if not DIGEST_RE.match(ld):
            raise ImageError(f"{what}: layer {i} has a malformed digest '{ld}'")
        size = lay.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: layer {ld} has no valid size")
        lmt = lay.get("mediaType", "")
        comp = LAYER_TYPES.get(lmt)
        if comp is None:
            raise ImageError(f"{what}: layer {ld} has an unsupported media type '{lmt}'",
                             hint="hpcc understands tar layers, gzip or zstd compressed")
        if lay.get("urls"):
            raise ImageError(f"{what}: layer {ld} is a foreign layer hosted elsewhere "
                             "(Windows base layers); not supported")
        layers.append(Layer(ld, size, lmt, comp))
    cfg_size = cfg.get("size")
    if not isinstance(cfg_size, int) or cfg_size < 0 or cfg_size > MAX_MANIFEST:
        raise ImageError(f"{what}: the config descriptor has no valid size")
    return cfg, layers


def config_platform(ref, config, nlayers, want, explicit, from_index):
    """Check an image config against its manifest (`nlayers` layers) and, when the platform
    was asked for explicitly and no index chose it, against `want`; returns the image's
    platform string."""
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if diff_ids is not None and (not isinstance(diff_ids, list)
                                 or len(diff_ids) != nlayers):
        raise ImageError(f"image config of {ref} lists {len(diff_ids or [])} layer diff_ids "
                         f"but the manifest has {nlayers} layers")
    plat = {"os": config.get("os"), "architecture": config.get("architecture"),
            "variant": config.get("variant")}
    if not plat["os"] or not plat["architecture"]:
        raise ImageError(f"image config of {ref} has no os/architecture")
    os_, arch, variant = want
    if explicit and not from_index and (
            plat["os"] != os_ or plat["architecture"] != arch
            or not _variant_matches(variant, plat.get("variant"), arch)):
        raise ImageError(f"image {ref} is for platform {_platform_str(plat)}, not "
                         f"{os_}/{arch}" + (f"/{variant}" if variant else ""),
                         hint="choose its platform with --platform or another image")
    return _platform_str(plat)


__all__ = ["Layer", "ResolvedImage", "host_platform", "parse_platform", "select_platform",
           "sniff_compression", "parse_json", "media_type", "manifest_parts", "config_platform"]
