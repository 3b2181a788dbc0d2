"""Cosign-style signatures for the tests: key pairs made on the spot, and signature
manifests pushed to a test registry under the `sha256-<hex>.sig` tag, as `cosign sign
--key` stores them (an OCI manifest with one simple-signing payload layer)."""
import base64
import hashlib
import json

from .registry import _Pusher

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def new_key_pair(path_prefix):
    """An ECDSA P-256 key (cosign's kind); writes PATH.pub (PEM) and returns (key, pub path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = f"{path_prefix}.pub"
    with open(pub, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def payload(identity, digest):
    return json.dumps({"critical": {"identity": {"docker-reference": identity},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}, separators=(",", ":")).encode()


def sign(registry, repo, digest, key, *, signed_digest=None):
    """Push a signature of `digest` (the `.sig` tag of `digest`) made with `key`; with
    `signed_digest`, the payload names another digest (a signature moved to another image)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    body = payload(f"{registry.host}/{repo}", signed_digest or digest)
    sig = key.sign(body, ec.ECDSA(hashes.SHA256()))
    config = b'{"architecture":"","os":"","config":{},"rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": len(config), "digest": _sha(config)},
        "layers": [{"mediaType": PAYLOAD_TYPE, "size": len(body), "digest": _sha(body),
                    "annotations": {SIG_ANNOTATION: base64.b64encode(sig).decode()}}],
    }).encode()
    p = _Pusher(registry.url, repo, registry.credentials, registry.verify)
    p.blob(_sha(config), config)
    p.blob(_sha(body), body)
    p.manifest(digest.replace(":", "-", 1) + ".sig", manifest, OCI_MANIFEST)
