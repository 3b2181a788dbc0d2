"""The gateway service's audit log: one JSON object per line for every request, whatever
its outcome (who, from where, what, the digest, sizes, duration, outcome, error).

Each record is appended with one write(2) on a file opened O_APPEND, so lines of concurrent
requests never interleave; the file is reopened for every record (logrotate may move it).
"""
import json
import os
import threading
import time

from hpcc.errors import ConfigError


class AuditLog:
    def __init__(self, path):
        self.path = path or None
        self.lock = threading.Lock()
        if self.path:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
            except OSError as e:
                raise ConfigError(f"cannot write the audit log {self.path}: {e.strerror}",
                                  hint="fix policy.audit_log or the directory's owner") from None

    def write(self, **record):
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec.update({k: v for k, v in record.items() if v is not None})
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        if not self.path:
            return rec
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return rec
