"""A throw-away PKI for the test registries: RSA keys, a CA and the certificates it signs
(TLS of LocalRegistry, the token server's signing certificate), as PEM. Needs the
`cryptography` package of the test extra."""


def crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID
    except ImportError as e:   # pragma: no cover - declared in the test extra
        raise RuntimeError("hpcc.testkit needs the 'cryptography' package "
                           "(pip install 'hpcc[test]')") from e
    return x509, hashes, serialization, padding, rsa, NameOID


def new_key():
    _, _, _, _, rsa, _ = crypto()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_key(key):
    _, _, serialization, _, _, _ = crypto()
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_cert(subject_cn, key, issuer_cert=None, issuer_key=None, *, ca=False, sans=()):
    import datetime
    import ipaddress
    x509, hashes, _, _, _, NameOID = crypto()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    b = (x509.CertificateBuilder()
         .subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                          crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    if sans:
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def pem_cert(cert):
    _, _, serialization, _, _, _ = crypto()
    return cert.public_bytes(serialization.Encoding.PEM)
