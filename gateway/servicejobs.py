"""The gateway service's shared pulls: one conversion per image and store, which every
request for it subscribes to (its progress events and its result)."""
import gc
import threading
import time

from .progress import Reporter


class _JobReporter(Reporter):
    """Turns the pull's progress calls into protocol events for every subscriber."""

    STEP = 0.2  # seconds between progress events of one layer / of the conversion

    def __init__(self, job):
        super().__init__(quiet=True)
        self.job = job
        self.last = {}
        self.converted = 0

    def _due(self, key):
        now = time.monotonic()
        if now - self.last.get(key, 0) >= self.STEP:
            self.last[key] = now
            return True
        return False

    def line(self, msg):
        self.job.emit({"event": "line", "msg": msg})

    def resolved(self, ref, digest, nlayers, total):
        ref = self.job.ref.familiar  # as asked, not the digest-pinned name the job pulls
        self.job.emit({"event": "resolved", "ref": ref, "digest": digest, "layers": nlayers,
                       "total": total}, key="resolved")

    def download(self, event, digest, done, total):
        if event == "progress" and not self._due(digest):
            return
        self.job.emit({"event": "download", "phase": event, "digest": digest, "done": done,
                       "total": total}, key=("download", digest))

    def converting(self, total_bytes):
        self.job.phase = "converting"
        self.job.emit({"event": "converting", "total": total_bytes}, key="converting")

    def converted_bytes(self, n):
        with self._lock:
            self.converted += n
            if not self._due("convert"):
                return
            total = self.converted
        self.job.emit({"event": "converted", "total": total}, key="converted")

    def done(self, msg):
        self.job.emit({"event": "line", "msg": msg})


class PullJob:
    """One conversion, shared by every request for the same image and store."""

    def __init__(self, service, store, ref, img, client, platform):
        self.service = service
        self.store = store
        self.ref = ref
        self.digest = img.manifest_digest
        self.img = img
        self.pin = ref.with_digest(img.index_digest or img.manifest_digest)
        self.client = client
        self.platform = platform
        self.key = (store.root, self.digest)
        self.lock = threading.Lock()
        self.snapshot = {}
        self.subs = []
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.requesters = 0
        self.phase = "downloading"
        self.started = time.time()

    def emit(self, ev, key=None):
        with self.lock:
            if key is not None:
                self.snapshot.pop(key, None)
                self.snapshot[key] = ev
            subs = list(self.subs)
        for q in subs:
            q.append(ev)
            q.ready.set()

    def subscribe(self):
        q = _Queue()
        with self.lock:
            self.requesters += 1
            q.extend(self.snapshot.values())
            q.ready.set()
            self.subs.append(q)
        return q

    def unsubscribe(self, q):
        with self.lock:
            if q in self.subs:
                self.subs.remove(q)

    def run(self):
        from .pull import pull

        svc = self.service
        try:
            self.result = pull(str(self.pin), store=self.store, config=svc.config,
                               platform=self.platform, client=self.client,
                               reporter=_JobReporter(self), resolved=self.img,
                               check_size=svc.squashfs_check(self.ref))
        except BaseException as e:  # reported to every requester
            self.error = e
        finally:
            gc.unfreeze()  # pull() froze what existed; a long-lived service must collect it
            self.client.close()
            with svc.jobs_lock:
                svc.jobs.pop(self.key, None)
            self.done.set()
            self.emit(None)
        if self.result is not None:
            svc.evict(keep=self.digest)


class _Queue(list):
    def __init__(self):
        super().__init__()
        self.ready = threading.Event()

    def take(self):
        """Events queued so far (waits for at least one)."""
        while True:
            self.ready.wait()
            self.ready.clear()
            if self:
                out = self[:]
                del self[:len(out)]
                return out


