"""The site's policy for the gateway service (config `[policy]`): which images may be pulled,
how large they may be, how often a user may ask, which need a signature.

Patterns name images as `registry/repository` (`docker.io/library/ubuntu`,
`ghcr.io/org/*`) with shell wildcards (`*` also matches `/`); a pattern without a `/` names
a whole registry (`quay.io`, `*.example.org`). A denied pattern wins over an allowed one; an
empty `allow` list allows every image that is not denied.
"""
import fnmatch
import threading
import time
from collections import deque

from hpcc.errors import HpccError

MB = 1000 * 1000


class PolicyError(HpccError):
    """The site's policy refuses the request (exit status 1)."""


def _matches(pattern, ref):
    if "/" not in pattern:
        return fnmatch.fnmatchcase(ref.domain, pattern)
    return fnmatch.fnmatchcase(f"{ref.domain}/{ref.path}", pattern)


class Policy:
    def __init__(self, conf):
        conf = conf or {}
        self.allow = list(conf.get("allow") or [])
        self.deny = list(conf.get("deny") or [])
        self.max_compressed = int(conf.get("max_compressed_mb") or 0) * MB or None
        self.max_squashfs = int(conf.get("max_squashfs_mb") or 0) * MB or None
        self.user_concurrent = int(conf.get("user_concurrent_pulls") or 0) or None
        self.user_per_hour = int(conf.get("user_pulls_per_hour") or 0) or None
        self.store_budget = int(conf.get("store_budget_mb") or 0) * MB or None
        self.signatures = list(conf.get("signatures") or [])

    def check_ref(self, ref):
        name = f"{ref.domain}/{ref.path}"
        for pat in self.deny:
            if _matches(pat, ref):
                raise PolicyError(f"the site's policy denies {name} (pattern '{pat}')",
                                  hint="ask the site's admins if you need this image")
        if self.allow and not any(_matches(pat, ref) for pat in self.allow):
            raise PolicyError(f"{name} is not among the registries and repositories the "
                              "site's policy allows",
                              hint="ask the site's admins to allow it")

    def check_compressed(self, ref, total):
        if self.max_compressed and total > self.max_compressed:
            raise PolicyError(f"{ref.familiar} is {total / MB:.0f} MB compressed, more than the "
                              f"site's limit of {self.max_compressed / MB:.0f} MB",
                              hint="ask the site's admins for an exception")

    def squashfs_limit_error(self, ref, size):
        return PolicyError(f"the squashfs of {ref.familiar} grew to {size / MB:.0f} MB, more "
                           f"than the site's limit of {self.max_squashfs / MB:.0f} MB",
                           hint="ask the site's admins for an exception")

    def signature_keys(self, ref):
        """The public key files one of which must have signed `ref`'s image, or None when
        the policy requires no signature for it (the first matching rule decides)."""
        for rule in self.signatures:
            if _matches(rule["match"], ref):
                return list(rule["keys"])
        return None


class UserLimits:
    """Per-user admission: at most `concurrent` pulls at once and `per_hour` requests in any
    hour (sliding window). In memory: a restart of the service starts the counts afresh."""

    def __init__(self, concurrent=None, per_hour=None):
        self.concurrent = concurrent
        self.per_hour = per_hour
        self.lock = threading.Lock()
        self.running = {}
        self.recent = {}

    def acquire(self, uid, user):
        now = time.monotonic()
        with self.lock:
            if self.concurrent and self.running.get(uid, 0) >= self.concurrent:
                raise PolicyError(f"user {user} already has {self.running[uid]} pull(s) in "
                                  f"progress, the site's limit is {self.concurrent}",
                                  hint="wait for them to finish")
            if self.per_hour:
                q = self.recent.setdefault(uid, deque())
                while q and now - q[0] > 3600:
                    q.popleft()
                if len(q) >= self.per_hour:
                    wait = int(3600 - (now - q[0])) + 1
                    raise PolicyError(f"user {user} made {len(q)} pull requests in the last "
                                      f"hour, the site's limit is {self.per_hour}",
                                      hint=f"try again in {wait // 60 + 1} minute(s)")
                q.append(now)
            self.running[uid] = self.running.get(uid, 0) + 1

    def release(self, uid):
        with self.lock:
            n = self.running.get(uid, 0) - 1
            if n > 0:
                self.running[uid] = n
            else:
                self.running.pop(uid, None)
