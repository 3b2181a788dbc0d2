"""`gateway serve`: the gateway service. Users put images into the site store through it,
once per cluster, within the site's policy; it runs as the unprivileged account that owns
the store, so users never write the store themselves.

Ways in (nothing else):
- the UNIX socket `service.socket` (login nodes): the kernel tells who the peer is
  (SO_PEERCRED);
- TCP on `service.listen` (other hosts): the request travels inside a munge credential,
  which munged seals with the cluster key, encrypts, binds to the sender's uid and accepts
  once (a replay is refused).
A request that claims a uid other than the one proven is refused.

A pull is resolved with the service's own (site) credentials; when the registry refuses
that and the request carries the user's credentials (their auth file's entries for that
registry, held in memory only for this request), it is resolved again with those and the
image goes to the user's private store (gateway/private.py). Requests for one image share
one conversion: the first starts it, later ones subscribe to its progress and result.
"""
import os
import signal
import socket
import sys
import threading
import time

from hpcc.errors import EXIT_USAGE, ConfigError, HpccError, UsageError
from hpcc.reference import parse_reference
from hpcc.store import Store

from . import protocol
from .audit import AuditLog
from .identity import _user_name, _UserClient, identify
from .policy import Policy, PolicyError, UserLimits
from .servicejobs import PullJob


def parse_listen(value):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"service.listen '{value}' is not HOST:PORT")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class Service:
    def __init__(self, config, *, socket_path=None, listen=None, munge_socket=None,
                 store=None, log=None):
        from hpcc.config import expand_path

        svc = config["service"]
        pol = config["policy"]
        self.config = config
        self.socket_path = expand_path(socket_path or svc["socket"])
        self.listen = svc["listen"] if listen is None else listen
        self.munge_socket = munge_socket or svc["munge_socket"] or None
        self.store = store or Store.site(config)
        self.policy = Policy(pol)
        self.limits = UserLimits(self.policy.user_concurrent, self.policy.user_per_hour)
        self.audit = AuditLog(expand_path(pol["audit_log"]) if pol["audit_log"] else None)
        self.log_stream = log or sys.stderr
        self.jobs = {}
        self.jobs_lock = threading.Lock()
        self.resolved = {}  # (ref, platform) -> (digest, when): tags resolved lately
        self.max_connections = svc["max_connections"]
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.last_busy_log = 0.0
        self.resolve_ttl = svc["resolve_cache_seconds"]
        self.evict_lock = threading.Lock()
        self.stopping = threading.Event()
        self.listeners = []
        self.started = time.time()

    # ---- life cycle ----------------------------------------------------------------------
    def log(self, msg):
        try:
            print(f"gateway serve: {msg}", file=self.log_stream, flush=True)
        except (OSError, ValueError):
            pass

    def _bind_unix(self):
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left by a service that died
            else:
                raise ConfigError(f"another gateway service already listens on {path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o666)  # every local user may ask; the peer's uid decides the rest
        s.listen(64)
        return s

    def start(self):
        self.store.ensure()
        try:
            self.listeners.append(("unix", self._bind_unix()))
            if self.listen:
                host, port = parse_listen(self.listen)
                s = socket.create_server((host, port), backlog=64)
                self.listeners.append(("tcp", s))
        except OSError as e:
            self.close()
            raise ConfigError(f"the gateway service cannot listen: {e.strerror or e}") from None
        for kind, s in self.listeners:
            threading.Thread(target=self._accept_loop, args=(kind, s), daemon=True,
                             name=f"accept-{kind}").start()
        where = self.socket_path + (f" and tcp {self.listen}" if self.listen else "")
        self.log(f"serving the store {self.store.root} on {where} as "
                 f"{_user_name(os.geteuid())} (pid {os.getpid()})")

    def close(self):
        self.stopping.set()
        for kind, s in self.listeners:
            try:
                s.close()
            except OSError:
                pass
        self.listeners = []
        try:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
        except OSError:
            pass

    def serve_forever(self):
        self.start()

        def stop(signum, frame):
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while not self.stopping.wait(1.0):
                pass
        finally:
            self.log("stopping")
            self.close()

    def _accept_loop(self, kind, sock):
        while not self.stopping.is_set():
            try:
                conn, addr = sock.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            host = addr[0] if kind == "tcp" else None
            if not self.slots.acquire(blocking=False):
                # Connections held open (each costs a thread) cannot starve the service:
                # beyond service.max_connections, one line and close.
                self._refuse_busy(conn, kind, host)
                continue
            threading.Thread(target=self._handle_slot, args=(conn, kind, host), daemon=True,
                             name="request").start()

    def _refuse_busy(self, conn, kind, host):
        try:
            conn.settimeout(1)
            conn.sendall(b'{"event":"error","exit_code":3,"message":"the gateway service is '
                         b'busy (too many connections); try again in a moment"}\n')
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() - self.last_busy_log > 10:
            self.last_busy_log = time.monotonic()
            self.log(f"refusing connections: {self.max_connections} already open")
            self.audit.write(op="connect", via=kind, host=host, outcome="refused",
                             error="too many connections")

    def _handle_slot(self, conn, kind, host):
        try:
            self._handle(conn, kind, host)
        finally:
            self.slots.release()

    # ---- one connection ------------------------------------------------------------------
    def _handle(self, conn, kind, host):
        f = conn.makefile("rwb")
        ident = None
        req = {}
        try:
            conn.settimeout(30)
            try:
                req = protocol.recv(f)
                if req is None:
                    return  # connected and went away (a liveness probe)
                ident, req = self._identify(conn, kind, host, req)
            except HpccError as e:
                self.audit.write(op=str(req.get("op") or "?")[:32], via=kind, host=host,
                                 outcome="refused", error=str(e))
                self.log(f"refused a {kind} request: {e}")
                protocol.send(f, {"event": "error", "message": str(e), "exit_code": 1})
                return
            conn.settimeout(None)
            op = req.get("op")
            if op == "pull":
                self._pull(ident, req, f)
            elif op == "status":
                protocol.send(f, {"event": "result", "status": self.status()})
            elif op == "list":
                protocol.send(f, {"event": "result", "images": self.list_images(ident)})
            elif op == "rm":
                self._rm(ident, req, f)
            else:
                e = UsageError(f"unknown request '{op}'")
                self.audit.write(op=str(op)[:32], **ident.audit(), outcome="refused",
                                 error=str(e))
                protocol.send(f, {"event": "error", "message": str(e), "exit_code": EXIT_USAGE})
        except (OSError, ValueError):
            pass  # the client went away
        finally:
            try:
                f.close()
                conn.close()
            except OSError:
                pass

    def _identify(self, conn, kind, host, req):
        return identify(conn, kind, host, req, self.munge_socket)

    # ---- pull ----------------------------------------------------------------------------
    def squashfs_check(self, ref):
        limit = self.policy.max_squashfs
        if not limit:
            return None

        def check(size):
            if size > limit:
                raise self.policy.squashfs_limit_error(ref, size)
        return check

    def _resolve(self, ref, platform, auth):
        """(client, image, private). The site's credentials first, then the user's."""
        from hpcc.errors import NotInRegistry, RegistryError

        from .registry import RegistryClient

        client = RegistryClient(self.config)
        try:
            return client, client.resolve(ref, platform), False
        except (RegistryError, NotInRegistry):  # some registries hide private repositories
            client.close()
            if not auth:
                raise
        client = _UserClient(self.config, auth)
        try:
            return client, client.resolve(ref, platform), True
        except BaseException:
            client.close()
            raise

    def _pull(self, ident, req, f):
        t0 = time.monotonic()
        record = {"op": "pull", **ident.audit(), "ref": req.get("ref")}
        state = {"outcome": "failed", "client": None}
        error, acquired = None, False
        try:
            ref_s = req.get("ref")
            if not isinstance(ref_s, str):
                raise UsageError("a pull request needs a reference")
            ref = parse_reference(ref_s)
            record["ref"] = str(ref)
            platform = req.get("platform") or None
            if platform is not None and not isinstance(platform, str):
                raise UsageError("the platform must be text")
            auth = req.get("auth") or None
            if auth is not None and not isinstance(auth, dict):
                raise UsageError("auth must be an auth file's JSON object")
            self.policy.check_ref(ref)
            self.limits.acquire(ident.uid, ident.user)
            acquired = True
            rec = self._known(ref, platform)
            if rec is not None:  # answered from the store, no registry round trip
                private, store = False, self.store
                self._tag(store, ref, rec.digest)
                record.update(digest=rec.digest, compressed_size=rec.meta.get("compressed_size"),
                              private=False, resolved="cache")
                state["outcome"] = "present"
                result = {"converted": False, "joined": False}
            else:
                rec, private, store, result = self._pull_at_registry(
                    ident, ref, platform, auth, record, f, state)
            result.update(ref=str(ref), digest=rec.digest, path=rec.sqfs_path,
                          size=rec.meta.get("size"), private=private, store=store.root,
                          seconds=round(time.monotonic() - t0, 3),
                          conversion=rec.meta.get("conversion") or {})
            record["squashfs_size"] = rec.meta.get("size")
            protocol.send(f, {"event": "result", **result})
        except HpccError as e:
            state["outcome"] = "denied" if isinstance(e, PolicyError) else "failed"
            error = e
            protocol.send(f, {"event": "error", "message": str(e), "exit_code": e.exit_code})
        except Exception as e:  # noqa: BLE001 - the service keeps serving; the client is told
            error = e
            self.log(f"internal error in a pull of {record.get('ref')}: {e!r}")
            protocol.send(f, {"event": "error", "exit_code": 1,
                              "message": f"the gateway service failed: {e}"})
        finally:
            if acquired:
                self.limits.release(ident.uid)
            if state["client"] is not None:
                state["client"].close()
            secs = round(time.monotonic() - t0, 3)
            outcome = state["outcome"]
            self.audit.write(**record, outcome=outcome, seconds=secs,
                             error=str(error) if error else None)
            self.log(f"{ident.user} ({ident.via}) pull {record.get('ref')}: {outcome} "
                     f"in {secs:.2f}s" + (f": {error}" if error else ""))

    def _pull_at_registry(self, ident, ref, platform, auth, record, f, state):
        """Resolve at the registry, check the policy, then answer from the store or convert
        (one conversion shared by every request for the image). `state` carries the
        outcome and the registry client still to close (None once a job owns it)."""
        client, img, private = self._resolve(ref, platform, auth)
        state["client"] = client
        total = sum(layer.size for layer in img.layers)
        record.update(digest=img.manifest_digest, compressed_size=total, private=private)
        self.policy.check_compressed(ref, total)
        keys = self.policy.signature_keys(ref)
        if keys:
            from .cosign import verify_image

            record["signed_by"] = verify_image(client, ref, img, keys)["key"]
        if private:
            from .private import private_store

            store = private_store(self.store.root, ident.uid)
        else:
            store = self.store
        rec = store.get(img.manifest_digest)
        if rec is not None:
            self._tag(store, ref, img.manifest_digest)
            state["outcome"] = "present"
            result = {"converted": False, "joined": False}
        else:
            with self.jobs_lock:
                job = self.jobs.get((store.root, img.manifest_digest))
                joined = job is not None
                if job is None:
                    job = PullJob(self, store, ref, img, client, platform)
                    self.jobs[job.key] = job
                    state["client"] = None  # the job owns it now
                    q = job.subscribe()
                    threading.Thread(target=job.run, daemon=True, name="pull").start()
                else:
                    q = job.subscribe()
            self._stream(job, q, f)
            if job.error is not None:
                raise job.error
            rec = job.result.record
            if joined:
                self._tag(store, ref, img.manifest_digest)
            state["outcome"] = ("joined" if joined else
                                "pulled" if job.result.converted else "present")
            result = {"converted": job.result.converted, "joined": joined}
        if not private:
            self._remember(ref, platform, rec.digest)
        return rec, private, store, result

    def _known(self, ref, platform):
        """The public image `ref` names when the store has it and the registry need not be
        asked: a digest (immutable), or a tag resolved within service.resolve_cache_seconds.
        Private images are never answered this way: the user's access is checked each time."""
        digest = ref.digest
        if digest is None:
            with self.jobs_lock:
                hit = self.resolved.get((str(ref), platform or ""))
            if hit is None or time.monotonic() - hit[1] > self.resolve_ttl:
                return None
            digest = hit[0]
        return self.store.get(digest)

    def _remember(self, ref, platform, digest):
        if ref.tag and not ref.digest and self.resolve_ttl > 0:
            with self.jobs_lock:
                self.resolved[(str(ref), platform or "")] = (digest, time.monotonic())

    @staticmethod
    def _tag(store, ref, digest):
        if ref.tag and store.lookup_tag(ref) != digest:
            store.tag(ref, digest)

    def _stream(self, job, q, f):
        """Forward the job's events to this client until the job ends. A client that goes
        away stops getting them; the job goes on for the others."""
        alive = True
        try:
            while True:
                for ev in q.take():
                    if ev is None:
                        return
                    if alive:
                        try:
                            protocol.send(f, ev)
                        except (OSError, ValueError):
                            alive = False
        finally:
            job.unsubscribe(q)

    # ---- rm (the caller's private images only) --------------------------------------------
    def _rm(self, ident, req, f):
        from hpcc.errors import ImageNotFound

        ref = req.get("ref")
        record = {"op": "rm", **ident.audit(), "ref": ref}
        try:
            if not isinstance(ref, str):
                raise UsageError("an rm request needs a reference")
            store = Store.private(self.store.root, ident.uid)
            if not os.path.isdir(store.root):
                raise ImageNotFound(f"you have no private image '{ref}'")
            with self.jobs_lock:
                busy = {d for (root, d) in self.jobs if root == store.root}
            rec = store.find(ref)
            if rec is not None and rec.digest in busy:
                raise UsageError(f"'{ref}' is being pulled; remove it when the pull is done")
            untagged, deleted = store.remove(ref)
        except HpccError as e:
            self.audit.write(**record, outcome="failed", error=str(e))
            protocol.send(f, {"event": "error", "message": str(e), "exit_code": e.exit_code})
            return
        self.audit.write(**record, digest=deleted, tags=untagged, outcome="removed")
        protocol.send(f, {"event": "result", "untagged": untagged, "deleted": deleted})

    # ---- store budget --------------------------------------------------------------------
    def evict(self, keep):
        budget = self.policy.store_budget
        if not budget:
            return
        from .eviction import evict

        with self.evict_lock:
            with self.jobs_lock:
                busy = {d for (_root, d) in self.jobs} | {keep}
            try:
                removed = evict(self.all_stores(), budget, busy=busy)
            except HpccError as e:
                self.log(f"store over its budget, nothing evicted: {e}")
                self.audit.write(op="evict", outcome="failed", error=str(e))
                return
        for digest, size, tags, root in removed:
            self.audit.write(op="evict", digest=digest, squashfs_size=size, tags=tags,
                             store=root, outcome="evicted")
            self.log(f"evicted {digest} ({', '.join(tags) or 'untagged'}, {size} bytes) "
                     f"from {root}")
        if removed:
            self._prune_blobs()

    def all_stores(self):
        """The site store and every private store in it."""
        from hpcc.store import PRIVATE_DIR

        stores = [self.store]
        base = os.path.join(self.store.root, PRIVATE_DIR)
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            names = []
        stores += [Store.private(self.store.root, int(n)) for n in names if n.isdigit()]
        return stores

    def _prune_blobs(self):
        """The layer blobs of evicted images go too: keep those of the stores' images and of
        the pulls in progress (a blob being downloaded is locked and skipped anyway)."""
        from .blobcache import BlobCache, blob_cache_dir

        stores = self.all_stores()
        keep = {layer["digest"] for store in stores for rec in store.images()
                for layer in rec.meta.get("layers", [])}
        with self.jobs_lock:
            keep |= {layer.digest for job in self.jobs.values() for layer in job.img.layers}
        for cache_dir in {str(blob_cache_dir(self.config, st.root)) for st in stores}:
            try:
                BlobCache(cache_dir).prune(keep)
            except (HpccError, OSError) as e:
                self.log(f"could not prune the blob cache {cache_dir}: {e}")

    # ---- status and list -----------------------------------------------------------------
    def status(self):
        with self.jobs_lock:
            jobs = [{"ref": str(j.ref), "digest": j.digest, "phase": j.phase,
                     "requesters": j.requesters, "seconds": round(time.time() - j.started, 1)}
                    for j in self.jobs.values()]
        return {"pid": os.getpid(), "user": _user_name(os.geteuid()), "store": self.store.root,
                "uptime": round(time.time() - self.started, 1), "pulls": jobs}

    def list_images(self, ident):
        out = []
        stores = [(self.store, False), (Store.private(self.store.root, ident.uid), True)]
        for st, private in stores:
            for rec in st.images():
                out.append({"digest": rec.digest, "tags": rec.meta.get("tags", []),
                            "size": rec.meta.get("size"), "path": rec.sqfs_path,
                            "private": private})
        return out
