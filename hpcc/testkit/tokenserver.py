"""Docker token authentication for the test registries: TokenServer, the `realm` of a Bearer
challenge, issuing RS256 JWTs that docker-registry verifies against the signer's
certificate."""
import base64
import json
import time
import uuid

from .certs import crypto, make_cert, new_key, pem_cert
from .services import QuietHandler, free_port, serve_in_thread, stop_server


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A minimal Docker token-auth server (the `realm` of a Bearer challenge).

    GET /token?service=S&scope=repository:NAME:ACTIONS with optional Basic credentials.
    Wrong credentials: 401. Known user: the requested actions. Anonymous: pull only if
    `anonymous_pull`, else a token granting nothing. Tokens are RS256 JWTs whose header
    carries the signing certificate in `x5c`; docker-registry verifies that chain against
    its `rootcertbundle`.
    """

    def __init__(self, users, service, issuer="hpcc-test-issuer", anonymous_pull=False):
        self.users = dict(users or {})
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.token_lifetime = 300        # seconds; tests of token refresh shorten it
        self.key = new_key()
        self.cert = make_cert("hpcc test token signer", self.key)
        self.requests = []           # (user or None, scope, status)
        self.port = free_port()
        self._httpd = None

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.port}/token"

    def cert_pem(self):
        return pem_cert(self.cert)

    def make_token(self, subject, access, lifetime=None):
        _, hashes, serialization, padding, _, _ = crypto()
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        claims = {"iss": self.issuer, "sub": subject or "", "aud": self.service,
                  "exp": now + lifetime, "nbf": now - 60, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _grant(self, user, scope):
        access = []
        for sc in scope:
            parts = sc.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if user is not None:
                allowed = [a for a in actions if a in ("pull", "push", "delete", "*")]
            elif self.anonymous_pull:
                allowed = [a for a in actions if a == "pull"]
            else:
                allowed = []
            access.append({"type": typ, "name": name, "actions": allowed})
        return access

    def start(self):
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                scope = q.get("scope", [])
                user = None
                auth = self.headers.get("Authorization", "")
                if u.path != "/token":
                    return self._reply(404, {"error": "not found"})
                if q.get("service", [server.service])[0] != server.service:
                    return self._reply(400, {"error": "unknown service"})
                if auth:
                    try:
                        scheme, blob = auth.split(" ", 1)
                        name, pw = base64.b64decode(blob).decode().split(":", 1)
                    except ValueError:
                        server.requests.append((None, scope, 400))
                        return self._reply(400, {"error": "malformed Authorization"})
                    if scheme.lower() != "basic" or server.users.get(name) != pw:
                        server.requests.append((name, scope, 401))
                        return self._reply(401, {"details": "invalid credentials"},
                                           {"WWW-Authenticate": 'Basic realm="hpcc-token"'})
                    user = name
                tok = server.make_token(user, server._grant(user, scope))
                server.requests.append((user, scope, 200))
                self._reply(200, {"token": tok, "access_token": tok,
                                  "expires_in": server.token_lifetime,
                                  "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())})

            def _reply(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = serve_in_thread(self.port, Handler, "hpcc-token-server")
        return self

    def stop(self):
        stop_server(self._httpd)
        self._httpd = None
