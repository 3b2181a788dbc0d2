"""Cosign signatures (key-based), checked where the site's policy requires them.

Cosign stores the signatures of image digest `sha256:<hex>` in the same repository under
the tag `sha256-<hex>.sig`: an OCI manifest whose layers are simple-signing payloads
(media type application/vnd.dev.cosign.simplesigning.v1+json), each with its signature,
base64, in the annotation `dev.cosignproject.cosign/signature`. The payload is JSON:

    {"critical": {"identity": {"docker-reference": "registry/repo"},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "cosign container image signature"},
     "optional": {...}}

An image passes when one payload names the digest being pulled (the platform manifest's, or
the index's it was chosen from: cosign signs what it was given) and its signature verifies
with one of the site's public keys (PEM: ECDSA P-256/P-384 with SHA-256, as `cosign
generate-key-pair` makes, RSA PKCS#1 v1.5 or Ed25519). Verification uses `cryptography`.
"""
import base64
import hashlib
import json

from hpcc.errors import ConfigError, HpccError, NotInRegistry

from .policy import PolicyError

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ANNOTATION = "dev.cosignproject.cosign/signature"
SIG_TYPE = "cosign container image signature"
MAX_SIGNATURES = 32


class SignatureError(PolicyError):
    """The policy requires a signature that the image does not carry."""


def signature_tag(digest):
    return digest.replace(":", "-", 1) + ".sig"


def load_key(path):
    """(public key, sha256 fingerprint of its SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_public_key(f.read())
    except OSError as e:
        raise ConfigError(f"cannot read the signature key {path}: {e.strerror}",
                          hint="fix policy.signatures in the site config") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key",
                          hint="fix policy.signatures in the site config") from None
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, "sha256:" + hashlib.sha256(der).hexdigest()


def _verifies(key, signature, payload):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _signatures(client, ref, digest):
    """[(payload bytes, signature bytes)] of the `.sig` tag of `digest` ([] if none)."""
    sig_ref = ref.with_digest(None)
    try:
        body, _d, _ct = client._get_manifest(sig_ref, signature_tag(digest))
    except NotInRegistry:
        return []
    try:
        manifest = json.loads(body)
        layers = manifest.get("layers") or []
    except (ValueError, AttributeError):
        return []
    out = []
    for layer in layers[:MAX_SIGNATURES]:
        if not isinstance(layer, dict) or layer.get("mediaType") != PAYLOAD_TYPE:
            continue
        sig_b64 = (layer.get("annotations") or {}).get(SIG_ANNOTATION)
        size = layer.get("size")
        if not isinstance(sig_b64, str) or not isinstance(size, int):
            continue
        try:
            sig = base64.b64decode(sig_b64, validate=True)
        except ValueError:
            continue
        payload = client._fetch_small_blob(sig_ref, layer.get("digest", ""), size,
                                           f"signature payload of {ref.familiar}")
        out.append((payload, sig))
    return out


def verify_image(client, ref, img, key_paths):
    """Who signed the image: {"key", "fingerprint", "digest", "identity"}; SignatureError
    when no signature by one of `key_paths` names its digest."""
    keys = [(path, *load_key(path)) for path in key_paths]
    digests = [d for d in (img.manifest_digest, img.index_digest) if d]
    found = bad = 0
    for digest in digests:
        for payload, sig in _signatures(client, ref, digest):
            found += 1
            try:
                doc = json.loads(payload)
                crit = doc["critical"]
                named = crit["image"]["docker-manifest-digest"]
                kind = crit["type"]
                identity = (crit.get("identity") or {}).get("docker-reference", "")
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if named != digest or kind != SIG_TYPE:
                bad += 1
                continue
            for path, key, fingerprint in keys:
                if _verifies(key, sig, payload):
                    return {"key": path, "fingerprint": fingerprint, "digest": digest,
                            "identity": identity}
            bad += 1
    names = ", ".join(path for path, _k, _f in keys)
    if not found:
        raise SignatureError(f"{ref.familiar} is not signed, and the site's policy requires "
                             f"a signature by {names}",
                             hint="ask the image's publisher to sign it with cosign")
    raise SignatureError(f"{ref.familiar} has {found} signature(s) but none by the site's "
                         f"keys ({names}) for digest {digests[0]}",
                         hint="the image may have been tampered with; ask the site's admins")


def check_policy(config, client, ref, img):
    """The signer when the policy requires a signature for `ref`, else None."""
    from .policy import Policy

    keys = Policy(config.get("policy")).signature_keys(ref)
    if not keys:
        return None
    try:
        return verify_image(client, ref, img, keys)
    except (HpccError, ImportError) as e:
        if isinstance(e, ImportError):
            raise ConfigError("signature checks need the 'cryptography' package",
                              hint="reinstall hpcc") from None
        raise
