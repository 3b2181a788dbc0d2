"""Image references, parsed and normalised the way Docker does.

    ubuntu                      -> docker.io/library/ubuntu:latest
    ghcr.io/org/app:1.2         -> ghcr.io/org/app:1.2
    127.0.0.1:5000/ns/app@sha256:<64 hex>

enroot's and pyxis' forms are accepted too, so job scripts written for them keep working:

    nvcr.io#nvidia/pytorch:24.01-py3   -> nvcr.io/nvidia/pytorch:24.01-py3 (REGISTRY#IMAGE)
    USER@nvcr.io#nvidia/pytorch:24.01  -> the same: USER only picks credentials in enroot;
                                          hpcc takes them from the user's registry login
    docker://ubuntu, docker://nvcr.io#nvidia/cuda:12.2.0-base-ubuntu22.04
    dockerd://IMAGE, podman://IMAGE     -> refused: hpcc does not read local daemons' images

Used by the registry client (where to fetch) and the store (the ref index path).
"""
import re

from .errors import ReferenceError_

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
LOCAL_DOMAIN = "localhost"   # names given to imported images: no registry has them

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:localhost|(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


class Reference:
    """domain (docker.io, 127.0.0.1:5000...), path (library/ubuntu), tag (None when only a
    digest was given), digest (sha256:... or None). Immutable and hashable. A plain class:
    this module is on the launch path, where importing dataclasses costs ~10 ms."""

    __slots__ = ("domain", "path", "tag", "digest")

    def __init__(self, domain, path, tag, digest):
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "tag", tag)
        object.__setattr__(self, "digest", digest)

    def __setattr__(self, name, value):
        raise AttributeError("Reference is immutable")

    def _key(self):
        return (self.domain, self.path, self.tag, self.digest)

    def __eq__(self, other):
        return isinstance(other, Reference) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"Reference({self.domain!r}, {self.path!r}, {self.tag!r}, {self.digest!r})"

    @property
    def repository(self):
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self):
        """Host[:port] that serves the registry API for this domain."""
        return "registry-1.docker.io" if self.domain == DEFAULT_DOMAIN else self.domain

    def __str__(self):
        s = self.repository
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s

    @property
    def familiar(self):
        """Short form a user would type: 'ubuntu:22.04' for docker.io/library/ubuntu:22.04."""
        name = self.repository
        if self.domain == DEFAULT_DOMAIN:
            name = self.path[len("library/"):] if self.path.startswith("library/") else self.path
        if self.tag:
            name += ":" + self.tag
        if self.digest:
            name += "@" + self.digest
        return name

    def with_digest(self, digest):
        return Reference(self.domain, self.path, self.tag, digest)


def has_domain(name):
    """Does `name` start with a registry host (a first component with '.' or ':', or
    'localhost')? Without one, Docker's rules put it on docker.io."""
    first, sep, _ = name.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost"
                          or first.startswith("["))


def parse_local_reference(name):
    """A name for an image that comes from no registry (`gateway import --tag`): without a
    registry host it is local (localhost/NAME), not docker.io's."""
    if isinstance(name, str) and name and not has_domain(name) and "@" not in name:
        ref = parse_reference(LOCAL_DOMAIN + "/" + name)
        return ref
    return parse_reference(name)


def local_alternative(name):
    """The local (localhost/NAME) reference a user's short name may mean, or None when the
    name has a registry host or a digest."""
    if has_domain(name) or "@" in name:
        return None
    try:
        return parse_reference(LOCAL_DOMAIN + "/" + name)
    except ReferenceError_:
        return None


def _bad(ref, why):
    return ReferenceError_(f"invalid image reference '{ref}': {why}",
                           hint="expected [REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST]")


_DAEMONS = ("dockerd://", "podman://")


def parse_reference(ref):
    """Parse and normalise an image reference; raise ReferenceError_ with a clear message."""
    if not isinstance(ref, str) or not ref or len(ref) > 1024:
        raise _bad(ref, "empty or too long")
    if any(c.isspace() for c in ref):
        raise _bad(ref, "contains white space")
    for scheme in _DAEMONS:
        if ref.startswith(scheme):
            tool = "docker" if scheme == "dockerd://" else "podman"
            raise ReferenceError_(
                f"image '{ref}': {scheme} (an image in the local {tool} daemon's storage) is "
                "not supported by hpcc",
                hint=f"save it ('{tool} save -o app.tar IMAGE') and import it with 'gateway "
                "import app.tar --tag NAME', or pull it from a registry")
    rest = ref
    if rest.startswith("docker://"):
        rest = rest[len("docker://"):]
        if not rest:
            raise _bad(ref, "no image name after docker://")
    if "#" in rest:
        return _parse_enroot(ref, rest)
    return _parse(ref, rest)


def _parse_enroot(ref, rest):
    """[USER@]REGISTRY#IMAGE: the registry is given apart from the image's path."""
    registry, _, image = rest.partition("#")
    if "@" in registry:
        registry = registry.rpartition("@")[2]  # enroot's credential user: not used here
    if not registry or not _DOMAIN_RE.match(registry):
        raise _bad(ref, f"bad registry host '{registry}' before '#'")
    if not image or "#" in image:
        raise _bad(ref, "expected [USER@]REGISTRY#IMAGE[:TAG]")
    # the image part is a path in that registry, never a host of its own
    inner = _parse(ref, "placeholder.invalid/" + image)
    domain = DEFAULT_DOMAIN if registry in ("index.docker.io", DEFAULT_DOMAIN) else registry
    path = inner.path
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = "library/" + path
    return Reference(domain, path, inner.tag, inner.digest)


def _parse(ref, rest):
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise _bad(ref, "the digest must be sha256: followed by 64 lower-case hex digits")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise _bad(ref, f"bad tag '{tag}'")
    if not rest:
        raise _bad(ref, "no image name")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, remainder
        if not _DOMAIN_RE.match(domain):
            raise _bad(ref, f"bad registry host '{domain}'")
    else:
        domain, path = DEFAULT_DOMAIN, rest
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = "library/" + path
    if not _PATH_RE.match(path):
        if path.lower() != path:
            raise _bad(ref, "repository names must be lower-case")
        raise _bad(ref, f"bad repository name '{path}'")
    if len(domain) + 1 + len(path) > 255:
        raise _bad(ref, "name longer than 255 characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def is_digest(s):
    return bool(DIGEST_RE.match(s))
